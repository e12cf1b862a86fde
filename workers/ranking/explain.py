"""Word the reasons of scored items: each names the user's own history item behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from schemas import vocabulary
from schemas.messages import HistoryEntry, RecommendedItem, RelatedItems

from .related import RelatedList, RelatedTable, evidence_row, gather
from .score import Scored, score

_RECOMMENDED_ITEMS = TypeAdapter(list[RecommendedItem])


def _relation_text(kind: str, src_label: str, fields: Mapping[str, float | int]) -> str:
    """The reason's wording for a relation, naming the source once, with its most telling
    number (lift, else cosine); the other numbers are the reason's fields."""
    try:
        template = vocabulary.relation_kind(kind).reason
    except KeyError:
        template = "related to {src}"
    phrase = template.format(src=src_label)
    if (lift := fields.get("lift")) is not None:
        return f"{phrase} (lift {lift:.1f})"
    if (cosine := fields.get("cosine")) is not None:
        return f"{phrase} (cosine {cosine:.2f})"
    return phrase


POPULAR_TEXT = "popular with shoppers"
PINNED_TEXT = "featured"
TRENDING_TEXT = "trending: popular with shoppers lately"


def _label(item_id: str, titles: Mapping[str, str] | None) -> str:
    if titles is not None:
        title = titles.get(item_id)
        if title:
            return f"'{title[:80]}'"
    return item_id


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


def explain(
    scored: Scored,
    item_ids: Sequence[str] | None = None,
    *,
    item_counts: Mapping[str, float] | None = None,
) -> list[RecommendedItem]:
    """The scored items (or those of `item_ids`, in their order) with their reasons: the
    max_reasons strongest pieces of evidence, each naming the history item behind it and
    carrying its numbers as fields (`item_counts`: popularity counts for `popular` reasons)."""
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
    rows_of: dict[str, list[tuple[float, str, str, dict[str, Any] | tuple[RelatedList, int]]]] = {}
    kinds = vocabulary.relation_kinds()
    if assoc is not None:
        candidate_of = dict(zip(assoc.ids, range(len(assoc.ids)), strict=True))
        wanted = [n for i in ids if (n := candidate_of.get(i)) is not None]
        if wanted:
            # A mask over the candidates, indexed by each row's candidate: the same rows in the
            # same order as np.isin, without its sort of both arrays.
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
                kind = kinds[int(lst.kinds[at])]
                rows_of.setdefault(assoc.ids[n], []).append(
                    (strength, sources[pos][0].item_id, kind, (lst, at))
                )
    out: list[dict[str, Any]] = []
    for item_id in ids:
        item_score = score_of[item_id]
        # (strength, source, kind, fields with the text, or the (list, position) to word them
        # from: only the max_reasons strongest are worded)
        parts: list[tuple[float, str, str, dict[str, Any] | tuple[RelatedList, int]]] = list(
            rows_of.get(item_id, ())
        )
        vs = scored.vec_score.get(item_id)
        if vs is not None and vs > 0.0:
            src, sim = vec_source.get(item_id, (anchor, None))
            fields: dict[str, Any] = (
                {"text": f"similar to {label(src)} (cosine {sim:.2f})", "cosine": sim}
                if sim is not None
                else {"text": f"similar to your recent items, like {label(src)}"}
            )
            parts.append((vs, src, "similar", fields))
        ps = scored.pop_score.get(item_id)
        if ps is not None and (not parts or ps > 0.0):
            fields = {"text": POPULAR_TEXT}
            if item_counts is not None and (count := item_counts.get(item_id)) is not None:
                fields["item_count"] = max(0.0, count)
            parts.append((ps, anchor, vocabulary.POPULAR, fields))
        if not parts:  # only a negative vector term: still say where it came from
            parts.append((item_score, anchor, "similar", {"text": "similar to your recent items"}))
        parts.sort(key=lambda p: -p[0])
        reasons = []
        for strength, src, kind, payload in parts[: scored.max_reasons]:
            if not isinstance(payload, dict):
                numbers = evidence_row(*payload)
                payload = {"text": _relation_text(kind, label(src), numbers), **numbers}
            reasons.append({"source_item_id": src, "kind": kind, "strength": strength, **payload})
        out.append({"item_id": item_id, "score": item_score, "reasons": reasons})
    # One validation of the whole list (pydantic-core, one call): less than half the time of
    # building its ~40 models one by one without validation.
    return _RECOMMENDED_ITEMS.validate_python(out)


def pinned(item_id: str) -> RecommendedItem:
    """An item a business rule placed in the list (no score of its own: 0)."""
    reason = {"source_item_id": None, "kind": vocabulary.PINNED, "strength": 0.0}
    return RecommendedItem.model_validate(
        {"item_id": item_id, "score": 0.0, "reasons": [{**reason, "text": PINNED_TEXT}]}
    )


def trending(
    popularity: Sequence[tuple[str, float]],
    item_ids: Sequence[str],
    *,
    relative_to: Sequence[str] | None = None,
) -> list[RecommendedItem]:
    """The answer to a user with no usable history: `item_ids` (the most popular available
    items, in order) labelled `trending`, scored by their decayed count (`popularity`:
    (item id, count), most popular first) relative to the largest count among `relative_to`
    (default: `item_ids`; the items of a candidate pool are scored against the list's)."""
    count_of = dict(popularity)
    top_of = item_ids if relative_to is None else relative_to
    top = max((count_of.get(i, 0.0) for i in top_of), default=0.0) or 1.0
    out = [
        {
            "item_id": item_id,
            # The count relative to the top one: a [0, 1] score, as the blend's terms are.
            "score": max(0.0, count_of.get(item_id, 0.0)) / top,
            "reasons": [
                {
                    "source_item_id": None,
                    "kind": vocabulary.TRENDING,
                    "strength": max(0.0, count_of.get(item_id, 0.0)) / top,
                    "text": TRENDING_TEXT,
                    "item_count": max(0.0, count_of.get(item_id, 0.0)),
                }
            ],
        }
        for item_id in item_ids
    ]
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
    src_ids, h = gather(history_vectors, sources)
    cand_ids, c = gather(candidate_vectors, items)
    if h is None or c is None:
        return {}
    sims = c.astype(np.float32, copy=False) @ h.astype(np.float32, copy=False).T
    best = sims.argmax(axis=1)
    return {
        item: (src_ids[int(j)], float(np.clip(sims[n, j], -1.0, 1.0)))
        for n, (item, j) in enumerate(zip(cand_ids, best, strict=True))
    }
