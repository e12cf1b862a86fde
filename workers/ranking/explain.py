"""Word the reasons of scored items: each names the user's own history item behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from schemas import vocabulary
from schemas.messages import HistoryEntry, RecommendedItem, RelatedItems

from .related import RelatedList, RelatedTable, gather
from .score import Scored, score

_RECOMMENDED_ITEMS = TypeAdapter(list[RecommendedItem])


def _evidence_text(kind: str, evidence: str, src_label: str) -> str:
    try:
        template = vocabulary.relation_kind(kind).reason
    except KeyError:
        template = "related to {src}"
    phrase = template.format(src=src_label)
    return f"{phrase} ({evidence})"


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
    rows_of: dict[str, list[tuple[float, str, str, tuple[RelatedList, int]]]] = {}
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
        # (strength, source, kind, text, or the (list, position) to word it from: only the
        # max_reasons strongest are worded)
        parts: list[tuple[float, str, str, str | tuple[RelatedList, int]]] = list(
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
            parts.append(
                (ps, anchor, vocabulary.POPULAR, f"popular with shoppers (after {label(anchor)})")
            )
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
