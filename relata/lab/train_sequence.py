"""Step (c) of `relata train`: the sequence user encoder, and the blend searched with its
user vectors, written with the verdict of the validation targets: whether its hybrid ranking
beats the pooled one (serving it is opt-in: `RELATA_RECOMMENDER_USER_VECTOR=sequence`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np

from relata.lab.blend_search import BlendSearch
from relata.lab.protocol import Prepared
from relata.lab.sequences import fit_encoder, sequence_inputs
from workers.ranking import BlendWeights
from workers.user_encoder import UserEncoder, save_user_encoder
from workers.user_encoder_fit import FitReport


class Blend(Protocol):
    """`relata.lab.train.fit_blend`, passed in (this module is imported by train)."""

    def __call__(
        self,
        prepared: Prepared,
        matrix: np.ndarray | None,
        *,
        k: int,
        start: BlendWeights,
        desc: str,
        progress: bool,
        search: BlendSearch,
        skip: tuple[str, ...],
    ) -> tuple[BlendWeights, float, list[dict[str, Any]]]: ...


USER_ENCODER_DIR = "user_encoder"
SEQUENCE_BLEND = "blend-sequence.json"


@dataclass
class SequenceFit:
    """Step (c)'s outcome: the encoder, its fit, and the blend searched with its vectors."""

    encoder: UserEncoder
    report: FitReport
    weights: BlendWeights
    ndcg_pooled: float
    ndcg_sequence: float

    @property
    def better(self) -> bool:
        """Its hybrid ranking beats the pooled one on validation."""
        return self.ndcg_sequence > self.ndcg_pooled

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.encoder.name,
            "better_than_pooled": self.better,
            "ndcg_pooled": round(self.ndcg_pooled, 5),
            "ndcg_sequence": round(self.ndcg_sequence, 5),
            "fit_seconds": round(self.report.seconds, 1),
            "stopped": self.report.stopped,
            "parameters": self.report.parameters,
        }


def fit_sequence(
    prepared: Prepared,
    matrix: np.ndarray,
    *,
    search: BlendSearch,
    blend: Blend,
    start: BlendWeights,
    start_score: float,
    k: int,
    budget_s: float,
    seed: int,
    item_vectors: dict[str, Any],
    progress: bool,
) -> SequenceFit:
    """Fit the encoder over `matrix`, then search the blend with its user vectors (from the
    pooled search's best weights; the pooled vector's recency is not searched: it changes
    only the users the encoder does not answer)."""
    encoder, report = fit_encoder(
        prepared,
        matrix,
        time_budget_s=budget_s,
        seed=seed,
        item_vectors=item_vectors,
        echo=click.echo,
    )
    click.echo(
        f"user encoder: {report.stopped} after {report.steps} steps ({report.epochs:.2f} epochs) "
        f"in {report.seconds:.0f} s; validation NDCG@10 of its vectors alone "
        f"{report.pooled.get('ndcg', 0.0):.4f} (pooled) -> {report.best.get('ndcg', 0.0):.4f}"
    )
    search.use_vectors(partial(sequence_inputs, prepared, encoder, top=search.candidates))
    weights, score, _ = blend(
        prepared,
        matrix,
        k=k,
        start=start,
        desc="blend (sequence)",
        progress=progress,
        search=search,
        skip=("vector_recency",),
    )
    search.use_vectors(None)
    encoder.meta["validation"] = {"hybrid_ndcg_pooled": start_score, "hybrid_ndcg": score}
    return SequenceFit(encoder, report, weights, start_score, score)


def write_sequence(out_dir: Path, sequence: SequenceFit | None) -> None:
    """Write the encoder and its blend with the verdict; without an encoder, remove stale
    ones (they would be loaded by mistake beside artifacts fitted without them)."""
    if sequence is not None:
        save_user_encoder(out_dir / USER_ENCODER_DIR, sequence.encoder)
        sequence.weights.model_copy(
            update={"fitted_on": {"user_vector": sequence.encoder.name, **sequence.summary()}}
        ).save(out_dir / SEQUENCE_BLEND)
        verdict = (
            "better than pooling: serve it with RELATA_RECOMMENDER_USER_VECTOR=sequence"
            if sequence.better
            else "not better than pooling: keep RELATA_RECOMMENDER_USER_VECTOR=pooled"
        )
        click.echo(
            f"user encoder: validation NDCG@10 of the hybrid {sequence.ndcg_pooled:.4f} "
            f"(pooled) vs {sequence.ndcg_sequence:.4f} (sequence), {verdict}; wrote "
            f"{out_dir / USER_ENCODER_DIR} and {out_dir / SEQUENCE_BLEND}"
        )
        return
    if (out_dir / USER_ENCODER_DIR).is_dir():
        shutil.rmtree(out_dir / USER_ENCODER_DIR)
    (out_dir / SEQUENCE_BLEND).unlink(missing_ok=True)
