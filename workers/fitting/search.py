"""The blend search, vectorised: every validation user's candidates and their features are
computed once, and each weight setting is applied to all of them at once with numpy, instead
of running the ranking core per setting (minutes per setting on long histories).

The features are the core's own terms (`workers.ranking.evidence_rows`: the same sources,
neighbour rows, values and masks): per candidate, its association evidence rows (kind, source
position, value), its scaled cosine with the user vector, its popularity prior. A setting's
score of a candidate is then, as in `workers.ranking.score`,

    sum over rows of kind weight x recency share x value
    + vector x max(floor, scaled cosine) ** sharpness + (popularity + 1e-6) x prior,

with ties broken on item id, and unavailable candidates never ranked. The association part
does not depend on the user vector and is built once; settings that change the user vector
(`vector_recency`) build only a new vector part. The search scores without diversity
re-ranking (MMR is a sequential choice per list); the fit's validation ranks the chosen
setting with the core itself, MMR included (`workers.fitting.procedure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas import vocabulary
from workers.ranking import BlendWeights, evidence_rows

from .offline import Evidence, ItemSpace, VectorInputs
from .split import ValidationCase

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

# The values the coordinate search tries per weight: ranges that hold for the shipped data sets
# and leave room either side (kind weights x0.5..x2 around 1; transitions are probabilities,
# kNN cosines smaller, so `next_item` starts at 3 and may stay there).
GRID: dict[str, tuple[float, ...]] = {
    "vector": (0.0, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4),
    "next_item": (0.5, 1.0, 2.0),
    "also_bought": (0.5, 1.0, 2.0),
    "bought_together": (0.5, 1.0, 2.0),
    "also_viewed": (0.5, 1.0, 2.0),
    "popularity": (0.0, 0.01, 0.03, 0.1),
    "recency": (0.5, 0.7, 0.85),
    "sequence_recency": (0.3, 0.5, 0.7),
    "vector_sharpness": (1.0, 2.0),
    "vector_recency": (0.3, 0.5, 0.7, 0.85),
}
# The weights that act through the user vector: not searched without item vectors.
VECTOR_WEIGHTS = frozenset({"vector", "vector_sharpness", "vector_recency"})


def _sequence_kinds() -> Bools:
    return np.array(
        [
            vocabulary.relation_kind(kind).signal == "sequence"
            for kind in vocabulary.relation_kinds()
        ],
        dtype=np.bool_,
    )


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


@dataclass
class Association:
    """Every user's association evidence before weights (independent of the user vector):
    per row its user, candidate (local to the user's block), kind, source position, source
    base weight and value; per source its user, position and base weight."""

    ids: list[list[str]]  # per user: the candidates the rows name, in local order
    a_user: I64
    a_cand: I64
    a_kind: I64
    a_pos: I64
    a_base: F64
    a_value: F64
    s_user: I64
    s_pos: I64
    s_base: F64


@dataclass
class Features:
    """One user-vector setting's candidate rows, stacked user by user (each user's block: its
    association candidates, then the other vector hits, then the popularity fill)."""

    n_users: int
    row_user: I64
    a_row: I64  # the association rows' candidate rows
    target_row: I64  # per user: the row of its target, -1 if absent or unavailable
    before_target: Bools  # the row's item id sorts before its user's target
    ok: Bools  # the row's item is available
    prior: F64  # popularity prior without its weight
    scaled: F64  # (cos - weakest hit) / (best hit - weakest hit)
    has_vector: Bools  # the row takes a vector term


class BlendSearch:
    """The association part of a validation split, built once; `features` adds a user-vector
    setting's part; `ndcg` scores a weight setting over all users at once."""

    def __init__(
        self,
        cases: Sequence[ValidationCase],
        evidence: Evidence,
        *,
        available: frozenset[str],
        k: int,
        weights: BlendWeights,
    ) -> None:
        self.cases = cases
        self.evidence = evidence
        self.available = available
        self.k = k
        self.sequence = _sequence_kinds()
        top = evidence.popularity[0][1] if evidence.popularity else 0.0
        denom = math.log1p(top) if top > 0 else 1.0
        self.prior_of = {i: math.log1p(max(c, 0.0)) / denom for i, c in evidence.popularity}
        self.assoc = self._association(weights)
        self._terms: dict[tuple[object, ...], F64] = {}

    def _association(self, weights: BlendWeights) -> Association:
        related = self.evidence.related
        # Every behaviour kind on: the rows of all of them, weighted per setting.
        unit = weights.with_kind_weights(lambda spec: 1.0 if spec.behaviour else 0.0)
        cols: dict[str, list[np.ndarray]] = {
            name: [] for name in ("user", "cand", "kind", "pos", "base", "value", "s_user")
        }
        s_pos: list[np.ndarray] = []
        s_base: list[np.ndarray] = []
        ids: list[list[str]] = []
        for u, case in enumerate(self.cases):
            sources, rows = evidence_rows(case.history, related, unit)
            if rows is None:
                ids.append([])
                continue
            uniq, inverse = np.unique(rows.idx, return_inverse=True)
            base = np.array([sw for _, sw in sources], dtype=np.float64)
            ids.append(related.names(uniq.tolist()))
            pos = rows.source.astype(np.int64)
            cols["user"].append(np.full(len(pos), u, dtype=np.int64))
            cols["cand"].append(inverse.astype(np.int64).reshape(-1))
            cols["kind"].append(rows.kinds.astype(np.int64))
            cols["pos"].append(pos)
            cols["base"].append(base[pos])
            cols["value"].append(rows.values)
            cols["s_user"].append(np.full(len(base), u, dtype=np.int64))
            s_pos.append(np.arange(len(base), dtype=np.int64))
            s_base.append(base)
        return Association(
            ids=ids,
            a_user=_cat(cols["user"], np.int64),
            a_cand=_cat(cols["cand"], np.int64),
            a_kind=_cat(cols["kind"], np.int64),
            a_pos=_cat(cols["pos"], np.int64),
            a_base=_cat(cols["base"], np.float64),
            a_value=_cat(cols["value"], np.float64),
            s_user=_cat(cols["s_user"], np.int64),
            s_pos=_cat(s_pos, np.int64),
            s_base=_cat(s_base, np.float64),
        )

    def features(self, inputs: VectorInputs | None, items: ItemSpace | None) -> Features:
        """The candidate rows for one set of user vectors and their hits (None: no vector
        term, association and popularity only)."""
        popularity = self.evidence.popularity
        available = self.available
        parts: dict[str, list[np.ndarray]] = {
            name: [] for name in ("before", "ok", "prior", "scaled", "has_vector")
        }
        sizes = np.zeros(len(self.cases), dtype=np.int64)
        local_target = np.full(len(self.cases), -1, dtype=np.int64)
        for u, case in enumerate(self.cases):
            ids = list(self.assoc.ids[u])
            where = {i: n for n, i in enumerate(ids)}
            hits = [] if inputs is None else inputs.hits[u]
            for item_id, _ in hits:
                if item_id not in where:
                    where[item_id] = len(ids)
                    ids.append(item_id)
            n_scored = len(ids)
            # The popularity fill: the first k unseen items that nothing else proposes (the
            # core fills more, but those rank below these k and never reach the top k).
            banned = {e.item_id for e in case.history}
            fill = 0
            for item_id, _ in popularity:
                if fill >= self.k:
                    break
                if item_id in banned or item_id in where:
                    continue
                where[item_id] = len(ids)
                ids.append(item_id)
                fill += 1
            scaled = np.zeros(len(ids), dtype=np.float64)
            has_vector = np.zeros(len(ids), dtype=np.bool_)
            if hits and inputs is not None and items is not None:
                cos = np.array([c for _, c in hits], dtype=np.float64)
                hi, lo = float(cos.max()), float(cos.min())
                if len(cos) == 1 or hi - lo <= 1e-9:
                    lo = hi - 1.0
                rows = items.rows
                found = [(n, rows[i]) for n, i in enumerate(ids[:n_scored]) if i in rows]
                if found:
                    at = np.array([n for n, _ in found], dtype=np.int64)
                    all_cos = items.matrix[[r for _, r in found]] @ inputs.users[u]
                    scaled[at] = (all_cos.astype(np.float64) - lo) / (hi - lo)
                    has_vector[at] = True
                hit_rows = [where[i] for i, _ in hits]
                scaled[hit_rows] = (cos - lo) / (hi - lo)  # the search's own cosines
                has_vector[hit_rows] = True
            ok = np.fromiter((i in available for i in ids), dtype=np.bool_, count=len(ids))
            target = where.get(case.target)
            if target is not None and ok[target]:
                local_target[u] = target
            sizes[u] = len(ids)
            parts["before"].append(np.array([i < case.target for i in ids], dtype=np.bool_))
            parts["ok"].append(ok)
            parts["prior"].append(np.array([self.prior_of.get(i, 0.0) for i in ids]))
            parts["scaled"].append(scaled)
            parts["has_vector"].append(has_vector)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return Features(
            n_users=len(self.cases),
            row_user=np.repeat(np.arange(len(self.cases), dtype=np.int64), sizes),
            a_row=offsets[self.assoc.a_user] + self.assoc.a_cand,
            target_row=np.where(local_target >= 0, offsets + local_target, -1),
            before_target=_cat(parts["before"], np.bool_),
            ok=_cat(parts["ok"], np.bool_),
            prior=_cat(parts["prior"], np.float64),
            scaled=_cat(parts["scaled"], np.float64),
            has_vector=_cat(parts["has_vector"], np.bool_),
        )

    def _shares(self, recency: float, sequence_recency: float) -> F64:
        """Per association row: its recency share (each signal's sources sum to 1) x value."""
        a, n = self.assoc, len(self.cases)
        co = np.bincount(a.s_user, recency**a.s_pos * a.s_base, minlength=n)
        seq = np.bincount(a.s_user, sequence_recency**a.s_pos * a.s_base, minlength=n)
        co[co == 0] = 1.0
        seq[seq == 0] = 1.0
        share = np.where(
            self.sequence[a.a_kind],
            sequence_recency**a.a_pos * a.a_base / seq[a.a_user],
            recency**a.a_pos * a.a_base / co[a.a_user],
        )
        return np.asarray(share * a.a_value, dtype=np.float64)

    def _cached(self, key: tuple[object, ...], make: Callable[[], F64]) -> F64:
        # A coordinate search mostly moves linear weights: the recency shares and the shaped
        # cosines of a setting are reused by every setting that shares them.
        found = self._terms.get(key)
        if found is None:
            if len(self._terms) >= 16:
                self._terms.clear()
            found = self._terms[key] = make()
        return found

    def forget(self, f: Features) -> None:
        """Drop the terms cached for `f` (its memory goes with it)."""
        for key in [key for key in self._terms if key[0] == id(f)]:
            del self._terms[key]

    @staticmethod
    def _vector_term(f: Features, floor: float, sharpness: float) -> F64:
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
            ("shares", weights.recency, weights.sequence_recency),
            lambda: self._shares(weights.recency, weights.sequence_recency),
        )
        contrib = shares * kind_w[self.assoc.a_kind]
        total: F64 = np.bincount(f.a_row, contrib, minlength=len(f.row_user)).astype(np.float64)
        if weights.vector > 0:
            term = self._cached(
                (id(f), "vector", weights.vector_floor, weights.vector_sharpness),
                lambda: self._vector_term(f, weights.vector_floor, weights.vector_sharpness),
            )
            total += weights.vector * term
        total += (weights.popularity + 1e-6) * f.prior
        total[~f.ok] = -np.inf
        found = f.target_row >= 0
        target_score = np.where(found, total[np.maximum(f.target_row, 0)], np.inf)
        mine = target_score[f.row_user]
        ahead = (total > mine) | ((total == mine) & f.before_target)
        rank = 1 + np.bincount(f.row_user, ahead.astype(np.float64), minlength=f.n_users)
        gain = np.where(found & (rank <= self.k), 1.0 / np.log2(rank + 1.0), 0.0)
        return float(gain.mean()) if f.n_users else 0.0

    def present_kinds(self) -> set[str]:
        """The relation kinds with evidence for some validation user."""
        kinds = vocabulary.relation_kinds()
        return {kinds[code] for code in np.unique(self.assoc.a_kind).tolist()}


