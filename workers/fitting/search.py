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
# Popular items looked at for every user's fill at once, beyond k: enough that a user's history
# and candidates rarely leave fewer than k of them (the users they do are filled one by one).
FILL_PAD = 64
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


def _starts(sizes: I64) -> I64:
    """Each block's first position, blocks of `sizes` laid end to end."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _member(keys: I64, sorted_keys: I64) -> Bools:
    """Which keys are in `sorted_keys` (sorted)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=np.bool_)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.asarray(sorted_keys[at] == keys, dtype=np.bool_)


@dataclass
class Association:
    """Every user's association evidence before weights (independent of the user vector):
    per candidate its user and item (`gid`, in the search's item numbering), in each user's
    local order; per row its user, candidate (local to the user), kind, source position,
    source base weight and value; per source its user, position and base weight."""

    c_user: I64
    c_gid: I64
    n_cand: I64  # per user
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
    setting's part; `ndcg` scores a weight setting over all users at once.

    Items are numbered once (`gid`): the item space's rows first (those have vectors), then
    the other items the evidence names, so that a user-vector setting's candidates are built
    with array operations over all users, not a loop per user."""

    def __init__(
        self,
        cases: Sequence[ValidationCase],
        evidence: Evidence,
        *,
        ids: Sequence[str],
        available: frozenset[str],
        k: int,
        weights: BlendWeights,
    ) -> None:
        self.cases = cases
        self.evidence = evidence
        self.k = k
        self.sequence = _sequence_kinds()
        self.ids = list(ids)
        self.gid_of: dict[str, int] = {i: n for n, i in enumerate(self.ids)}
        self.n_vectors = len(self.ids)
        self.assoc = self._association(weights)
        pop = [self._gid(i) for i, _ in evidence.popularity]
        self.pop_gid = np.array(pop, dtype=np.int64)
        history = [(u, self._gid(e.item_id)) for u, c in enumerate(cases) for e in c.history]
        self.h_user = np.array([u for u, _ in history], dtype=np.int64)
        self.h_gid = np.array([g for _, g in history], dtype=np.int64)
        self.t_gid = np.array([self._gid(c.target) for c in cases], dtype=np.int64)
        # Per item: its prior (as `popularity_prior` without the weight), availability, and
        # its rank in item-id order (the core breaks score ties on the id).
        top = evidence.popularity[0][1] if evidence.popularity else 0.0
        denom = math.log1p(top) if top > 0 else 1.0
        self.prior = np.zeros(len(self.ids), dtype=np.float64)
        for (_, count), gid in zip(evidence.popularity, pop, strict=True):
            self.prior[gid] = math.log1p(max(count, 0.0)) / denom
        self.ok = np.fromiter((i in available for i in self.ids), dtype=np.bool_)
        self.id_rank = np.empty(len(self.ids), dtype=np.int64)
        self.id_rank[np.argsort(np.array(self.ids, dtype=object), kind="stable")] = np.arange(
            len(self.ids)
        )
        self._terms: dict[tuple[object, ...], F64] = {}

    def _gid(self, item_id: str) -> int:
        found = self.gid_of.get(item_id)
        if found is None:
            found = self.gid_of[item_id] = len(self.ids)
            self.ids.append(item_id)
        return found

    def _association(self, weights: BlendWeights) -> Association:
        related = self.evidence.related
        # Every behaviour kind on: the rows of all of them, weighted per setting.
        unit = weights.with_kind_weights(lambda spec: 1.0 if spec.behaviour else 0.0)
        cols: dict[str, list[np.ndarray]] = {
            name: [] for name in ("c_user", "c_gid", "user", "cand", "kind", "pos", "base", "value")
        }
        s_user: list[np.ndarray] = []
        s_pos: list[np.ndarray] = []
        s_base: list[np.ndarray] = []
        n_cand = np.zeros(len(self.cases), dtype=np.int64)
        for u, case in enumerate(self.cases):
            sources, rows = evidence_rows(case.history, related, unit)
            if rows is None:
                continue
            uniq, inverse = np.unique(rows.idx, return_inverse=True)
            base = np.array([sw for _, sw in sources], dtype=np.float64)
            gids = [self._gid(i) for i in related.names(uniq.tolist())]
            n_cand[u] = len(gids)
            cols["c_user"].append(np.full(len(gids), u, dtype=np.int64))
            cols["c_gid"].append(np.array(gids, dtype=np.int64))
            pos = rows.source.astype(np.int64)
            cols["user"].append(np.full(len(pos), u, dtype=np.int64))
            cols["cand"].append(inverse.astype(np.int64).reshape(-1))
            cols["kind"].append(rows.kinds.astype(np.int64))
            cols["pos"].append(pos)
            cols["base"].append(base[pos])
            cols["value"].append(rows.values)
            s_user.append(np.full(len(base), u, dtype=np.int64))
            s_pos.append(np.arange(len(base), dtype=np.int64))
            s_base.append(base)
        return Association(
            c_user=_cat(cols["c_user"], np.int64),
            c_gid=_cat(cols["c_gid"], np.int64),
            n_cand=n_cand,
            a_user=_cat(cols["user"], np.int64),
            a_cand=_cat(cols["cand"], np.int64),
            a_kind=_cat(cols["kind"], np.int64),
            a_pos=_cat(cols["pos"], np.int64),
            a_base=_cat(cols["base"], np.float64),
            a_value=_cat(cols["value"], np.float64),
            s_user=_cat(s_user, np.int64),
            s_pos=_cat(s_pos, np.int64),
            s_base=_cat(s_base, np.float64),
        )

    def features(self, inputs: VectorInputs | None, items: ItemSpace | None) -> Features:
        """The candidate rows for one set of user vectors and their exact hits (None: no
        vector term, association and popularity only)."""
        n = len(self.cases)
        span = len(self.ids) + 1  # keys (user, item) as user * span + gid
        a = self.assoc
        assoc_keys = np.sort(a.c_user * span + a.c_gid)
        # Vector hits that are not association candidates, in hit order.
        if inputs is not None and inputs.rows.size:
            if items is None or list(items.ids) != self.ids[: self.n_vectors]:
                raise ValueError("features need the item space the search was built for")
            valid = inputs.rows >= 0
            h_user = np.broadcast_to(np.arange(n)[:, None], inputs.rows.shape)[valid]
            h_gid = inputs.rows[valid]
            h_pos = np.broadcast_to(np.arange(inputs.rows.shape[1]), inputs.rows.shape)[valid]
            h_cos = inputs.cos[valid].astype(np.float64)
            extra = ~_member(h_user * span + h_gid, assoc_keys)
        else:
            h_user = h_gid = h_pos = np.zeros(0, dtype=np.int64)
            h_cos = np.zeros(0, dtype=np.float64)
            extra = np.zeros(0, dtype=np.bool_)
        f_user, f_gid, f_pos = self._fill(n, span, assoc_keys, h_user * span + h_gid)
        # Rows in order: user, then block (association, extra hits, fill), then position.
        users = np.concatenate([a.c_user, h_user[extra], f_user])
        gids = np.concatenate([a.c_gid, h_gid[extra], f_gid])
        block = np.concatenate(
            [
                np.zeros(len(a.c_user), dtype=np.int64),
                np.ones(int(extra.sum()), dtype=np.int64),
                np.full(len(f_user), 2, dtype=np.int64),
            ]
        )
        local = np.concatenate(
            [
                np.arange(len(a.c_user), dtype=np.int64) - np.repeat(_starts(a.n_cand), a.n_cand),
                h_pos[extra],
                f_pos,
            ]
        )
        order = np.lexsort((local, block, users))
        row_user, row_gid, row_block = users[order], gids[order], block[order]
        sizes = np.bincount(row_user, minlength=n).astype(np.int64)
        offsets = _starts(sizes)
        is_target = row_gid == self.t_gid[row_user]
        ok = self.ok[row_gid]
        target_row = np.full(n, -1, dtype=np.int64)
        hit = np.flatnonzero(is_target & ok)
        target_row[row_user[hit]] = hit
        scaled = np.zeros(len(row_user), dtype=np.float64)
        has_vector = np.zeros(len(row_user), dtype=np.bool_)
        if inputs is not None and items is not None and len(h_user):
            self._vector_part(
                inputs,
                items,
                (h_user, h_gid, h_cos),
                (row_user, row_gid, row_block, offsets),
                span,
                scaled,
                has_vector,
            )
        t_rank = np.where(self.t_gid >= 0, self.id_rank[np.maximum(self.t_gid, 0)], -1)
        return Features(
            n_users=n,
            row_user=row_user,
            a_row=offsets[a.a_user] + a.a_cand,
            target_row=target_row,
            before_target=self.id_rank[row_gid] < t_rank[row_user],
            ok=ok,
            prior=self.prior[row_gid],
            scaled=scaled,
            has_vector=has_vector,
        )

    def _fill(self, n: int, span: int, assoc_keys: I64, hit_keys: I64) -> tuple[I64, I64, I64]:
        """Per user the first k popular items that are neither history nor candidates (the
        core fills more, but those rank below these k and never reach the top k)."""
        taken = np.sort(np.concatenate([assoc_keys, hit_keys, self.h_user * span + self.h_gid]))
        depth = min(len(self.pop_gid), self.k + FILL_PAD)
        pool = self.pop_gid[:depth]
        keys = np.arange(n, dtype=np.int64)[:, None] * span + pool[None, :]
        free = ~_member(keys.ravel(), taken).reshape(keys.shape)
        pick = free & (np.cumsum(free, axis=1) <= self.k)
        users, cols = np.nonzero(pick)
        gids = pool[cols]
        short = np.flatnonzero(pick.sum(axis=1) < min(self.k, len(self.pop_gid)))
        if depth < len(self.pop_gid) and len(short):
            more_u, more_g, more_c = [users], [gids], [cols]
            rest = self.pop_gid[depth:]
            for u in short.tolist():
                free_rest = ~_member(u * span + rest, taken)
                at = np.flatnonzero(free_rest)[: self.k - int(pick[u].sum())]
                more_u.append(np.full(len(at), u, dtype=np.int64))
                more_g.append(rest[at])
                more_c.append(depth + at)
            users, gids, cols = (np.concatenate(x) for x in (more_u, more_g, more_c))
        return users.astype(np.int64), gids.astype(np.int64), cols.astype(np.int64)

    @staticmethod
    def _vector_part(
        inputs: VectorInputs,
        items: ItemSpace,
        hits: tuple[I64, I64, F64],
        rows: tuple[I64, I64, I64, I64],
        span: int,
        scaled: F64,
        has_vector: Bools,
    ) -> None:
        """Scaled cosines, as the core computes them: a hit's from the search; another
        candidate's (with a vector) from one product with the user vector; both against the
        user's best and weakest hit."""
        h_user, h_gid, h_cos = hits
        row_user, row_gid, row_block, offsets = rows
        n = len(offsets)
        counts = np.bincount(h_user, minlength=n)
        with_hits = counts > 0
        hi = np.where(with_hits, inputs.cos[:, 0], 0.0).astype(np.float64)
        lo = np.where(with_hits, inputs.cos[np.arange(n), np.maximum(counts - 1, 0)], 0.0).astype(
            np.float64
        )
        lo = np.where((counts == 1) | (hi - lo <= 1e-9), hi - 1.0, lo)
        # One product per user over its candidates with a vector (the core's, row for row).
        vectors = (row_block < 2) & with_hits[row_user] & (row_gid < len(items.ids))
        ends = offsets + np.bincount(row_user, minlength=n)
        for u in np.flatnonzero(with_hits).tolist():
            at = np.flatnonzero(vectors[offsets[u] : ends[u]]) + offsets[u]
            if len(at):
                cos = items.matrix[row_gid[at]] @ inputs.users[u]
                scaled[at] = (cos.astype(np.float64) - lo[u]) / (hi[u] - lo[u])
                has_vector[at] = True
        # The hits keep the search's own cosines (a hit may be a behaviour candidate too).
        row_keys = row_user * span + row_gid
        by_key = np.argsort(row_keys, kind="stable")
        at = by_key[np.searchsorted(row_keys[by_key], h_user * span + h_gid)]
        scaled[at] = (h_cos.astype(np.float64) - lo[h_user]) / (hi[h_user] - lo[h_user])
        has_vector[at] = True

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
        total += weights.prior_weight * f.prior
        total[~f.ok] = -np.inf
        found = f.target_row >= 0
        target_score = np.full(f.n_users, np.inf)
        target_score[found] = total[f.target_row[found]]
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
