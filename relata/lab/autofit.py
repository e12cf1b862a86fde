"""`relata evaluate`'s default method, `hybrid+fit`: the workers' fit procedure
(`workers.fitting.fit`) run on the evaluation's training histories — the folded profiles,
every evaluation target and everything after it removed — then the held-out targets ranked
with the model it chose (the candidate when it wins on validation, else the current one), at
the live MMR lambda: what the recommender's background fitter would serve after these
histories."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from relata.lab.protocol import Prepared
from relata.runtime.evidence import fold_evidence
from workers.fitting import (
    FitResult,
    ItemSpace,
    ItemStep,
    ModelBundle,
    UserEncoderStep,
    VectorInputs,
    fit,
    pooled_vectors,
    vector_inputs,
)

logger = logging.getLogger(__name__)

FIT_METHOD = "hybrid+fit"


@dataclass
class AutoFit:
    """The fit's result, the model chosen and its inputs for the evaluation's users."""

    result: FitResult
    chosen: ModelBundle
    items: ItemSpace
    inputs: VectorInputs | None

    def report(self) -> dict[str, Any]:
        """The fit's part of the evaluation report."""
        r = self.result
        return {
            "validation_users": r.users,
            "validation_ndcg": round(r.score, 5),
            "current": r.current.version,
            "current_validation_ndcg": round(r.current_score, 5),
            "chosen": self.chosen.version,
            "swapped": r.wins(),
            "seconds": {phase: round(sec, 1) for phase, sec in r.timings.items()},
            "weights": self.chosen.weights.model_dump(),
        }


def items_of(prepared: Prepared, matrix: np.ndarray) -> ItemSpace:
    """The catalog's items with these vectors and the catalog's availability."""
    return ItemSpace(
        list(prepared.item_ids),
        np.ascontiguousarray(matrix, dtype=np.float32),
        frozenset(prepared.state.available),
    )


def auto_fit(
    prepared: Prepared,
    matrix: np.ndarray,
    *,
    current: ModelBundle,
    k: int,
    candidates: int,
    mmr_lambda: float,
    item_step: ItemStep | None = None,
    user_encoder_step: UserEncoderStep | None = None,
    learned_ranker: bool = True,
    echo: Callable[[str], None] = print,
    score_cases: bool = True,
) -> AutoFit:
    """Fit on the training histories of `prepared` and prepare the chosen model's user
    vectors and hits for its evaluation cases (unless `score_cases` is false)."""
    items = items_of(prepared, matrix)
    result = fit(
        prepared.state.profiles,
        items,
        evidence=fold_evidence,
        current=current,
        k=k,
        candidates=candidates,
        mmr_lambda=mmr_lambda,
        item_step=item_step,
        user_encoder_step=user_encoder_step,
        learned_ranker=learned_ranker,
    )
    chosen = result.chosen()
    echo(
        f"fit: {result.users} validation users; validation NDCG@{k} candidate "
        f"{result.score:.4f}, current ({result.current.version}) {result.current_score:.4f} "
        f"-> {'candidate' if result.wins() else 'current'} ({chosen.version}); "
        + ", ".join(f"{phase} {sec:.0f} s" for phase, sec in result.timings.items())
    )
    served = items
    if chosen.item_adapter is not None:
        served = items.with_matrix(chosen.item_adapter.matrix)
    inputs = None
    if score_cases and chosen.weights.vector > 0:
        histories = [prepared.state.profiles[c.user_id] for c in prepared.split.cases]
        encoder = chosen.user_encoder
        users = (
            pooled_vectors(served, chosen.weights)
            if encoder is None
            else (lambda hs: encoder.user_vectors(hs, served.vectors))
        )
        inputs = vector_inputs(histories, served, users, top=candidates)
    return AutoFit(result=result, chosen=chosen, items=served, inputs=inputs)
