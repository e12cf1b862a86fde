"""Blend behaviour evidence and language-model similarity into explained recommendations.

Pure logic (numpy only): the live recommender and `relata evaluate` call the same `rank`.
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

import heapq
import json
import logging
import math
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import HistoryEntry, Reason, RecommendedItem

logger = logging.getLogger(__name__)


# What `rank` reads of a related-items list: RelatedItems itself (relata evaluate), or the
# recommender's compact named-tuple copy of it, fewer objects for the garbage collector to scan
# (workers/recommender.py).
class EvidenceView(Protocol):
    @property
    def text(self) -> str: ...


class NeighbourView(Protocol):
    @property
    def item_id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def score(self) -> float: ...

    @property
    def evidence(self) -> EvidenceView: ...


class RelatedView(Protocol):
    @property
    def item_id(self) -> str: ...

    @property
    def item_count(self) -> float: ...

    @property
    def related(self) -> Sequence[NeighbourView]: ...


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


def _evidence_text(r: NeighbourView, src: str, titles: Mapping[str, str] | None) -> str:
    phrase = _KIND_PHRASE.get(r.kind, "related to {src}").format(src=_label(src, titles))
    return f"{phrase} ({r.evidence.text})"


def _label(item_id: str, titles: Mapping[str, str] | None) -> str:
    if titles:
        title = titles.get(item_id)
        if title:
            return f"'{title[:80]}'"
    return item_id


def behaviour_candidates(
    history: Sequence[HistoryEntry],
    related: Mapping[str, RelatedView],
    weights: BlendWeights | None = None,
) -> list[str]:
    """Items that association evidence can propose for this history (for prefetching their
    vectors before `rank`, so the language model scores them too)."""
    w = weights or BlendWeights()
    seen: dict[str, None] = {}
    for entry, _ in source_weights(
        history, recency=w.recency, weight_exponent=w.weight_exponent, max_sources=w.max_sources
    ):
        rel = related.get(entry.item_id)
        if rel is not None:
            for r in rel.related[: w.max_related]:
                if w.kind_weight(r.kind) > 0.0:
                    seen[r.item_id] = None
    return list(seen)


def _vector_of(vectors: Mapping[str, np.ndarray] | None, item_id: str) -> np.ndarray | None:
    if vectors is None:
        return None
    try:
        return vectors[item_id]
    except KeyError:
        return None


def rank(
    *,
    history: Sequence[HistoryEntry],
    related: Mapping[str, RelatedView],
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
    popularity_counts: Mapping[str, float] | None = None,
) -> list[RecommendedItem]:
    """Top-k items for one user, each with reasons naming the user's own history items.

    history: most recent first (UserProfile/ProfileUpdate order). related: RelatedItems by
    history item id (missing ids are fine). vector_hits: (item_id, cosine with the user vector),
    best first. popularity: (item_id, count), most popular first: a prior and the fallback
    (`popularity_counts`, the same as a mapping, saves building it per call).
    history_vectors/candidate_vectors: optional; they name the history item most similar to a
    vector hit (with its cosine) and, with `user_vector` (default: pooled from history_vectors),
    give behaviour candidates that are not vector hits their cosine with the user.
    History items and `exclude` are never returned. Ties break on item id (deterministic).
    """
    if k <= 0 or not history:
        return []
    w = weights or BlendWeights()
    banned = set(exclude)
    banned.update(e.item_id for e in history)
    sources = source_weights(
        history, recency=w.recency, weight_exponent=w.weight_exponent, max_sources=w.max_sources
    )
    anchor = sources[0][0].item_id if sources else history[0].item_id
    scores: dict[str, float] = {}
    # candidate -> (strength, source item, neighbour entry) of its association evidence
    evidence: dict[str, list[tuple[float, str, NeighbourView]]] = {}

    # Association evidence (item kNN): association scores are cosines already, comparable
    # across sources; sources are normalised to sum 1 so history length does not scale them.
    total_source = sum(sw for _, sw in sources) or 1.0
    kind_w = {kind: w.kind_weight(kind) for kind in _KIND_FIELDS}
    for entry, sw in sources:
        rel = related.get(entry.item_id)
        if rel is None:
            continue
        share = sw / total_source
        src = entry.item_id
        for r in rel.related[: w.max_related]:
            kw = kind_w.get(r.kind, 0.0)
            if kw <= 0.0 or r.score <= 0.0 or r.item_id in banned:
                continue
            strength = kw * share * r.score
            item_id = r.item_id
            scores[item_id] = scores.get(item_id, 0.0) + strength
            found = evidence.get(item_id)
            if found is None:
                evidence[item_id] = [(strength, src, r)]
            else:
                found.append((strength, src, r))

    # Language model: cosine with the user vector, scaled against this user's hits (best hit 1,
    # weakest hit 0); behaviour candidates far from the user's taste go below 0.
    vec_score: dict[str, float] = {}
    if w.vector > 0.0:
        cos_of = {i: c for i, c in vector_hits if i not in banned}
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
                ids: list[str] = []
                vecs: list[np.ndarray] = []
                for item_id in scores:
                    if item_id not in cos_of:
                        vec = _vector_of(candidate_vectors, item_id)
                        if vec is not None:
                            ids.append(item_id)
                            vecs.append(vec)
                if ids:
                    cos_of.update(zip(ids, (np.stack(vecs) @ uvec).tolist(), strict=True))
            sharp, floor = w.vector_sharpness, w.vector_floor
            for item_id, cos in cos_of.items():
                scaled = max(floor, (cos - lo) / span)
                scaled = scaled**sharp if scaled > 0.0 else scaled
                strength = w.vector * scaled
                vec_score[item_id] = strength
                scores[item_id] = scores.get(item_id, 0.0) + strength

    # Popularity: a weak prior on the candidates it covers, and the fill for sparse users. The
    # list is most popular first, so only its first k unseen items can ever make the top k.
    # A tiny floor keeps the fill working when the popularity weight is 0.
    pop_score: dict[str, float] = {}
    if popularity:
        top_count = max(popularity[0][1], 0.0)
        denom = math.log1p(top_count) if top_count > 0 else 1.0
        pw = w.popularity + 1e-6
        counts = popularity_counts if popularity_counts is not None else dict(popularity)
        # The candidates it covers get the prior; then the first k unseen items fill.
        for item_id in scores:
            count = counts.get(item_id)
            if count is not None:
                pop_score[item_id] = pw * (math.log1p(max(count, 0.0)) / denom)
        fill = 0
        for item_id, count in popularity:
            if fill >= k:
                break
            if item_id in banned or item_id in scores:
                continue
            fill += 1
            pop_score[item_id] = pw * (math.log1p(max(count, 0.0)) / denom)
        for item_id, strength in pop_score.items():
            scores[item_id] = scores.get(item_id, 0.0) + strength

    ordered = heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))
    vec_source = _vector_sources(
        [i for i, _ in ordered if i in vec_score],
        sources=[e.item_id for e, _ in sources] or [history[0].item_id],
        history_vectors=history_vectors,
        candidate_vectors=candidate_vectors,
    )
    out: list[RecommendedItem] = []
    for item_id, score in ordered:
        # (strength, source, kind, text, or the neighbour entry to word it from: only the
        # max_reasons strongest are worded)
        parts: list[tuple[float, str, ReasonKind, str | NeighbourView]] = []
        for strength, src, r in evidence.get(item_id, ()):
            parts.append((strength, src, cast(ReasonKind, r.kind), r))
        vs = vec_score.get(item_id)
        if vs is not None and vs > 0.0:
            src, sim = vec_source.get(item_id, (anchor, None))
            text = (
                f"similar to {_label(src, titles)} (cosine {sim:.2f})"
                if sim is not None
                else f"similar to your recent items, like {_label(src, titles)}"
            )
            parts.append((vs, src, "similar", text))
        ps = pop_score.get(item_id)
        if ps is not None and (not parts or ps > 0.0):
            parts.append(
                (ps, anchor, "popular", f"popular with shoppers (after {_label(anchor, titles)})")
            )
        if not parts:  # only a negative vector term: still say where it came from
            parts.append((score, anchor, "similar", "similar to your recent items"))
        parts.sort(key=lambda p: -p[0])
        # Built from validated inputs only: no per-field validation (it was a fifth of the
        # recommender's time at 2k candidates a user).
        reasons = [
            Reason.model_construct(
                source_item_id=src,
                kind=kind,
                strength=strength,
                text=text if isinstance(text, str) else _evidence_text(text, src, titles),
            )
            for strength, src, kind, text in parts[:max_reasons]
        ]
        out.append(RecommendedItem.model_construct(item_id=item_id, score=score, reasons=reasons))
    return out


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
    src_ids = [s for s in sources if s in history_vectors]
    cand_ids = [i for i in items if i in candidate_vectors]
    if not src_ids or not cand_ids:
        return {}
    h = np.stack([np.asarray(history_vectors[s], dtype=np.float32) for s in src_ids])
    c = np.stack([np.asarray(candidate_vectors[i], dtype=np.float32) for i in cand_ids])
    sims = c @ h.T
    best = sims.argmax(axis=1)
    return {
        item: (src_ids[int(j)], float(np.clip(sims[n, j], -1.0, 1.0)))
        for n, (item, j) in enumerate(zip(cand_ids, best, strict=True))
    }
