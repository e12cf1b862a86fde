"""The leave-one-out protocol of the offline evaluation.

Per user, events in time order; the target is the user's last positive event (purchase;
add_to_cart, then click, where a data set has none) whose item the user had not interacted with
before; everything before it is the history. Histories are folded with
`streams.profile.fold_event` and feed `streams.association` (the targets never do).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relata.lab.datasets import EvaluationError, load_events, load_items, positive_type
from schemas.messages import BehaviorEvent, CatalogItem, EventType, HistoryEntry
from schemas.settings import StreamsSettings
from streams.association import AssociationConfig
from streams.neighbours import AssociationIndex
from streams.profile import FoldConfig, fold_event
from workers.ranking import RelatedTable, popularity_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    user_id: str
    target: str


@dataclass
class Split:
    """Targets and the events that may be learned from (histories only)."""

    cases: list[Case]
    history_events: list[BehaviorEvent]
    skipped: Counter[str] = field(default_factory=Counter)


def target_index(events: Sequence[BehaviorEvent], positive: EventType) -> int | None:
    """Index of the user's last positive event on an item not seen before it, or None."""
    first_seen: dict[str, int] = {}
    for n, e in enumerate(events):
        first_seen.setdefault(e.item_id, n)
    for n in range(len(events) - 1, 0, -1):
        e = events[n]
        if e.event_type == positive and first_seen[e.item_id] == n:
            return n
    return None


def split_users(events: Sequence[BehaviorEvent], *, positive: EventType, holdout: int = 1) -> Split:
    """Leave-one-out split. holdout=2 drops the final target first and takes the one before
    it (the internal validation split of `relata train`); its history never holds the
    evaluation target."""
    by_user: dict[str, list[BehaviorEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    cases: list[Case] = []
    kept: list[BehaviorEvent] = []
    skipped: Counter[str] = Counter()
    for user_id, seq in by_user.items():
        cut: int | None = len(seq)
        target: int | None = None
        usable = len(seq)  # events that may be learned from: before the first held-out target
        for n in range(holdout):
            target = target_index(seq[:cut], positive) if cut else None
            if target is None:
                break
            if n == 0 and holdout > 1:
                usable = target
            cut = target
        if target is None:
            skipped["no new positive target"] += 1
            # Their events before any held-out target still teach the statistics.
            kept.extend(seq[:usable])
            continue
        history = seq[:target]
        if not any(e.event_type != "return" for e in history):
            skipped["empty history"] += 1
            continue
        cases.append(Case(user_id=user_id, target=seq[target].item_id))
        kept.extend(history)
    kept.sort(key=lambda e: e.ts)
    return Split(cases=cases, history_events=kept, skipped=skipped)


@dataclass
class State:
    """What the live system would hold after the history events: profiles, association
    statistics, every item's related-items list (as the recommender reads the compacted topic),
    the popularity ranking derived from those lists, and the available items."""

    profiles: dict[str, list[HistoryEntry]]
    index: AssociationIndex
    related: RelatedTable
    popularity: list[tuple[str, float]]
    item_counts: dict[str, float]  # positive events per item, for the report's breakdowns
    available: frozenset[str] = frozenset()


def build_state(
    events: Sequence[BehaviorEvent],
    settings: StreamsSettings,
    *,
    positive: EventType,
    available: Iterable[str] = (),
    progress: bool = True,
) -> State:
    """Fold events (time order) into profiles and association statistics with the live code,
    then hold every item's related list as the compacted topic would: the list the association
    agent published at the item's last touch (a list with no neighbour is never published)."""
    fold_config = FoldConfig.from_settings(settings)
    index = AssociationIndex(AssociationConfig.from_settings(settings))
    profiles: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    it: Iterable[BehaviorEvent] = events
    if progress:
        from tqdm import tqdm

        it = tqdm(events, desc="fold histories", unit="ev", mininterval=1.0)
    for event in it:
        result = fold_event(profiles.get(event.user_id), event, fold_config)
        profiles[event.user_id] = result.profile
        index.observe_event(result, event)
        if event.event_type == positive:
            counts[event.item_id] += 1
    table = RelatedTable()
    for item_id in index.items:
        found = index.published(item_id)
        if found is not None and found.related:
            table.put(found)
    return State(
        profiles={u: list(p.history) for u, p in profiles.items()},
        index=index,
        related=table,
        popularity=popularity_of(table.lists()),
        item_counts={i: float(c) for i, c in counts.items()},
        available=frozenset(available),
    )


@dataclass
class Prepared:
    """Everything the methods share: split, state, item vectors, user vectors."""

    split: Split
    state: State
    item_ids: list[str]
    titles: dict[str, str]
    item_matrix: np.ndarray | None = None
    history_idx: list[list[int]] = field(default_factory=list)
    # The catalog in item_ids order: item_vectors encodes its texts.
    items: list[CatalogItem] = field(default_factory=list)


def prepare(
    data_dir: Path,
    *,
    holdout: int = 1,
    settings: StreamsSettings | None = None,
    max_users: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Prepared:
    """Load a data set, split it and fold the histories."""
    items = load_items(data_dir)
    events = load_events(data_dir)
    positive = positive_type(events)
    known = {it.item_id for it in items}
    unknown = sum(1 for e in events if e.item_id not in known)
    if unknown:
        logger.warning("events on items missing from items.jsonl count=%d (dropped)", unknown)
        events = [e for e in events if e.item_id in known]
    split = split_users(events, positive=positive, holdout=holdout)
    if max_users is not None and len(split.cases) > max_users:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(split.cases), size=max_users, replace=False).tolist())
        split.cases = [split.cases[i] for i in keep]
    if not split.cases:
        raise EvaluationError(f"no user of {data_dir} has a usable target ({dict(split.skipped)})")
    state = build_state(
        split.history_events,
        settings or StreamsSettings(),
        positive=positive,
        available=(it.item_id for it in items if it.available),
        progress=progress,
    )
    item_ids = [it.item_id for it in items]
    pos = {i: n for n, i in enumerate(item_ids)}
    history_idx = [[pos[e.item_id] for e in state.profiles[c.user_id]] for c in split.cases]
    titles = {it.item_id: it.title for it in items if it.title}
    return Prepared(
        split=split,
        state=state,
        item_ids=item_ids,
        titles=titles,
        history_idx=history_idx,
        items=items,
    )
