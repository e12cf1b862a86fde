"""The blend search of `relata train`, vectorised: every validation user's candidates and
their features are computed once, and each weight setting is applied to all of them at once
with numpy, instead of running the ranking core per setting (minutes per setting on long
histories).

The features are the core's own terms (`workers.ranking.evidence_rows`: the same sources,
neighbour rows, values and masks): per candidate, its association evidence rows (kind, source
position, value), its scaled cosine with the user vector, its popularity prior. A setting's
score of a candidate is then, as in `workers.ranking.score`,

    sum over rows of kind weight x recency share x value
    + vector x max(floor, scaled cosine) ** sharpness + (popularity + 1e-6) x prior,

with ties broken on item id. Settings that change the user vector (`vector_recency`) build a
new set of vector features. The search's best setting is checked with the core itself
(`relata.lab.evaluate.rank_users`): the NDCG it reports is the core's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from relata.lab.protocol import Prepared
from relata.lab.vectors import VectorInputs, pooled_inputs
from schemas import vocabulary
from workers.ranking import BlendWeights, evidence_rows

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def _sequence_kinds() -> npt.NDArray[np.bool_]:
    return np.array(
        [
            vocabulary.relation_kind(kind).signal == "sequence"
            for kind in vocabulary.relation_kinds()
        ],
        dtype=np.bool_,
    )


@dataclass
class _UserRows:
    """One user's association evidence before weights, item ids resolved."""

    ids: list[str]  # candidate ids of the rows' `cand`
    cand: I64
    kind: I64
    pos: I64
    value: F64
    source_base: F64  # per source position


@dataclass
class Features:
    """Every validation user's candidates, stacked: rows of users, in user order."""

    n_users: int
    row_user: I64
    target_row: I64  # per user: the row of its target among its candidates, -1 if absent
    before_target: npt.NDArray[np.bool_]  # the row's item id sorts before its user's target
    prior: F64  # popularity prior without its weight
    scaled: F64  # (cos - weakest hit) / (best hit - weakest hit); 0 where not counted
    has_vector: npt.NDArray[np.bool_]  # the row takes a vector term (a hit or evidence)
    a_row: I64
    a_user: I64
    a_kind: I64
    a_pos: I64
    a_base: F64
    a_value: F64
    s_user: I64
    s_pos: I64
    s_base: F64


