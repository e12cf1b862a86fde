"""Blend behaviour evidence and language-model similarity into explained recommendations.

Pure logic (numpy only): the live recommender and `relata evaluate` rank with the same code
(`rank` = `explain(score(...))`; the recommender calls the two steps apart, so that it words
only the items it keeps after its availability check).
Score of a candidate item (each term on a [0, 1]-ish scale, so weights are comparable):
- association (item kNN): sum over the user's recent positive history items (sources, weights
  decaying with recency, normalised to sum 1) of the related-items score of the candidate, per
  relation kind (bought_together, also_bought, also_viewed, next_item); the association scores
  are cosines (pair / sqrt(n_i n_j)) from `streams.association`, used as they are;
- vector: cosine of the pooled user vector with the candidate, scaled against this user's
  vector hits ((cos - weakest hit) / (best hit - weakest hit), bounded below by
  `vector_floor`). Behaviour candidates that are not vector hits get their cosine from
  `candidate_vectors` when given (they matter when the hits were cut short, e.g. by
  availability, or with a negative floor);
- popularity: log-scaled count, a weak prior and the fallback for sparse users.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.messages import RELATION_KINDS, HistoryEntry, RecommendedItem, RelatedItems

logger = logging.getLogger(__name__)


BLEND_FORMAT = "relata.blend-weights"
BLEND_VERSION = 2

ReasonKind = Literal[
    "similar", "bought_together", "also_bought", "also_viewed", "next_item", "popular"
]


class BlendError(ValueError):
    """A blend-weights artifact is missing, malformed or of an unknown version."""


class BlendWeights(BaseModel):
    """Weights of the hybrid ranking; defaults work on both shipped data sets, `relata train`
    refits them per data set on an internal validation split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vector: float = Field(0.04, ge=0, description="Weight of the vector-similarity term.")
    bought_together: float = Field(1.0, ge=0, description="Weight of bought-together evidence.")
    also_bought: float = Field(
        1.0, ge=0, description="Weight of also-bought (same customers' histories) evidence."
    )
    also_viewed: float = Field(1.0, ge=0, description="Weight of also-viewed (same session).")
    next_item: float = Field(1.0, ge=0, description="Weight of item-to-next-item transitions.")
    similar: float = Field(0.0, ge=0, description="Weight of `similar` related-items entries.")
    popularity: float = Field(0.02, ge=0, description="Weight of the popularity prior.")
    recency: float = Field(
        0.5, gt=0, le=1, description="Source weight decay per step back in the user's history."
    )
    weight_exponent: float = Field(
        0.5, ge=0, le=2, description="Exponent on a history item's folded weight (0 ignores it)."
    )
    vector_sharpness: float = Field(
        1.0, gt=0, le=20, description="Exponent on the scaled cosine (higher: trust top hits)."
    )
    vector_floor: float = Field(
        0.0,
        ge=-1,
        le=0,
        description="Lowest scaled cosine (below 0: behaviour candidates far from the user's "
        "taste are pushed down; measured on Beauty, 0 was better).",
    )
    vector_recency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Recency decay of the pooled user vector (None: the same as `recency`).",
    )
    max_sources: int = Field(20, ge=1, le=1000, description="Most recent history items used.")
    max_related: int = Field(50, ge=1, le=1000, description="Related items read per source.")
    fitted_on: dict[str, Any] | None = Field(
        None, description="Provenance of fitted weights (data set, split, metric)."
    )

    @property
    def pool_recency(self) -> float:
        """Recency decay used to pool the user vector."""
        return self.recency if self.vector_recency is None else self.vector_recency

    def kind_weight(self, kind: str) -> float:
        """Weight of a related-items relation kind (0 for unknown kinds)."""
        return float(getattr(self, kind, 0.0)) if kind in _KIND_FIELDS else 0.0

    def save(self, path: Path) -> None:
        """Write the weights as a versioned JSON artifact."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": BLEND_FORMAT, "version": BLEND_VERSION, "weights": self.model_dump()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> BlendWeights:
        """Read an artifact written by `save`; raise BlendError naming what is wrong."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BlendError(f"cannot read blend weights {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != BLEND_FORMAT:
            raise BlendError(f"{path} is not a blend-weights artifact (format={BLEND_FORMAT!r})")
        if doc.get("version") != BLEND_VERSION:
            raise BlendError(
                f"{path} has blend-weights version {doc.get('version')!r}; "
                f"this relata reads version {BLEND_VERSION}"
            )
        try:
            return cls.model_validate(doc.get("weights", {}))
        except ValueError as exc:
            raise BlendError(f"invalid blend weights in {path}: {exc}") from exc


_KIND_FIELDS = frozenset({"bought_together", "also_bought", "also_viewed", "next_item", "similar"})
BEHAVIOUR_KINDS: tuple[str, ...] = ("bought_together", "also_bought", "also_viewed", "next_item")

_KIND_PHRASE: dict[str, str] = {
    "bought_together": "often bought together with {src}",
    "also_bought": "customers who bought {src} also bought it",
    "also_viewed": "viewed in the same sessions as {src}",
    "next_item": "often chosen next after {src}",
    "similar": "related to {src}",
}


# Relation kinds as small integer codes (their position in RELATION_KINDS).
_KIND_CODE: dict[str, int] = {kind: code for code, kind in enumerate(RELATION_KINDS)}
_RECOMMENDED_ITEMS = TypeAdapter(list[RecommendedItem])


class RelatedList(NamedTuple):
    """One item's related-items list in columns: what `rank` reads of it.

    One object for the garbage collector per list (numpy arrays and tuples of strings are not
    scanned), where pydantic objects were ~6 per neighbour: with thousands of lists of 50, full
    collections paused the recommender 50-180 ms (gc.callbacks at 250 events/s)."""

    item_id: str
    item_count: float
    ids: tuple[str, ...]  # neighbour item ids, best first
    idx: npt.NDArray[np.int64]  # the same, interned by the table (RelatedTable.index)
    kinds: npt.NDArray[np.int8]  # relation kind codes (positions in RELATION_KINDS)
    scores: npt.NDArray[np.float64]
    texts: tuple[str, ...]  # evidence texts


class RelatedTable:
    """Related-items lists by item id, in columns, with every item id interned as an integer
    (scoring a user's candidates is then array arithmetic, not a Python loop per neighbour).
    Interned ids are kept for the table's life: bounded by the catalog, not by traffic."""

    __slots__ = ("_index", "_lists", "_names")

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._lists: dict[str, RelatedList] = {}

    @classmethod
    def of(cls, related: Mapping[str, RelatedItems]) -> RelatedTable:
        table = cls()
        for value in related.values():
            table.put(value)
        return table

    def index(self, item_id: str) -> int:
        """The integer of an item id (assigned on first sight)."""
        n = self._index.get(item_id)
        if n is None:
            n = self._index[item_id] = len(self._names)
            self._names.append(item_id)
        return n

    def known(self, item_ids: Iterable[str]) -> npt.NDArray[np.int64]:
        """The integers of those of `item_ids` the table has seen (none are assigned)."""
        index = self._index
        return np.array([n for n in map(index.get, item_ids) if n is not None], dtype=np.int64)

    def flags(self, item_ids: Iterable[str]) -> npt.NDArray[np.bool_]:
        """A flag per interned integer: True for those of `item_ids` (index it with `idx`)."""
        flags = np.zeros(len(self._names), dtype=np.bool_)
        flags[self.known(item_ids)] = True
        return flags

    def unique(
        self, idx: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
        """`np.unique(idx, return_inverse=True)` for interned integers, by one pass over a
        flag per integer instead of a sort (the same arrays)."""
        present = np.zeros(len(self._names), dtype=np.bool_)
        present[idx] = True
        uniq = np.flatnonzero(present)
        position = np.cumsum(present, dtype=np.intp) - 1
        return uniq.astype(np.int64, copy=False), position[idx]

    def names(self, idx: Sequence[int] | npt.NDArray[np.int64]) -> list[str]:
        return list(map(self._names.__getitem__, idx))

    def put(self, value: RelatedItems) -> None:
        related = value.related
        ids = tuple(r.item_id for r in related)
        self._lists[value.item_id] = RelatedList(
            value.item_id,
            value.item_count,
            ids,
            np.fromiter((self.index(i) for i in ids), dtype=np.int64, count=len(ids)),
            np.fromiter((_KIND_CODE[r.kind] for r in related), dtype=np.int8, count=len(ids)),
            np.fromiter((r.score for r in related), dtype=np.float64, count=len(ids)),
            tuple(r.evidence.text for r in related),
        )

    def remove(self, item_id: str) -> None:
        self._lists.pop(item_id, None)

    def get(self, item_id: str) -> RelatedList | None:
        return self._lists.get(item_id)

    def lists(self) -> Iterable[RelatedList]:
        return self._lists.values()

    def __len__(self) -> int:
        return len(self._lists)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._lists


class VectorRows(Mapping[str, np.ndarray]):
    """Item id -> row of an item matrix, without copying; `gather` takes many rows in one
    numpy call (rank's candidate cosines), where stacking one array per item cost more than
    the product itself at ~1,000 behaviour candidates a user."""

    def __init__(self, matrix: np.ndarray, rows: Mapping[str, int]) -> None:
        self.matrix = matrix
        self.rows = rows

    def __getitem__(self, item_id: str) -> np.ndarray:
        row: np.ndarray = self.matrix[self.rows[item_id]]
        return row

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, item_ids: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """The ids of `item_ids` that have a row, and their rows as one matrix."""
        ids = list(item_ids)
        rows = np.fromiter(map(self.rows.get, ids, itertools.repeat(-1)), dtype=np.intp)
        found = np.flatnonzero(rows >= 0)
        if len(found) < len(ids):
            return [ids[n] for n in found.tolist()], self.matrix[rows[found]]
        return ids, self.matrix[rows]


def _gather(
    vectors: Mapping[str, np.ndarray], item_ids: Iterable[str]
) -> tuple[list[str], np.ndarray | None]:
    """The ids of `item_ids` that `vectors` holds, and their vectors stacked (None if none)."""
    if isinstance(vectors, VectorRows):
        ids, matrix = vectors.gather(item_ids)
        return ids, matrix if ids else None
    found = [(i, v) for i in item_ids if (v := _vector_of(vectors, i)) is not None]
    if not found:
        return [], None
    return [i for i, _ in found], np.stack([np.asarray(v, dtype=np.float32) for _, v in found])


def _table(related: RelatedTable | Mapping[str, RelatedItems]) -> RelatedTable:
    return related if isinstance(related, RelatedTable) else RelatedTable.of(related)


def _kind_weights(w: BlendWeights) -> npt.NDArray[np.float64]:
    """The blend weight of each relation kind code."""
    return np.array([w.kind_weight(kind) for kind in RELATION_KINDS], dtype=np.float64)


def source_weights(
    history: Sequence[HistoryEntry], *, recency: float, weight_exponent: float, max_sources: int
) -> list[tuple[HistoryEntry, float]]:
    """Weight of each recent positive history item as a source of evidence, most recent first.

    History is most recent first; returned/negative items are never sources.
    """
    out: list[tuple[HistoryEntry, float]] = []
    positives = [e for e in history[:max_sources] if e.weight > 0]
    if not positives:
        return out
    top = max(e.weight for e in positives)
    for position, entry in enumerate(positives):
        w = (recency**position) * ((entry.weight / top) ** weight_exponent)
        if w > 1e-9:
            out.append((entry, w))
    return out


def pooled_user_vector(
    history: Sequence[HistoryEntry],
    vectors: Mapping[str, np.ndarray],
    *,
    recency: float = 0.7,
    weight_exponent: float = 0.5,
    max_items: int = 20,
) -> np.ndarray | None:
    """Weighted mean of the user's history item vectors (L2-normalised); None if none known."""
    acc: np.ndarray | None = None
    for entry, w in source_weights(
        history, recency=recency, weight_exponent=weight_exponent, max_sources=max_items
    ):
        vec = vectors.get(entry.item_id)
        if vec is None:
            continue
        term = np.asarray(vec, dtype=np.float32) * np.float32(w)
        acc = term if acc is None else acc + term
    if acc is None:
        return None
    norm = float(np.linalg.norm(acc))
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return (acc / norm).astype(np.float32)


_VERB: dict[str, str] = {
    "purchase": "bought",
    "add_to_cart": "added to cart",
    "click": "clicked",
    "view": "viewed",
    "return": "returned",
}


def profile_text(
    history: Sequence[HistoryEntry], titles: Mapping[str, str], *, max_items: int = 10
) -> str:
    """The seed's user representation: a text of the user's recent behaviour, to be encoded.

    Most recent first, positive items only, e.g. "bought: Rose Lip Balm; viewed: Matte Lipstick".
    """
    parts: list[str] = []
    for entry in history:
        if entry.weight <= 0:
            continue
        title = titles.get(entry.item_id)
        if not title:
            continue
        parts.append(f"{_VERB.get(entry.last_event_type, 'chose')}: {title}")
        if len(parts) >= max_items:
            break
    return "; ".join(parts)


def _evidence_text(kind: str, evidence: str, src_label: str) -> str:
    phrase = _KIND_PHRASE.get(kind, "related to {src}").format(src=src_label)
    return f"{phrase} ({evidence})"


def _label(item_id: str, titles: Mapping[str, str] | None) -> str:
    if titles is not None:
        title = titles.get(item_id)
        if title:
            return f"'{title[:80]}'"
    return item_id


def _neighbour_rows(
    lists: Sequence[RelatedList], max_related: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8], npt.NDArray[np.float64]]:
    """Every list's first max_related neighbours as one set of rows, in list order: their
    interned ids, kind codes and scores."""
    return (
        np.concatenate([lst.idx[:max_related] for lst in lists]),
        np.concatenate([lst.kinds[:max_related] for lst in lists]),
        np.concatenate([lst.scores[:max_related] for lst in lists]),
    )


def _vector_of(vectors: Mapping[str, np.ndarray] | None, item_id: str) -> np.ndarray | None:
    if vectors is None:
        return None
    try:
        return vectors[item_id]
    except KeyError:
        return None


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


def _association(
    sources: Sequence[tuple[HistoryEntry, float]],
    table: RelatedTable,
    w: BlendWeights,
    banned: Set[str],
) -> _Association | None:
    """Association evidence (item kNN): association scores are cosines already, comparable
    across sources; sources are normalised to sum 1 so history length does not scale them."""
    total_source = sum(sw for _, sw in sources) or 1.0
    lists: dict[int, RelatedList] = {}
    taken: list[tuple[int, int, float]] = []  # (source position, neighbours read, share)
    for pos, (entry, sw) in enumerate(sources):
        lst = table.get(entry.item_id)
        if lst is not None and lst.ids:
            lists[pos] = lst
            taken.append((pos, min(len(lst.ids), w.max_related), sw / total_source))
    if not taken:
        return None
    # Every source's first max_related neighbours as one set of rows, masked at once.
    counts = [n for _, n, _ in taken]
    idx, kinds, scores = _neighbour_rows([lists[pos] for pos, _, _ in taken], w.max_related)
    kind_w = _kind_weights(w)[kinds]
    source = np.repeat(np.array([pos for pos, _, _ in taken], dtype=np.intp), counts)
    share = np.repeat(np.array([sh for _, _, sh in taken], dtype=np.float64), counts)
    starts = np.repeat(np.cumsum([0, *counts[:-1]]), counts)
    keep = np.flatnonzero((kind_w > 0.0) & (scores > 0.0) & ~table.flags(banned)[idx])
    if not len(keep):
        return None
    # (kind weight x share) x score: the scalar formula's order of multiplication
    strengths = kind_w[keep] * share[keep] * scores[keep]
    uniq, inverse = table.unique(idx[keep])
    # bincount adds in row order: the same sums, bit for bit, as adding source by source
    return _Association(
        ids=table.names(uniq.tolist()),
        scores=np.bincount(inverse, weights=strengths, minlength=len(uniq)).astype(
            np.float64, copy=False
        ),
        row_candidate=inverse,
        row_strength=strengths,
        row_source=source[keep],
        row_at=keep - starts[keep],
        lists=lists,
    )


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
    assoc = _association(sources, _table(related), w, banned) if sources else None
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
    pw = weights.popularity + 1e-6
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
                ids, matrix = _gather(candidate_vectors, (i for i in scores if i not in cos_of))
                if matrix is not None:
                    cos_of.update(zip(ids, (matrix @ uvec).tolist(), strict=True))
            cos = np.fromiter(cos_of.values(), dtype=np.float64, count=len(cos_of))
            scaled = np.maximum(w.vector_floor, (cos - lo) / span)
            positive = scaled > 0.0
            scaled[positive] = scaled[positive] ** w.vector_sharpness
            strengths = w.vector * scaled
            # Every hit is a candidate (the first n_hits of cos_of); a behaviour candidate's
            # term matters only when it is not 0 (with the default floor, one outside the hits'
            # range adds nothing).
            counted = strengths != 0.0
            counted[:n_hits] = True
            names = list(cos_of)
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
        # One lookup per candidate, added in place (the intersection of both key views and a
        # merged dict took 1.3-1.8 times as long at ~370 candidates and a 1,000-item prior).
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
    )


