"""Histories, item vectors and evidence for the fit's unit tests (no network, no model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from relata.lab.protocol import build_state
from relata.runtime.evidence import history_events
from schemas.messages import HistoryEntry, RelatedItems
from schemas.settings import StreamsSettings
from workers.client_store import ClientVectorStore
from workers.fitting import Evidence, ItemSpace

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DIM = 16


def entry(
    item: str, *, step: int, count: int = 1, etype: str = "purchase", weight: float = 8.0
) -> HistoryEntry:
    return HistoryEntry(
        item_id=item,
        weight=weight,
        last_event_type=etype,  # type: ignore[arg-type]
        last_ts=T0 + timedelta(hours=step),
        count=count,
    )


def history(*items: str, start: int = 0) -> list[HistoryEntry]:
    """A history of one purchase per item, the first item oldest (returned most recent
    first, as `profile-updates` carries it)."""
    return [entry(i, step=start + n) for n, i in enumerate(items)][::-1]


def ring_histories(
    users: int = 160, items: int = 40, seed: int = 0
) -> dict[str, list[HistoryEntry]]:
    """Users walk a ring of items (i -> i+1 -> ...) with some noise: learnable transitions."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[HistoryEntry]] = {}
    for u in range(users):
        pos = int(rng.integers(items))
        seq: list[str] = []
        for _ in range(int(rng.integers(4, 9))):
            item = f"i{pos if rng.random() > 0.15 else int(rng.integers(items))}"
            if item not in seq:
                seq.append(item)
            pos = (pos + 1) % items
        out[f"u{u}"] = history(*seq, start=u * 100)
    return out


def ring_items(items: int = 40, seed: int = 0, unavailable: Sequence[str] = ()) -> ItemSpace:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((items, DIM)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = [f"i{n}" for n in range(items)]
    return ItemSpace(ids, matrix, frozenset(ids) - set(unavailable))


class RecordingEvidence:
    """The live fold (as `relata.runtime.evidence.fold_evidence`), remembering what it was
    handed and the related-items records it would have published."""

    def __init__(self) -> None:
        self.seen: list[dict[str, list[HistoryEntry]]] = []
        self.published: list[RelatedItems] = []

    def __call__(self, histories: Mapping[str, Sequence[HistoryEntry]]) -> Evidence:
        self.seen.append({u: list(h) for u, h in histories.items()})
        state = build_state(
            history_events(histories), StreamsSettings(), positive="purchase", progress=False
        )
        self.published = [
            found
            for item_id in state.index.items
            if (found := state.index.published(item_id)) is not None and found.related
        ]
        return Evidence(related=state.related, popularity=state.popularity)


def profile_update(user_id: str, entries: Sequence[HistoryEntry]) -> dict[str, Any]:
    """A `profile-updates` record of `entries` (most recent first), as the recommender reads it."""
    return {
        "user_id": user_id,
        "history": [e.model_dump(mode="json") for e in entries],
        "last_event_type": "purchase",
        "last_item_id": entries[0].item_id,
        "trigger_event_ids": [f"{user_id}-e{len(entries)}"],
        "source_ts_ms": 0,
        "updated_at": "2024-01-01T00:00:00+00:00",
    }


def ring_store() -> ClientVectorStore:
    """An in-memory store holding `ring_items()` (the caller closes it)."""
    items = ring_items()
    store = ClientVectorStore(collection="items", path=":memory:")
    store.ensure_collection(items.matrix.shape[1])
    store.upsert(items.ids, items.matrix, [{"title": i} for i in items.ids])
    return store