class BlendSearch:
    """Features of a prepared validation split, built once per user vector, scored many times."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        k: int,
        candidates: int,
        weights: BlendWeights,
        user_vectors: Callable[[np.ndarray, BlendWeights], VectorInputs] | None = None,
    ) -> None:
        self.prepared = prepared
        # The user vectors and their hits for an item matrix and weights (default: pooled).
        self.user_vectors = user_vectors
        self.k = k
        self.candidates = candidates
        self.sequence = _sequence_kinds()
        state = prepared.state
        # Every behaviour kind on: the rows of all of them, weighted per setting.
        unit = weights.with_kind_weights(lambda spec: 1.0 if spec.behaviour else 0.0)
        self.users: list[_UserRows | None] = []
        for case in prepared.split.cases:
            sources, rows = evidence_rows(state.profiles[case.user_id], state.related, unit)
            if rows is None:
                self.users.append(None)
                continue
            uniq, inverse = np.unique(rows.idx, return_inverse=True)
            base = np.array([sw for _, sw in sources], dtype=np.float64)
            self.users.append(
                _UserRows(
                    ids=state.related.names(uniq.tolist()),
                    cand=inverse.astype(np.int64),
                    kind=rows.kinds.astype(np.int64),
                    pos=rows.source.astype(np.int64),
                    value=rows.values,
                    source_base=base,
                )
            )
        top = state.popularity[0][1] if state.popularity else 0.0
        denom = math.log1p(top) if top > 0 else 1.0
        self.prior_of = {i: math.log1p(max(c, 0.0)) / denom for i, c in state.popularity}
        self._features: dict[tuple[int, float], Features] = {}
        self._terms: dict[tuple[object, ...], F64] = {}
        self._all_available = set(prepared.item_ids) <= state.available

    def vectors(self, matrix: np.ndarray, weights: BlendWeights) -> VectorInputs:
        """The user vectors (pooled as `weights` say, or `user_vectors`') and their exact
        hits (not kept: features are built from them once, and their lists of hits are the
        bulk of the memory)."""
        if self.user_vectors is not None:
            return self.user_vectors(matrix, weights)
        return pooled_inputs(self.prepared, matrix, weights, top=self.candidates)

    def use_vectors(
        self, user_vectors: Callable[[np.ndarray, BlendWeights], VectorInputs] | None
    ) -> None:
        """Search with other user vectors from now on (None: pooled)."""
        self.user_vectors = user_vectors
        self.forget()

    def forget(self) -> None:
        """Drop the features built so far (a search over other item vectors follows)."""
        self._features.clear()
        self._terms.clear()

    def features(self, matrix: np.ndarray | None, weights: BlendWeights) -> Features:
        """The stacked candidates and features for the user vectors `weights` pool (none
        without item vectors)."""
        key = (0 if matrix is None else id(matrix), weights.pool_recency)
        found = self._features.get(key)
        if found is None:
            vin = None if matrix is None else self.vectors(matrix, weights)
            found = self._features[key] = self._build(vin)
        return found

    def _build(self, vin: VectorInputs | None) -> Features:
        prepared, state = self.prepared, self.prepared.state
        popularity = state.popularity
        available = state.available
        cols: dict[str, list[np.ndarray]] = {
            k: []
            for k in (
                "row_user",
                "before",
                "prior",
                "scaled",
                "has_vector",
                "a_row",
                "a_user",
                "a_kind",
                "a_pos",
                "a_base",
                "a_value",
                "s_user",
                "s_pos",
                "s_base",
            )
        }
        target_row = np.full(len(prepared.split.cases), -1, dtype=np.int64)
        offset = 0
        for u, case in enumerate(prepared.split.cases):
            rows = self.users[u]
            banned = {e.item_id for e in state.profiles[case.user_id]}
            ids: list[str] = [] if rows is None else list(rows.ids)
            where = {i: n for n, i in enumerate(ids)}
            n_assoc = len(ids)
            hits = [] if vin is None else vin.hits[u]
            for item_id, _ in hits:
                if item_id not in where:
                    where[item_id] = len(ids)
                    ids.append(item_id)
            n_scored = len(ids)
            # The popularity fill: the first k unseen items that nothing else proposes.
            fill = 0
            for item_id, _ in popularity:
                if fill >= self.k:
                    break
                if item_id in banned or item_id in where:
                    continue
                where[item_id] = len(ids)
                ids.append(item_id)
                fill += 1
            keep = (
                np.ones(len(ids), dtype=np.bool_)
                if self._all_available
                else np.fromiter((i in available for i in ids), dtype=np.bool_, count=len(ids))
            )
            scaled = np.zeros(len(ids), dtype=np.float64)
            has_vector = np.zeros(len(ids), dtype=np.bool_)
            if hits and vin is not None:
                cos = np.array([c for _, c in hits], dtype=np.float64)
                hi, lo = float(cos.max()), float(cos.min())
                if len(cos) == 1 or hi - lo <= 1e-9:
                    lo = hi - 1.0
                rows_of = [vin.items.rows[i] for i in ids[:n_scored]]
                all_cos = vin.items.matrix[rows_of] @ vin.users[u]
                scaled[:n_scored] = (all_cos.astype(np.float64) - lo) / (hi - lo)
                hit_rows = [where[i] for i, _ in hits]
                scaled[hit_rows] = (cos - lo) / (hi - lo)  # the search's own cosines
                has_vector[:n_scored] = True
            # Drop unavailable candidates (the core keeps its k among available ones).
            new_index = np.cumsum(keep) - 1
            count = int(keep.sum())
            kept_ids = [i for i, ok in zip(ids, keep, strict=True) if ok]
            cols["row_user"].append(np.full(count, u, dtype=np.int64))
            cols["before"].append(np.array([i < case.target for i in kept_ids], dtype=np.bool_))
            cols["prior"].append(np.array([self.prior_of.get(i, 0.0) for i in kept_ids]))
            cols["scaled"].append(scaled[keep])
            cols["has_vector"].append(has_vector[keep])
            if case.target in where and keep[where[case.target]]:
                target_row[u] = offset + new_index[where[case.target]]
            if rows is not None and n_assoc:
                ok = keep[rows.cand]
                cols["a_row"].append(offset + new_index[rows.cand[ok]])
                cols["a_user"].append(np.full(int(ok.sum()), u, dtype=np.int64))
                cols["a_kind"].append(rows.kind[ok])
                cols["a_pos"].append(rows.pos[ok])
                cols["a_base"].append(rows.source_base[rows.pos[ok]])
                cols["a_value"].append(rows.value[ok])
                cols["s_user"].append(np.full(len(rows.source_base), u, dtype=np.int64))
                cols["s_pos"].append(np.arange(len(rows.source_base), dtype=np.int64))
                cols["s_base"].append(rows.source_base)
            offset += count

        def cat(name: str, dtype: type) -> np.ndarray:
            parts = cols[name]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        return Features(
            n_users=len(prepared.split.cases),
            row_user=cat("row_user", np.int64),
            target_row=target_row,
            before_target=cat("before", np.bool_),
            prior=cat("prior", np.float64),
            scaled=cat("scaled", np.float64),
            has_vector=cat("has_vector", np.bool_),
            a_row=cat("a_row", np.int64),
            a_user=cat("a_user", np.int64),
            a_kind=cat("a_kind", np.int64),
            a_pos=cat("a_pos", np.int64),
            a_base=cat("a_base", np.float64),
            a_value=cat("a_value", np.float64),
            s_user=cat("s_user", np.int64),
            s_pos=cat("s_pos", np.int64),
            s_base=cat("s_base", np.float64),
        )

    def _shares(self, f: Features, recency: float, sequence_recency: float) -> F64:
        """Per association row: its recency share (each signal's sources sum to 1) x value."""
        n = f.n_users
        co = np.bincount(f.s_user, recency**f.s_pos * f.s_base, minlength=n)
        seq = np.bincount(f.s_user, sequence_recency**f.s_pos * f.s_base, minlength=n)
        co[co == 0] = 1.0
        seq[seq == 0] = 1.0
        is_seq = self.sequence[f.a_kind]
        share = np.where(
            is_seq,
            sequence_recency**f.a_pos * f.a_base / seq[f.a_user],
            recency**f.a_pos * f.a_base / co[f.a_user],
        )
        return np.asarray(share * f.a_value, dtype=np.float64)

    def _cached(self, key: tuple[object, ...], make: Callable[[], F64]) -> F64:
        # A coordinate search mostly moves linear weights: the recency shares and the shaped
        # cosines of a setting are reused by every setting that shares them.
        found = self._terms.get(key)
        if found is None:
            if len(self._terms) >= 16:
                self._terms.clear()
            found = self._terms[key] = make()
        return found

    def _vector_term(self, f: Features, floor: float, sharpness: float) -> F64:
        scaled = np.maximum(floor, f.scaled)
        positive = scaled > 0
        scaled[positive] = scaled[positive] ** sharpness
        return np.asarray(np.where(f.has_vector, scaled, 0.0), dtype=np.float64)

    def ndcg(self, f: Features, weights: BlendWeights) -> float:
        """Mean NDCG@k of `weights` over the users of `f`, all at once."""
        kind_w = np.array(
            [weights.kind_weight(kind) for kind in vocabulary.relation_kinds()], dtype=np.float64
        )
        shares = self._cached(
            (id(f), "shares", weights.recency, weights.sequence_recency),
            lambda: self._shares(f, weights.recency, weights.sequence_recency),
        )
        contrib = shares * kind_w[f.a_kind]
        total: F64 = np.bincount(f.a_row, contrib, minlength=len(f.row_user)).astype(np.float64)
        if weights.vector > 0:
            term = self._cached(
                (id(f), "vector", weights.vector_floor, weights.vector_sharpness),
                lambda: self._vector_term(f, weights.vector_floor, weights.vector_sharpness),
            )
            total += weights.vector * term
        total += (weights.popularity + 1e-6) * f.prior
        found = f.target_row >= 0
        target_score = np.where(found, total[np.maximum(f.target_row, 0)], np.inf)
        mine = target_score[f.row_user]
        ahead = (total > mine) | ((total == mine) & f.before_target)
        rank = 1 + np.bincount(f.row_user, ahead.astype(np.float64), minlength=f.n_users)
        gain = np.where(found & (rank <= self.k), 1.0 / np.log2(rank + 1.0), 0.0)
        return float(gain.mean()) if f.n_users else 0.0


def coordinate_search(
    search: BlendSearch,
    matrix: np.ndarray | None,
    *,
    start: BlendWeights,
    grid: Mapping[str, Sequence[float]],
    rounds: int,
) -> tuple[BlendWeights, float, list[dict[str, object]]]:
    """Coordinate search over `grid` with the vectorised score: one parameter at a time, each
    value tried, the best kept; stops after a round without gain. Returns the best weights,
    their vectorised NDCG and the trace."""
    best = start
    best_score = search.ndcg(search.features(matrix, best), best)
    trace: list[dict[str, object]] = []
    for r in range(rounds):
        improved = False
        for name, values in grid.items():
            for value in values:
                if getattr(best, name) == value:
                    continue
                if name == "vector_sharpness" and best.vector == 0:
                    continue
                cand = best.model_copy(update={name: value})
                s = search.ndcg(search.features(matrix, cand), cand)
                trace.append({"round": r, name: value, "ndcg": s})
                if s > best_score + 1e-6:
                    best, best_score, improved = cand, s, True
        if not improved:
            break
    return best, best_score, trace
