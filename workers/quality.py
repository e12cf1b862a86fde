"""Live quality, pure: each shopper action judged against the list the user had at that moment.

A published list (a `recommendations` record, or one of the shadow's) is in force for its user
from its Kafka timestamp until the next list of the same variant. An action of a judged type
(`JUDGED_EVENT_TYPES`: click, add to cart, purchase) at time t is judged against the variant's
latest list published at or before t, within `window_ms`; a list that answers this very event
(it names it among its triggers) is never the one the user acted on, whatever the clocks say.
The action is a hit when its item is in that list, at rank r (1 first), and its NDCG is
1 / log2(r + 1) (one relevant item: the ideal DCG is 1), 0 for a miss. An action with no list
in force is not judged (`no_list`, or `expired` past the window): hit rate and NDCG are over
judged actions only.

Bounded memory: the lists of at most `max_users` users (the least recently published-to is
forgotten first), at most `LISTS_PER_USER` per user and variant; the last `dedup_size` event
ids, so that a re-delivered event is judged once (`QualityJoin.judge` returns None).

`Holdback` orders the two streams: the events and the lists are read from co-partitioned
topics by one consumer, in no set order between them, so an action waits until every
variant's lists of its partition have been read up to its time (or, when a list partition has
nothing newer, `delay_ms`). Everything here takes plain values: no Kafka.
"""

from __future__ import annotations

import math
from bisect import insort
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from schemas import vocabulary

# The actions a list is judged by: the event types that are evaluation targets (a view says
# little; a return is a rejection).
JUDGED_EVENT_TYPES = frozenset(
    spec.name for spec in vocabulary.event_type_specs() if spec.target_rank is not None
)
# Lists kept per user and variant. More than one: lists are applied as soon as they are read,
# so a list published after an action may be in memory before the action is judged, and the
# one before it must still be there. A handful covers the lists read ahead of an action.
LISTS_PER_USER = 4

Outcome = Literal["judged", "no_list", "expired"]


@dataclass(frozen=True, slots=True, order=True)
class PublishedList:
    """One list as published: its Kafka timestamp, its items in rank order, the ids of the
    events it answers."""

    ts_ms: int
    items: tuple[str, ...] = field(compare=False)
    triggers: tuple[str, ...] = field(compare=False, default=())


@dataclass(frozen=True, slots=True)
class Action:
    """A behaviour event, as judged: who did what to which item, and its Kafka timestamp."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """One action judged against one variant's list: `rank` 1-based, None for a miss or
    when not judged (`outcome`)."""

    variant: str
    event_type: str
    outcome: Outcome
    rank: int | None = None

    @property
    def hit(self) -> bool:
        return self.rank is not None

    @property
    def ndcg(self) -> float:
        return ndcg_at(self.rank)


def ndcg_at(rank: int | None) -> float:
    """NDCG of one relevant item found at `rank` (1-based; None: not in the list)."""
    return 0.0 if rank is None else 1.0 / math.log2(rank + 1)


def list_in_force(lists: Sequence[PublishedList], action: Action) -> PublishedList | None:
    """The latest of `lists` (oldest first) published at or before the action that does not
    answer the action itself."""
    for published in reversed(lists):
        if published.ts_ms <= action.ts_ms and action.event_id not in published.triggers:
            return published
    return None


def judge(
    lists: Sequence[PublishedList], action: Action, *, variant: str, window_ms: float
) -> Verdict:
    """The verdict on `action` from one variant's lists of its user (oldest first)."""
    published = list_in_force(lists, action)
    if published is None:
        return Verdict(variant, action.event_type, "no_list")
    if action.ts_ms - published.ts_ms > window_ms:
        return Verdict(variant, action.event_type, "expired")
    try:
        rank: int | None = published.items.index(action.item_id) + 1
    except ValueError:
        rank = None
    return Verdict(variant, action.event_type, "judged", rank)