def rank(
    *,
    history: Sequence[HistoryEntry],
    related: RelatedTable | Mapping[str, RelatedItems],
    vector_hits: Sequence[tuple[str, float]],
    k: int,
    **options: Any,
) -> list[RecommendedItem]:
    """Top-k items for one user, each with reasons naming the user's own history items:
    `explain(score(...))` (see `score` for the options)."""
    return explain(score(history=history, related=related, vector_hits=vector_hits, k=k, **options))


def explain(scored: Scored, item_ids: Sequence[str] | None = None) -> list[RecommendedItem]:
    """The scored items (or those of `item_ids`, in their order) with their reasons: the
    max_reasons strongest pieces of evidence, each naming the history item behind it."""
    titles, anchor, sources, assoc = scored.titles, scored.anchor, scored.sources, scored.assoc
    score_of = dict(scored.items)
    ids = [i for i, _ in scored.items] if item_ids is None else list(item_ids)
    if not ids:
        return []
    vec_source = _vector_sources(
        [i for i in ids if i in scored.vec_score],
        sources=[e.item_id for e, _ in sources] or [anchor],
        history_vectors=scored.history_vectors,
        candidate_vectors=scored.candidate_vectors,
    )
    labels: dict[str, str] = {}

    def label(item_id: str) -> str:
        found = labels.get(item_id)
        if found is None:
            found = labels[item_id] = _label(item_id, titles)
        return found

    # The association evidence rows of the worded items, found in one pass over the rows
    # (source order, then list order), not one pass per item.
    rows_of: dict[str, list[tuple[float, str, ReasonKind, tuple[RelatedList, int]]]] = {}
    if assoc is not None:
        candidate_of = dict(zip(assoc.ids, range(len(assoc.ids)), strict=True))
        wanted = [n for i in ids if (n := candidate_of.get(i)) is not None]
        if wanted:
            # A mask over the candidates, indexed by each row's candidate: ~3 us where np.isin
            # took ~20 (its sort of both arrays), the same rows in the same order.
            is_wanted = np.zeros(len(assoc.ids), dtype=bool)
            is_wanted[wanted] = True
            rows = np.flatnonzero(is_wanted[assoc.row_candidate])
            for n, pos, at, strength in zip(
                assoc.row_candidate[rows].tolist(),
                assoc.row_source[rows].tolist(),
                assoc.row_at[rows].tolist(),
                assoc.row_strength[rows].tolist(),
                strict=True,
            ):
                lst = assoc.lists[pos]
                kind = cast(ReasonKind, RELATION_KINDS[int(lst.kinds[at])])
                rows_of.setdefault(assoc.ids[n], []).append(
                    (strength, sources[pos][0].item_id, kind, (lst, at))
                )
    out: list[dict[str, Any]] = []
    for item_id in ids:
        item_score = score_of[item_id]
        # (strength, source, kind, text, or the (list, position) to word it from: only the
        # max_reasons strongest are worded)
        parts: list[tuple[float, str, ReasonKind, str | tuple[RelatedList, int]]] = list(
            rows_of.get(item_id, ())
        )
        vs = scored.vec_score.get(item_id)
        if vs is not None and vs > 0.0:
            src, sim = vec_source.get(item_id, (anchor, None))
            text = (
                f"similar to {label(src)} (cosine {sim:.2f})"
                if sim is not None
                else f"similar to your recent items, like {label(src)}"
            )
            parts.append((vs, src, "similar", text))
        ps = scored.pop_score.get(item_id)
        if ps is not None and (not parts or ps > 0.0):
            parts.append((ps, anchor, "popular", f"popular with shoppers (after {label(anchor)})"))
        if not parts:  # only a negative vector term: still say where it came from
            parts.append((item_score, anchor, "similar", "similar to your recent items"))
        parts.sort(key=lambda p: -p[0])
        reasons = [
            {
                "source_item_id": src,
                "kind": kind,
                "strength": strength,
                "text": text
                if isinstance(text, str)
                else _evidence_text(kind, text[0].texts[text[1]], label(src)),
            }
            for strength, src, kind, text in parts[: scored.max_reasons]
        ]
        out.append({"item_id": item_id, "score": item_score, "reasons": reasons})
    # One validation of the whole list (pydantic-core, one call): less than half the time of
    # building its ~40 models one by one without validation.
    return _RECOMMENDED_ITEMS.validate_python(out)


def _vector_sources(
    items: Sequence[str],
    *,
    sources: Sequence[str],
    history_vectors: Mapping[str, np.ndarray] | None,
    candidate_vectors: Mapping[str, np.ndarray] | None,
) -> dict[str, tuple[str, float | None]]:
    """For each vector-hit item, the history item most similar to it, with the cosine."""
    if not items or not history_vectors or not candidate_vectors:
        return {}
    # One gather each (a fancy index of the item matrix for `VectorRows`): stacking one view
    # per item was a third of `explain`.
    src_ids, h = _gather(history_vectors, sources)
    cand_ids, c = _gather(candidate_vectors, items)
    if h is None or c is None:
        return {}
    sims = c.astype(np.float32, copy=False) @ h.astype(np.float32, copy=False).T
    best = sims.argmax(axis=1)
    return {
        item: (src_ids[int(j)], float(np.clip(sims[n, j], -1.0, 1.0)))
        for n, (item, j) in enumerate(zip(cand_ids, best, strict=True))
    }
