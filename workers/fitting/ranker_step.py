"""The fit's learned-ranker step: train the ranker (`workers.ranking.learned`) on the
validation targets, and keep it only when it wins on users it was not trained on.

The ranker learns from the same targets it would be validated on, so its own validation
score would flatter it. The step cross-fits instead: the validation users are split in two
halves, a model trained on each half ranks the other (through the live core, MMR included),
and the ranker is kept only when those out-of-half lists beat the blend's lists on the same
users by `RANKER_MIN_GAIN`. The ranker served is then trained on every validation user, and
the fit reports the cross-fitted score (an honest one) as its candidate's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from workers.ranking import FeatureRecorder, LearnedRanker, Reranker, feature_names, train_model

from .bundle import ModelBundle
from .offline import ndcg_at

logger = logging.getLogger(__name__)

# Relative validation gain the cross-fitted ranker must bring over the blend to be kept: a
# model chosen on the same targets it is compared on wins small margins by chance.
RANKER_MIN_GAIN = 0.01
# Validation users the step uses at most (a sample; each gives `learned.DEPTH` rows): it ranks
# them three times and trains on them twice, so this bounds its time on large histories, and a
# sample of this size trains a model of this size as well as more would.
MAX_USERS = 8000


class Validation(Protocol):
    """What the step reads of the fit's validation (`procedure.Validation`)."""

    @property
    def targets(self) -> Sequence[str]: ...

    @property
    def k(self) -> int: ...

    def lists(
        self,
        bundle: ModelBundle,
        *,
        users: Sequence[int] | np.ndarray | None = None,
        reranker: Reranker | None = None,
    ) -> list[list[str]]: ...


@dataclass(frozen=True)
class RankerFit:
    """The step's outcome: the ranker (None: the blend won), the validation NDCG@k of the
    blend and of the cross-fitted ranker on the same users, and those users (positions in
    the validation's targets)."""

    ranker: LearnedRanker | None
    blend_score: float
    cross_score: float
    users: npt.NDArray[np.intp]


def _rows(
    recorder: FeatureRecorder, targets: Sequence[str], users: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    x = [recorder.features[u] for u in users.tolist()]
    y = [
        np.array([i == targets[u] for i in recorder.ids[u]], dtype=np.float64)
        for u in users.tolist()
    ]
    width = len(feature_names())
    if not x:
        return np.zeros((0, width), dtype=np.float32), np.zeros(0)
    return np.concatenate(x), np.concatenate(y)


def _train(
    recorder: FeatureRecorder, targets: Sequence[str], users: npt.NDArray[np.intp], *, seed: int
) -> LearnedRanker | None:
    x, y = _rows(recorder, targets, users)
    if not y.any() or y.all():
        return None  # nothing to learn from: no target among the candidates
    model = train_model(x, y, seed=seed)
    return LearnedRanker(
        model=model, names=tuple(feature_names()), meta={"users": len(users), "rows": len(y)}
    )


def fit_ranker(
    validation: Validation,
    bundle: ModelBundle,
    *,
    min_gain: float = RANKER_MIN_GAIN,
    max_users: int = MAX_USERS,
    seed: int = 0,
) -> RankerFit:
    """Cross-fit a learned ranker over `bundle`'s blend on (a sample of) `validation`'s users
    and train the one to serve when it wins (module docstring)."""
    rng = np.random.default_rng(seed)
    everyone = len(validation.targets)
    sample = np.arange(everyone, dtype=np.intp)
    if everyone > max_users:
        sample = np.sort(rng.choice(everyone, size=max_users, replace=False))
    targets = [validation.targets[u] for u in sample.tolist()]
    recorder = FeatureRecorder()
    blend = ndcg_at(
        validation.lists(bundle, users=sample, reranker=recorder), targets, validation.k
    )
    n = len(sample)
    half = np.zeros(n, dtype=np.intp)
    half[rng.permutation(n)[: n // 2]] = 1
    lists: list[list[str]] = [[] for _ in range(n)]
    for side in (0, 1):
        ranker = _train(recorder, targets, np.flatnonzero(half != side), seed=seed)
        if ranker is None:
            logger.info("fit ranker: no target among a half's candidates, blend kept")
            return RankerFit(None, blend, blend, sample)
        mine = np.flatnonzero(half == side)
        found = validation.lists(bundle, users=sample[mine], reranker=ranker)
        for u, ids in zip(mine.tolist(), found, strict=True):
            lists[u] = ids
    cross = ndcg_at(lists, targets, validation.k)
    logger.info("fit ranker users=%d ndcg_cross=%.5f blend=%.5f", n, cross, blend)
    if cross <= blend * (1.0 + min_gain):
        return RankerFit(None, blend, cross, sample)
    final = _train(recorder, targets, np.arange(n, dtype=np.intp), seed=seed)
    return RankerFit(final, blend, cross, sample)