def searched_grid(
    grid: Mapping[str, Sequence[float]], *, present: set[str], vectors: bool
) -> dict[str, Sequence[float]]:
    """The grid without what cannot matter: behaviour kinds without any evidence here (e.g.
    no sessions), and the vector weights without item vectors."""
    behaviour = vocabulary.behaviour_kinds()
    return {
        name: values
        for name, values in grid.items()
        if not (name in behaviour and name not in present)
        and not (name in VECTOR_WEIGHTS and not vectors)
    }


def coordinate_search(
    search: BlendSearch,
    features_of: Callable[[BlendWeights], Features],
    *,
    start: BlendWeights,
    grid: Mapping[str, Sequence[float]],
    rounds: int,
) -> tuple[BlendWeights, float, list[dict[str, object]]]:
    """Coordinate search over `grid` with the vectorised score: one parameter at a time, each
    value tried, the best kept; stops after a round without gain. Returns the best weights,
    their vectorised NDCG and the trace."""
    best = start
    best_score = search.ndcg(features_of(best), best)
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
                s = search.ndcg(features_of(cand), cand)
                trace.append({"round": r, name: value, "ndcg": s})
                if s > best_score + 1e-6:
                    best, best_score, improved = cand, s, True
        if not improved:
            break
    return best, best_score, trace
