"""Score one user's candidates: association evidence, vector similarity, popularity."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from schemas import vocabulary
from schemas.messages import HistoryEntry, RelatedItems

from .related import RelatedList, RelatedTable, gather, table_of
from .user_vector import pooled_user_vector, source_weights
from .weights import BlendWeights


def _kind_weights(w: BlendWeights) -> npt.NDArray[np.float64]:
    """The blend weight of each relation kind code."""
    return np.array([w.kind_weight(kind) for kind in vocabulary.relation_kinds()], dtype=np.float64)


def _sequence_kinds() -> npt.NDArray[np.bool_]:
    """True for each relation kind code whose signal is a sequence (item -> next item)."""
    return np.array(
        [
            vocabulary.relation_kind(kind).signal == "sequence"
            for kind in vocabulary.relation_kinds()
        ],
        dtype=np.bool_,
    )


def _neighbour_rows(
    lists: Sequence[RelatedList], max_related: int
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int8], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """Every list's first max_related neighbours as one set of rows, in list order: their
    interned ids, kind codes, scores and confidences."""
    return (
        np.concatenate([lst.idx[:max_related] for lst in lists]),
        np.concatenate([lst.kinds[:max_related] for lst in lists]),
        np.concatenate([lst.scores[:max_related] for lst in lists]),
        np.concatenate([lst.confidences[:max_related] for lst in lists]),
    )


class _Association(NamedTuple):
    """A user's association evidence: candidate ids with summed strengths, and per evidence
    row (source order, then list order) its candidate, strength, source and list position."""

    ids: list[str]
    scores: npt.NDArray[np.float64]
    row_candidate: npt.NDArray[np.intp]
    row_strength: npt.NDArray[np.float64]
    row_source: npt.NDArray[np.intp]
    row_at: npt.NDArray[np.intp]
    lists: dict[int, RelatedList]  # source position -> its list
    row_kind: npt.NDArray[np.int8]  # relation kind code
    row_value: npt.NDArray[np.float64]  # the row's value before weight and share
    row_share: npt.NDArray[np.float64]  # its source's recency share


class EvidenceRows(NamedTuple):
    """A user's association evidence before any weight, one row per (source, neighbour) that
    can count: its interned candidate, kind code, source position, position in the source's
    list, and value (P(neighbour | source) for sequence kinds, the association cosine for the
    others). `score` sums exactly these rows with the kind weights and recency shares;
    `relata train` applies many weights to them at once."""

    idx: npt.NDArray[np.int64]
    kinds: npt.NDArray[np.int8]
    source: npt.NDArray[np.intp]
    at: npt.NDArray[np.intp]
    values: npt.NDArray[np.float64]
    lists: dict[int, RelatedList]  # source position -> its list


def _rows(
    sources: Sequence[tuple[HistoryEntry, float]],
    table: RelatedTable,
    w: BlendWeights,
    banned: Set[str],
) -> EvidenceRows | None:
    lists: dict[int, RelatedList] = {}
    counts: list[int] = []
    for pos, (entry, _) in enumerate(sources):
        lst = table.get(entry.item_id)
        if lst is not None and lst.ids:
            lists[pos] = lst
            counts.append(min(len(lst.ids), w.max_related))
    if not lists:
        return None
    # Every source's first max_related neighbours as one set of rows, masked at once.
    idx, kinds, scores, confidences = _neighbour_rows(list(lists.values()), w.max_related)
    values = np.where(_sequence_kinds()[kinds], confidences, scores)
    source = np.repeat(np.fromiter(lists, dtype=np.intp, count=len(lists)), counts)
    starts = np.repeat(np.cumsum([0, *counts[:-1]]), counts)
    kind_w = _kind_weights(w)[kinds]
    keep = np.flatnonzero((kind_w > 0.0) & (values > 0.0) & ~table.flags(banned)[idx])
    if not len(keep):
        return None
    return EvidenceRows(
        idx[keep], kinds[keep], source[keep], keep - starts[keep], values[keep], lists
    )


def _association(
    sources: Sequence[tuple[HistoryEntry, float]],
    sequence_weights: Sequence[float],
    table: RelatedTable,
    w: BlendWeights,
    banned: Set[str],
) -> _Association | None:
    """Association evidence of the user's sources, two signals with their own recency:

    - co-occurrence kinds (item kNN): the neighbour's association score, a cosine comparable
      across sources, weighted by the source's `recency` share;
    - sequence kinds (transitions): P(neighbour | source), the evidence's confidence, weighted
      by the source's `sequence_recency` share: what the user does next depends mostly on the
      last items, more steeply than what they like.

    Each signal's source weights are normalised to sum 1, so history length does not scale
    them against the vector term and the prior."""
    rows = _rows(sources, table, w, banned)
    if rows is None:
        return None
    co_share = np.array([sw for _, sw in sources], dtype=np.float64)
    co_share /= co_share.sum() or 1.0
    seq_share = np.array(sequence_weights, dtype=np.float64)
    seq_share /= seq_share.sum() or 1.0
    share = np.where(_sequence_kinds()[rows.kinds], seq_share[rows.source], co_share[rows.source])
    # (kind weight x share) x value: the scalar formula's order of multiplication
    strengths = _kind_weights(w)[rows.kinds] * share * rows.values
    uniq, inverse = table.unique(rows.idx)
    # bincount adds in row order: the same sums, bit for bit, as adding source by source
    return _Association(
        ids=table.names(uniq.tolist()),
        scores=np.bincount(inverse, weights=strengths, minlength=len(uniq)).astype(
            np.float64, copy=False
        ),
        row_candidate=inverse,
        row_strength=strengths,
        row_source=rows.source,
        row_at=rows.at,
        lists=rows.lists,
        row_kind=rows.kinds,
        row_value=rows.values,
        row_share=share,
    )


def evidence_rows(
    history: Sequence[HistoryEntry],
    related: RelatedTable,
    weights: BlendWeights,
) -> tuple[list[tuple[HistoryEntry, float]], EvidenceRows | None]:
    """The sources of a history with their base weights (the folded-weight factor, before
    recency) and its unweighted association evidence rows (every kind `weights` does not
    switch off). What `score` ranks from, for a search over weights."""
    banned = {e.item_id for e in history}
    sources = source_weights(
        history,
        recency=1.0,
        weight_exponent=weights.weight_exponent,
        max_sources=weights.max_sources,
    )
    return sources, (_rows(sources, related, weights, banned) if sources else None)


class UserEvidence(NamedTuple):
    """What `score` derives from a history before any vector: the evidence sources (recent
    positive items, weighted) and the association evidence. A caller that prefetches vectors
    reads the association candidates from it (`candidates`) and hands it to `score`."""

    sources: list[tuple[HistoryEntry, float]]
    assoc: _Association | None
    banned: set[str]  # the history and `exclude`: never returned

    @property
    def candidates(self) -> list[str]:
        """The items association evidence proposes (their vectors give them a cosine)."""
        return [] if self.assoc is None else self.assoc.ids


def user_evidence(
    history: Sequence[HistoryEntry],
    related: RelatedTable | Mapping[str, RelatedItems],
    weights: BlendWeights | None = None,
    exclude: Set[str] = frozenset(),
) -> UserEvidence:
    """The sources and association evidence of one history (the first step of `score`)."""
    w = weights or BlendWeights()
    banned = set(exclude)
    banned.update(e.item_id for e in history)
    sources = source_weights(
        history, recency=w.recency, weight_exponent=w.weight_exponent, max_sources=w.max_sources
    )
    # The same sources with the sequence signal's recency (same entries, same order).
    sequence_of = {
        e.item_id: sw
        for e, sw in source_weights(
            history,
            recency=w.sequence_recency,
            weight_exponent=w.weight_exponent,
            max_sources=w.max_sources,
        )
    }
    sequence_weights = [sequence_of.get(e.item_id, 0.0) for e, _ in sources]
    assoc = (
        _association(sources, sequence_weights, table_of(related), w, banned) if sources else None
    )
    return UserEvidence(sources, assoc, banned)


def popularity_prior(
    popularity: Sequence[tuple[str, float]], weights: BlendWeights
) -> dict[str, float]:
    """Each listed item's popularity term in `score`: log1p(count) over log1p(the top count),
    times the popularity weight (plus a tiny floor, so that the fill still works at weight 0).
    `popularity` is most popular first."""
    if not popularity:
        return {}
    top_count = max(popularity[0][1], 0.0)
    denom = math.log1p(top_count) if top_count > 0 else 1.0
    pw = weights.prior_weight
    return {item_id: pw * (math.log1p(max(count, 0.0)) / denom) for item_id, count in popularity}


def _top(scores: Mapping[str, float], k: int) -> list[tuple[str, float]]:
    """The k best (item, score) pairs, ties broken on item id."""
    ids = list(scores)
    if len(ids) > k:
        values = np.fromiter(scores.values(), dtype=np.float64, count=len(ids))
        kth = values[np.argpartition(-values, k - 1)[:k]].min()
        ids = [ids[i] for i in np.flatnonzero(values >= kth)]  # the k best and their ties
    return sorted(((i, scores[i]) for i in ids), key=lambda kv: (-kv[1], kv[0]))[:k]


class Scored(NamedTuple):
    """One user's ranked candidates (`items`: (item id, score), best first) and what
    `explain` words their reasons from."""

    items: list[tuple[str, float]]
    sources: list[tuple[HistoryEntry, float]]
    anchor: str  # the history item a reason names when nothing more specific does
    assoc: _Association | None
    vec_score: dict[str, float]
    pop_score: dict[str, float]
    history_vectors: Mapping[str, np.ndarray] | None
    candidate_vectors: Mapping[str, np.ndarray] | None
    titles: Mapping[str, str] | None
    max_reasons: int
    # The learned ranker's inputs beyond the terms above: the vector candidates and their
    # cosines scaled against the user's hits (before floor and sharpness; kept as the arrays
    # scoring made, read only when a ranker asks), and the popularity weight.
    scaled: tuple[list[str], npt.NDArray[np.float64]] | None = None
    prior_weight: float = 1e-6


def score(
    *,
    history: Sequence[HistoryEntry],
    related: RelatedTable | Mapping[str, RelatedItems],
    vector_hits: Sequence[tuple[str, float]],
    k: int,
    weights: BlendWeights | None = None,
    exclude: Set[str] = frozenset(),
    history_vectors: Mapping[str, np.ndarray] | None = None,
    candidate_vectors: Mapping[str, np.ndarray] | None = None,
    popularity: Sequence[tuple[str, float]] | None = None,
    titles: Mapping[str, str] | None = None,
    max_reasons: int = 3,
    user_vector: np.ndarray | None = None,
    prior_of: Mapping[str, float] | None = None,
    evidence: UserEvidence | None = None,
) -> Scored:
    """The top-k items for one user with their scores (`explain` words their reasons, which
    name the user's own history items).

    history: most recent first (UserProfile/ProfileUpdate order). related: a RelatedTable, or
    RelatedItems by history item id (missing ids are fine). vector_hits: (item_id, cosine with
    the user vector), best first. popularity: (item_id, count), most popular first: a prior and
    the fallback (`prior_of`: its `popularity_prior`, when the caller keeps it, saves computing
    it per call).
    history_vectors/candidate_vectors: optional; they name the history item most similar to a
    vector hit (with its cosine) and, with `user_vector` (default: pooled from history_vectors),
    give behaviour candidates that are not vector hits their cosine with the user.
    History items and `exclude` are never returned. Ties break on item id (deterministic).
    evidence: `user_evidence` of the same history, related, weights and exclude, when the
    caller has it already (the recommender reads its candidates to prefetch their vectors).
    """
    if k <= 0 or not history:
        return Scored([], [], "", None, {}, {}, None, None, titles, max_reasons)
    w = weights or BlendWeights()
    if evidence is None:
        evidence = user_evidence(history, related, w, exclude)
    sources, assoc, banned = evidence
    anchor = sources[0][0].item_id if sources else history[0].item_id
    scores: dict[str, float] = (
        {} if assoc is None else dict(zip(assoc.ids, assoc.scores.tolist(), strict=True))
    )

    # Language model: cosine with the user vector, scaled against this user's hits (best hit 1,
    # weakest hit 0); behaviour candidates far from the user's taste go below 0.
    vec_score: dict[str, float] = {}
    scaled_of: tuple[list[str], npt.NDArray[np.float64]] | None = None
    if w.vector > 0.0:
        cos_of = {i: c for i, c in vector_hits if i not in banned}
        n_hits = len(cos_of)
        if cos_of:
            hi, lo = max(cos_of.values()), min(cos_of.values())
            if len(cos_of) == 1 or hi - lo <= 1e-9:
                lo = hi - 1.0
            span = hi - lo
            uvec = user_vector
            if uvec is None and candidate_vectors is not None and history_vectors is not None:
                uvec = pooled_user_vector(
                    history,
                    history_vectors,
                    recency=w.pool_recency,
                    weight_exponent=w.weight_exponent,
                    max_items=w.max_sources,
                )
            if uvec is not None and candidate_vectors is not None:
                # One matrix product for the behaviour candidates (up to max_sources x
                # max_related of them), not one dot product each.
                ids, matrix = gather(candidate_vectors, (i for i in scores if i not in cos_of))
                if matrix is not None:
                    cos_of.update(zip(ids, (matrix @ uvec).tolist(), strict=True))
            cos = np.fromiter(cos_of.values(), dtype=np.float64, count=len(cos_of))
            raw = (cos - lo) / span
            names = list(cos_of)
            scaled_of = (names, raw)
            scaled = np.maximum(w.vector_floor, raw)
            positive = scaled > 0.0
            scaled[positive] = scaled[positive] ** w.vector_sharpness
            strengths = w.vector * scaled
            # Every hit is a candidate (the first n_hits of cos_of); a behaviour candidate's
            # term matters only when it is not 0 (with the default floor, one outside the hits'
            # range adds nothing).
            counted = strengths != 0.0
            counted[:n_hits] = True
            vec_score = dict(
                zip(
                    map(names.__getitem__, np.flatnonzero(counted).tolist()),
                    strengths[counted].tolist(),
                    strict=True,
                )
            )
            for i, v in vec_score.items():  # in place: no second dict of ~100-400 entries
                scores[i] = scores.get(i, 0.0) + v

    # Popularity: a weak prior on the candidates it covers, and the fill for sparse users. The
    # list is most popular first, so only its first k unseen items can ever make the top k.
    # A tiny floor keeps the fill working when the popularity weight is 0.
    pop_score: dict[str, float] = {}
    if popularity:
        prior = popularity_prior(popularity, w) if prior_of is None else prior_of
        # The candidates it covers get the prior; then the first k unseen items fill.
        # One lookup per candidate, added in place: cheaper than intersecting both key views
        # and merging dicts, with hundreds of candidates and a prior of a thousand items.
        pop_score = {i: p for i in scores if (p := prior.get(i)) is not None}
        for item_id, p in pop_score.items():
            scores[item_id] += p
        fill = 0
        for item_id, _ in popularity:
            if fill >= k:
                break
            if item_id in banned or item_id in scores:
                continue
            fill += 1
            pop_score[item_id] = scores[item_id] = prior[item_id]

    return Scored(
        _top(scores, k),
        sources,
        anchor,
        assoc,
        vec_score,
        pop_score,
        history_vectors,
        candidate_vectors,
        titles,
        max_reasons,
        scaled_of,
        w.prior_weight,
    )
