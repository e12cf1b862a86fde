"""The one fit procedure: user histories and item vectors in, a model bundle and its
validation score out. The recommender's background fitter, `relata evaluate` (its default
method) and `relata train` all run it.

1. Split (`split.py`): each user's latest new positive item is the validation target; it and
   everything after it are removed from what is fitted on.
2. Evidence: the association statistics and popularity learned from those training histories
   only (an `EvidenceSource`, injected: the stream processor's fold, which the workers may
   not import), so no validation target is ever in the evidence it is validated with.
3. Optional fitted parts, on the training histories: a user encoder (`user_encoder_step`,
   pluggable) and, offline only, an item adapter (`item_step`: it changes the indexed
   vectors).
4. Blend weights: coordinate search from the current weights, vectorised (`search.py`).
5. Learned ranker (`ranker_step.py`): a model re-ordering the blend's best candidates,
   cross-fitted on the validation users and kept only when it wins on users it was not
   trained on.
6. Validation: the candidate and the current model ranked by the live core
   (`workers.ranking.recommend`, with the live MMR lambda) on the same targets: what is
   validated is what would be served. The caller swaps only when the candidate wins.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.ranking import BlendWeights, Reranker

from .bundle import ItemAdapterFit, ModelBundle, UserEncoder
from .offline import (
    Evidence,
    History,
    ItemSpace,
    UserVectors,
    VectorInputs,
    ndcg_at,
    pooled_vectors,
    rank_offline,
    search_inputs,
    user_matrix,
)
from .ranker_step import fit_ranker
from .search import GRID, BlendSearch, Features, coordinate_search, searched_grid
from .split import ValidationSplit, split_histories

logger = logging.getLogger(__name__)

# Coordinate-search rounds: the second round rarely moves more than one weight, a third
# almost never (both shipped data sets); each round is ~30 settings.
ROUNDS = 2
# Vector-search candidates per user, as `RecommenderSettings.candidates`.
CANDIDATES = 100
# Relative validation gain a user encoder must bring over the pooled vectors to be kept: the
# search picks the best of many settings on the same targets, so vectors that carry nothing
# still "win" by a hair (selection noise), and the encoder costs a forward pass per batch.
ENCODER_MIN_GAIN = 0.01


class FitError(RuntimeError):
    """The histories cannot be fitted on (no validation target, no items)."""


@dataclass(frozen=True)
class TrainingData:
    """What a fitted part may learn from: the histories with their validation targets (and
    everything after them) removed, and the item vectors."""

    histories: Mapping[str, History]
    items: ItemSpace


EvidenceSource = Callable[[Mapping[str, History]], Evidence]
UserEncoderStep = Callable[[TrainingData], UserEncoder]
ItemStep = Callable[[TrainingData], ItemAdapterFit]


@dataclass
class FitResult:
    """A fit's candidate, its validation NDCG@k and the current model's on the same targets
    (both ranked by the live core), per-phase seconds and the search trace."""

    candidate: ModelBundle
    score: float
    current: ModelBundle
    current_score: float
    users: int
    timings: dict[str, float]
    trace: list[dict[str, object]] = field(default_factory=list)

    def wins(self, min_gain: float = 0.0) -> bool:
        """The candidate beats the current model on validation (by more than `min_gain`)."""
        return self.score > self.current_score + min_gain

    def chosen(self, min_gain: float = 0.0) -> ModelBundle:
        """The candidate if it wins, else the current model."""
        return self.candidate if self.wins(min_gain) else self.current


class Validation:
    """A split with its evidence and item vectors: ranks a bundle's validation users with
    the live core, caching the user vectors and exact hits per user-vector setting."""

    def __init__(
        self,
        split: ValidationSplit,
        evidence: Evidence,
        items: ItemSpace,
        *,
        k: int,
        candidates: int,
        mmr_lambda: float,
    ) -> None:
        self.split = split
        self.evidence = evidence
        self.items = items
        self.k = k
        self.candidates = candidates
        self.mmr_lambda = mmr_lambda
        self.histories = [c.history for c in split.cases]
        self.targets = [c.target for c in split.cases]
        # Per user-vector setting: its exact hits (~12 bytes a hit, searched once: the search
        # is most of the cost) and, for the last two settings, its user vectors (one row a
        # user, rebuilt cheaply when needed again).
        self._hits: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
        self._users_of: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def with_items(self, items: ItemSpace) -> Validation:
        """The same targets and evidence over other item vectors (an adapter's)."""
        return Validation(
            self.split,
            self.evidence,
            items,
            k=self.k,
            candidates=self.candidates,
            mmr_lambda=self.mmr_lambda,
        )

    def key(self, weights: BlendWeights, encoder: UserEncoder | None = None) -> Hashable:
        """What the user vectors of these weights depend on (None: no vector term)."""
        if weights.vector <= 0:
            return None
        if encoder is not None:
            return ("encoder", encoder.name, encoder.version)
        return ("pooled", weights.pool_recency, weights.weight_exponent, weights.max_sources)

    def _users(self, weights: BlendWeights, encoder: UserEncoder | None) -> UserVectors:
        if encoder is None:
            return pooled_vectors(self.items, weights)
        vectors = self.items.vectors

        def encoded(histories: Sequence[History]) -> list[Any]:
            return encoder.user_vectors(histories, vectors)

        return encoded

    def inputs(
        self, weights: BlendWeights, encoder: UserEncoder | None = None
    ) -> VectorInputs | None:
        """User vectors and exact hits for these weights (None: no vector term)."""
        key = self.key(weights, encoder)
        if key is None:
            return None
        users = self._users_of.get(key)
        if users is None:
            vectors = self._users(weights, encoder)(self.histories)
            users = self._users_of[key] = user_matrix(vectors, self.items.matrix.shape[1])
            while len(self._users_of) > 2:
                self._users_of.popitem(last=False)
        else:
            self._users_of.move_to_end(key)
        found = self._hits.get(key)
        if found is None:
            searched = search_inputs(self.histories, self.items, users, top=self.candidates)
            found = self._hits[key] = (searched.rows, searched.cos)
        return VectorInputs(users=users, rows=found[0], cos=found[1], ids=self.items.ids)

    def lists(
        self,
        bundle: ModelBundle,
        *,
        users: Sequence[int] | np.ndarray | None = None,
        reranker: Reranker | None = None,
    ) -> list[list[str]]:
        """Every validation user's (or these users') top k as the live core ranks it with
        `bundle` (and `reranker`, default: the bundle's learned ranker)."""
        inputs = self.inputs(bundle.weights, bundle.user_encoder)
        picked = range(len(self.histories)) if users is None else [int(u) for u in users]
        hits = None if inputs is None else inputs.hits
        return rank_offline(
            [self.histories[u] for u in picked],
            evidence=self.evidence,
            available=self.items.available,
            weights=bundle.weights,
            k=self.k,
            mmr_lambda=self.mmr_lambda,
            user_vectors=None if inputs is None else inputs.users[list(picked)],
            hits=None if hits is None else [hits[u] for u in picked],
            item_vectors=self.items.vectors,
            reranker=reranker if reranker is not None else bundle.ranker,
        )

    def score(self, bundle: ModelBundle, users: Sequence[int] | np.ndarray | None = None) -> float:
        """Validation NDCG@k of `bundle` (over every user, or these), ranked by the core."""
        targets = self.targets if users is None else [self.targets[int(u)] for u in users]
        return ndcg_at(self.lists(bundle, users=users), targets, self.k)


def prepare_validation(
    histories: Mapping[str, History],
    items: ItemSpace,
    *,
    evidence: EvidenceSource,
    k: int = 10,
    candidates: int = CANDIDATES,
    mmr_lambda: float = 1.0,
    timings: dict[str, float] | None = None,
) -> Validation:
    """Split the histories and learn the evidence from their training part only."""
    clock = _Clock(timings if timings is not None else {})
    split = split_histories(histories)
    clock.lap("split")
    if not split.cases:
        msg = (
            f"no validation target among {len(histories)} histories "
            f"({dict(split.skipped) or 'none'}): a fit needs users with a new positive item"
        )
        raise FitError(msg)
    learned = evidence(split.training)
    clock.lap("evidence")
    return Validation(split, learned, items, k=k, candidates=candidates, mmr_lambda=mmr_lambda)


def fit(
    histories: Mapping[str, History],
    items: ItemSpace,
    *,
    evidence: EvidenceSource,
    current: ModelBundle | None = None,
    k: int = 10,
    candidates: int = CANDIDATES,
    mmr_lambda: float = 1.0,
    rounds: int = ROUNDS,
    grid: Mapping[str, Sequence[float]] = GRID,
    user_encoder_step: UserEncoderStep | None = None,
    item_step: ItemStep | None = None,
    learned_ranker: bool = True,
) -> FitResult:
    """Fit a model bundle on `histories` (most recent first, as on `profile-updates`) and
    validate it against `current` (default: the built-in weights) on the held-out targets.

    `evidence` learns the association evidence from the training histories it is handed;
    `user_encoder_step` may fit a user encoder on them (its vectors replace the pooled ones
    when that wins on validation); `item_step` (offline only) an item adapter, kept only when
    it wins; `learned_ranker`: cross-fit a learned ranker over the chosen blend
    (`ranker_step.py`), kept only when it wins on users it was not trained on."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cpu = time.process_time()
    current = current or ModelBundle()
    validation = prepare_validation(
        histories,
        items,
        evidence=evidence,
        k=k,
        candidates=candidates,
        mmr_lambda=mmr_lambda,
        timings=timings,
    )
    clock = _Clock(timings)
    training = TrainingData(validation.split.training, items)
    encoder = user_encoder_step(training) if user_encoder_step is not None else None
    if user_encoder_step is not None:
        clock.lap("user_encoder")
    start = current.weights.model_copy(update={"fitted_on": None})
    # The user vector's recency is searched on its own, so that searching `recency` (the
    # co-occurrence evidence's) does not move the vector hits.
    start = start.model_copy(update={"vector_recency": start.pool_recency})
    search = BlendSearch(
        validation.split.cases,
        validation.evidence,
        ids=items.ids,
        available=items.available,
        k=k,
        weights=start,
    )
    clock.lap("association")
    best, best_score, trace = _search(
        search, validation, start=start, grid=grid, rounds=rounds, encoder=None, clock=clock
    )
    if encoder is not None:
        # The encoder's vectors replace the pooled ones only where that wins on validation:
        # the search from the pooled optimum, with the encoder's user vectors.
        e_best, e_score, e_trace = _search(
            search, validation, start=best, grid=grid, rounds=rounds, encoder=encoder, clock=clock
        )
        trace += [{**row, "user_encoder": True} for row in e_trace]
        logger.info("fit user encoder ndcg_search=%.5f pooled=%.5f", e_score, best_score)
        if e_score > best_score * (1.0 + ENCODER_MIN_GAIN):
            best, best_score = e_best, e_score
        else:
            encoder = None
    adapter: ItemAdapterFit | None = None
    frozen = validation
    if item_step is not None:
        fitted = item_step(training)
        clock.lap("item_adapter")
        adapted = validation.with_items(items.with_matrix(fitted.matrix))
        a_best, a_score, a_trace = _search(
            search, adapted, start=best, grid=grid, rounds=rounds, encoder=encoder, clock=clock
        )
        trace += [{**row, "adapter": True} for row in a_trace]
        logger.info("fit item adapter ndcg_search=%.5f frozen=%.5f", a_score, best_score)
        if a_score > best_score:
            best, best_score, adapter, validation = a_best, a_score, fitted, adapted
    candidate = ModelBundle(weights=best, user_encoder=encoder, item_adapter=adapter)
    compared: np.ndarray | None = None  # the users both models are scored on (None: all)
    if learned_ranker:
        found = fit_ranker(validation, candidate)
        clock.lap("ranker")
        everyone = len(found.users) == len(validation.targets)
        if found.ranker is not None:
            # Its cross-fitted score, on the users it was cross-fitted on (the current model is
            # scored on the same ones): its own validation lists would flatter it.
            score = found.cross_score
            compared = None if everyone else found.users
            candidate = ModelBundle(
                weights=best, user_encoder=encoder, item_adapter=adapter, ranker=found.ranker
            )
        else:
            score = found.blend_score if everyone else validation.score(candidate)
            clock.lap("validate")
    else:
        score = validation.score(candidate)
        clock.lap("validate")
    same = (
        candidate.version == current.version
        and candidate.item_adapter is current.item_adapter
        and candidate.ranker is None
    )
    current_score = score if same else _current_score(frozen, current, compared)
    clock.lap("validate_current")
    timings["total"] = time.perf_counter() - started
    # CPU seconds of the whole process (every thread): what the fit costs whatever else
    # shares the machine.
    timings["cpu"] = time.process_time() - cpu
    candidate = ModelBundle(
        weights=best.model_copy(
            update={
                "fitted_on": {
                    "split": "validation = each user's latest new positive item",
                    "users": len(validation.split.cases) if compared is None else len(compared),
                    "k": k,
                    "mmr_lambda": mmr_lambda,
                    "ndcg": round(score, 5),
                    "ndcg_search": round(best_score, 5),
                    "current": current.version,
                    "ndcg_current": round(current_score, 5),
                    "evaluations": len(trace),
                    "adapter": adapter is not None,
                    "user_encoder": None if encoder is None else encoder.name,
                    "ranker": candidate.ranker is not None,
                }
            }
        ),
        user_encoder=encoder,
        item_adapter=adapter,
        ranker=candidate.ranker,
    )
    logger.info(
        "fit users=%d ndcg=%.5f current=%s ndcg_current=%.5f seconds=%s",
        len(validation.split.cases),
        score,
        current.version,
        current_score,
        " ".join(f"{phase}={sec:.1f}" for phase, sec in timings.items()),
    )
    return FitResult(
        candidate=candidate,
        score=score,
        current=current,
        current_score=current_score,
        users=len(validation.split.cases),
        timings=timings,
        trace=trace,
    )


def _current_score(
    frozen: Validation, current: ModelBundle, users: np.ndarray | None = None
) -> float:
    """The current model's validation NDCG (over every user, or these), over the vectors it
    serves: the frozen ones, or its own adapter's."""
    adapter = current.item_adapter
    if adapter is not None and adapter.matrix.shape == frozen.items.matrix.shape:
        return frozen.with_items(frozen.items.with_matrix(adapter.matrix)).score(current, users)
    return frozen.score(current, users)


def _search(
    search: BlendSearch,
    validation: Validation,
    *,
    start: BlendWeights,
    grid: Mapping[str, Sequence[float]],
    rounds: int,
    encoder: UserEncoder | None,
    clock: _Clock,
) -> tuple[BlendWeights, float, list[dict[str, object]]]:
    """The coordinate search over `validation`'s item vectors."""
    cache: OrderedDict[Hashable, Features] = OrderedDict()
    built = 0.0

    def features_of(weights: BlendWeights) -> Features:
        nonlocal built
        key = validation.key(weights, encoder)
        found = cache.get(key)
        if found is None:
            mark = time.perf_counter()
            found = cache[key] = search.features(
                validation.inputs(weights, encoder), validation.items
            )
            built += time.perf_counter() - mark
            while len(cache) > 2:
                search.forget(cache.popitem(last=False)[1])
        else:
            cache.move_to_end(key)
        return found

    mark = time.perf_counter()
    grid = searched_grid(grid, present=search.present_kinds(), vectors=True)
    if encoder is not None:
        # The user vector is the encoder's: the pooling's recency does not move it.
        grid = {name: values for name, values in grid.items() if name != "vector_recency"}
    found = coordinate_search(search, features_of, start=start, grid=grid, rounds=rounds)
    for f in cache.values():
        search.forget(f)
    clock.add("features", built)
    clock.add("search", time.perf_counter() - mark - built)
    clock.mark = time.perf_counter()
    return found


class _Clock:
    """Seconds per phase, into `timings` (a phase met twice adds up)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.mark = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.add(phase, now - self.mark)
        self.mark = now
        logger.info("fit phase=%s seconds=%.1f", phase, self.timings[phase])