class RecentIds:
    """The last `size` ids seen, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, key: str) -> bool:
        """Whether `key` was seen already; remembers it either way."""
        if key in self._ids:
            return True
        self._ids[key] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)


class QualityJoin:
    """Every variant's latest lists per user, and the judging of actions against them."""

    def __init__(
        self, variants: Sequence[str], *, window_ms: float, max_users: int, dedup_size: int
    ) -> None:
        self.variants = tuple(variants)
        self.window_ms = window_ms
        self.max_users = max_users
        self._lists: OrderedDict[str, dict[str, list[PublishedList]]] = OrderedDict()
        self._recent = RecentIds(dedup_size)

    def __len__(self) -> int:
        """Users with lists kept."""
        return len(self._lists)

    def publish(self, variant: str, user_id: str, published: PublishedList) -> None:
        """A list read from `variant`'s topic; the same list read twice is kept once."""
        by_variant = self._lists.get(user_id)
        if by_variant is None:
            by_variant = self._lists[user_id] = {}
        self._lists.move_to_end(user_id)
        lists = by_variant.setdefault(variant, [])
        if any(p.ts_ms == published.ts_ms and p.items == published.items for p in lists):
            return
        insort(lists, published)  # by timestamp: a list re-read after a rewind may be older
        del lists[:-LISTS_PER_USER]
        while len(self._lists) > self.max_users:
            self._lists.popitem(last=False)

    def erase(self, variant: str, user_id: str) -> None:
        """The variant's list of the user was deleted (a tombstone: the user was erased)."""
        by_variant = self._lists.get(user_id)
        if by_variant is not None:
            by_variant.pop(variant, None)
            if not by_variant:
                del self._lists[user_id]

    def judge(self, action: Action) -> list[Verdict] | None:
        """One verdict per variant; [] for an action of a type not judged; None for an event
        judged already (a re-delivery, by `event_id`)."""
        if action.event_type not in JUDGED_EVENT_TYPES:
            return []
        if self._recent.seen(action.event_id):
            return None
        by_variant = self._lists.get(action.user_id, {})
        return [
            judge(by_variant.get(v, ()), action, variant=v, window_ms=self.window_ms)
            for v in self.variants
        ]


@dataclass(slots=True)
class _Waiting:
    offset: int
    action: Action | None  # None: an event not to judge, held only to keep offsets in order
    arrived_ms: float


class Holdback:
    """Actions wait, per partition in offset order, until every variant's lists of the same
    partition have been read up to their time.

    An action at time t in partition p is released once each variant's list partition p has
    been read up to a list at or after t, or, for a list partition that has nothing newer to
    read (caught up), `delay_ms` after the action was read. At most `max_pending` wait: past
    that the oldest are released as they are (memory is bounded; a verdict may then miss a
    list not read yet). `committable` gives, per partition, the offset up to which every event
    is released: the next offset to commit.
    """

    def __init__(self, variants: Sequence[str], *, delay_ms: float, max_pending: int) -> None:
        self.variants = tuple(variants)
        self.delay_ms = delay_ms
        self.max_pending = max_pending
        self._waiting: dict[int, deque[_Waiting]] = {}
        self._read_up_to: dict[tuple[str, int], int] = {}  # (variant, partition) -> list ts
        self._released: dict[int, int] = {}  # partition -> next offset
        self._pending = 0

    def __len__(self) -> int:
        return self._pending

    def add(self, partition: int, offset: int, action: Action | None, *, now_ms: float) -> None:
        """An event read at `offset` of `partition`: an action to judge, or None (its offset
        only)."""
        self._waiting.setdefault(partition, deque()).append(_Waiting(offset, action, now_ms))
        self._pending += 1

    def list_read(self, variant: str, partition: int, ts_ms: int) -> None:
        """A list of `variant` with timestamp `ts_ms` was read from `partition`."""
        key = (variant, partition)
        self._read_up_to[key] = max(self._read_up_to.get(key, ts_ms), ts_ms)

    def release(self, *, now_ms: float, caught_up: Callable[[str, int], bool]) -> list[Action]:
        """The actions whose lists have been read, in offset order per partition.
        `caught_up(variant, partition)`: that list partition has nothing newer to read now."""
        out: list[Action] = []
        for partition, queue in self._waiting.items():
            while queue and self._ready(partition, queue[0], now_ms, caught_up):
                self._pop(partition, queue, out)
        while self._pending > self.max_pending:
            partition, queue = min(
                ((p, q) for p, q in self._waiting.items() if q), key=lambda pq: pq[1][0].arrived_ms
            )
            self._pop(partition, queue, out)
        return out

    def _ready(
        self,
        partition: int,
        waiting: _Waiting,
        now_ms: float,
        caught_up: Callable[[str, int], bool],
    ) -> bool:
        action = waiting.action
        if action is None:
            return True
        waited = now_ms - waiting.arrived_ms >= self.delay_ms
        return all(
            self._read_up_to.get((v, partition), -1) >= action.ts_ms
            or (waited and caught_up(v, partition))
            for v in self.variants
        )

    def _pop(self, partition: int, queue: deque[_Waiting], out: list[Action]) -> None:
        waiting = queue.popleft()
        self._pending -= 1
        self._released[partition] = waiting.offset + 1
        if waiting.action is not None:
            out.append(waiting.action)

    def committable(self) -> dict[int, int]:
        """Partition -> the next offset to commit: every event before it is released."""
        return {
            p: (queue[0].offset if queue else self._released[p])
            for p, queue in self._waiting.items()
            if queue or p in self._released
        }

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions this consumer no longer owns: their waiting events are its new owner's."""
        for partition in partitions:
            self._pending -= len(self._waiting.pop(partition, ()))
            self._released.pop(partition, None)
            for variant in self.variants:
                self._read_up_to.pop((variant, partition), None)
