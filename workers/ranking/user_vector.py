"""A user as a vector: pooled history item vectors, or the seed's profile text to encode."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from schemas import vocabulary
from schemas.messages import HistoryEntry


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
        parts.append(f"{_verb(entry.last_event_type)}: {title}")
        if len(parts) >= max_items:
            break
    return "; ".join(parts)


def _verb(event_type: str) -> str:
    try:
        return vocabulary.event_type(event_type).verb
    except KeyError:
        return "chose"
