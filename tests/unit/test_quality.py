"""Live quality's pure join: hit, rank, NDCG, the window, the list in force, de-duplication,
bounded memory, and the holdback that waits for the lists of an action's time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.quality import (
    JUDGED_EVENT_TYPES,
    LISTS_PER_USER,
    Action,
    Holdback,
    PublishedList,
    QualityJoin,
    RecentIds,
    Verdict,
    judge,
    ndcg_at,
)

WINDOW_MS = 30 * 60 * 1000


def _join(**kwargs: int) -> QualityJoin:
    options = {"max_users": 100, "dedup_size": 100} | kwargs
    return QualityJoin(("live", "shadow"), window_ms=WINDOW_MS, **options)


def _action(item: str, ts_ms: int, *, event_id: str = "e1", event_type: str = "purchase") -> Action:
    return Action(event_id, "u1", item, event_type, ts_ms)


def _list(ts_ms: int, *items: str, triggers: tuple[str, ...] = ("t0",)) -> PublishedList:
    return PublishedList(ts_ms, items, triggers)


def test_judged_types_are_the_evaluation_targets() -> None:
    assert {"click", "add_to_cart", "purchase"} == JUDGED_EVENT_TYPES


def test_a_hit_has_its_rank_and_ndcg() -> None:
    join = _join()
    join.publish("live", "u1", _list(1_000, "a", "b", "c"))
    join.publish("shadow", "u1", _list(1_000, "c", "x"))
    verdicts = join.judge(_action("c", 5_000))
    assert verdicts == [
        Verdict("live", "purchase", "judged", 3),
        Verdict("shadow", "purchase", "judged", 1),
    ]
    live, shadow = verdicts
    assert live.hit and live.ndcg == pytest.approx(1 / math.log2(4))
    assert shadow.ndcg == 1.0


def test_a_miss_counts_as_judged_with_ndcg_zero() -> None:
    verdict = judge(
        [_list(1_000, "a", "b")], _action("z", 2_000), variant="live", window_ms=WINDOW_MS
    )
    assert verdict == Verdict("live", "purchase", "judged", None)
    assert not verdict.hit and verdict.ndcg == 0.0


def test_ndcg_falls_with_rank() -> None:
    values = [ndcg_at(rank) for rank in range(1, 11)]
    assert values[0] == 1.0 and values == sorted(values, reverse=True)
    assert ndcg_at(None) == 0.0


def test_no_list_and_expired_are_not_judged() -> None:
    join = _join()
    assert [v.outcome for v in join.judge(_action("a", 1_000, event_id="e1")) or []] == [
        "no_list",
        "no_list",
    ]
    join.publish("live", "u1", _list(1_000, "a"))
    late = _action("a", 1_000 + WINDOW_MS + 1, event_id="e2")
    assert [v.outcome for v in join.judge(late) or []] == ["expired", "no_list"]
    just_in = _action("a", 1_000 + WINDOW_MS, event_id="e3")
    assert (join.judge(just_in) or [])[0] == Verdict("live", "purchase", "judged", 1)


def test_the_list_in_force_is_the_latest_before_the_action() -> None:
    """A list published after the action (read first: topics interleave) is not the one the
    user acted on, nor is a list answering the action itself whatever the clocks say."""
    lists = [_list(1_000, "old"), _list(2_000, "current"), _list(3_000, "later")]
    assert judge(lists, _action("current", 2_500), variant="v", window_ms=WINDOW_MS).rank == 1
    assert judge(lists, _action("later", 2_500), variant="v", window_ms=WINDOW_MS).rank is None
    answering = [_list(1_000, "old"), _list(2_000, "new", triggers=("e1",))]
    verdict = judge(answering, _action("old", 2_500, event_id="e1"), variant="v", window_ms=1e9)
    assert verdict.rank == 1  # judged against the list before the one answering e1


def test_lists_arriving_out_of_order_and_twice_are_kept_once_in_time_order() -> None:
    join = _join()
    join.publish("live", "u1", _list(3_000, "c"))
    join.publish("live", "u1", _list(1_000, "a"))
    join.publish("live", "u1", _list(3_000, "c"))  # re-read after a rewind
    assert (join.judge(_action("a", 2_000)) or [])[0].rank == 1


def test_only_judged_types_count_and_views_leave_no_trace() -> None:
    join = _join(dedup_size=1)
    join.publish("live", "u1", _list(1_000, "a"))
    assert join.judge(_action("a", 2_000, event_id="v", event_type="view")) == []
    assert join.judge(_action("a", 2_000, event_id="r", event_type="return")) == []
    assert join.judge(_action("a", 2_000, event_id="p", event_type="click")) is not None


def test_a_redelivered_event_is_judged_once() -> None:
    join = _join()
    join.publish("live", "u1", _list(1_000, "a"))
    first = join.judge(_action("a", 2_000, event_id="e7"))
    assert first is not None and first[0].hit
    assert join.judge(_action("a", 2_000, event_id="e7")) is None


def test_dedup_memory_is_bounded() -> None:
    recent = RecentIds(3)
    for key in "abcd":
        assert not recent.seen(key)
    assert len(recent) == 3
    assert recent.seen("d") and not recent.seen("a")  # "a" was forgotten first


def test_users_are_bounded_least_recently_published_first() -> None:
    join = _join(max_users=2)
    for user in ("u1", "u2", "u3"):
        join.publish("live", user, _list(1_000, "a"))
    join.publish("live", "u2", _list(1_500, "b"))
    join.publish("live", "u4", _list(1_000, "a"))
    assert len(join) == 2
    survivors = {
        user
        for user in ("u1", "u2", "u3", "u4")
        if (join.judge(Action(f"e-{user}", user, "a", "purchase", 2_000)) or [])[0].outcome
        == "judged"
    }
    assert survivors == {"u2", "u4"}


def test_lists_per_user_are_bounded() -> None:
    join = _join()
    for n in range(LISTS_PER_USER + 3):
        join.publish("live", "u1", _list(1_000 + n, f"i{n}"))
    # The oldest fell out: an action before the kept ones finds no list.
    assert (join.judge(_action("i0", 1_000, event_id="x")) or [])[0].outcome == "no_list"
    last = LISTS_PER_USER + 2
    assert (join.judge(_action(f"i{last}", 2_000, event_id="y")) or [])[0].rank == 1


def test_an_erased_users_list_is_forgotten() -> None:
    join = _join()
    join.publish("live", "u1", _list(1_000, "a"))
    join.erase("live", "u1")
    assert len(join) == 0
    assert (join.judge(_action("a", 2_000)) or [])[0].outcome == "no_list"


@given(
    items=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=20, unique=True),
    pick=st.integers(min_value=0, max_value=30),
)
def test_rank_is_the_position_of_the_item(items: list[str], pick: int) -> None:
    item = items[pick] if pick < len(items) else "\x00absent"
    verdict = judge([_list(0, *items)], _action(item, 1), variant="v", window_ms=10)
    assert verdict.rank == (pick + 1 if pick < len(items) else None)
    assert 0.0 <= verdict.ndcg <= 1.0


# -- the holdback ---------------------------------------------------------------------------


def _never(_variant: str, _partition: int) -> bool:
    return False


def _always(_variant: str, _partition: int) -> bool:
    return True


def test_an_action_waits_until_every_variants_lists_are_read_to_its_time() -> None:
    hold = Holdback(("live", "shadow"), delay_ms=1_000, max_pending=100)
    action = _action("a", 5_000)
    hold.add(0, 10, action, now_ms=0)
    hold.list_read("live", 0, 6_000)
    assert hold.release(now_ms=10, caught_up=_never) == []
    hold.list_read("shadow", 1, 9_000)  # another partition says nothing about partition 0
    assert hold.release(now_ms=10, caught_up=_never) == []
    hold.list_read("shadow", 0, 5_000)
    assert hold.release(now_ms=10, caught_up=_never) == [action]
    assert hold.committable() == {0: 11}


def test_a_caught_up_list_partition_releases_after_the_delay_only() -> None:
    hold = Holdback(("live",), delay_ms=1_000, max_pending=100)
    action = _action("a", 5_000)
    hold.add(0, 0, action, now_ms=0)
    assert hold.release(now_ms=999, caught_up=_always) == []
    # Behind on its lists: waits however long (a restart reads the window's lists first).
    assert hold.release(now_ms=60_000, caught_up=_never) == []
    assert hold.release(now_ms=60_000, caught_up=_always) == [action]


def test_events_are_released_in_offset_order_and_commits_never_pass_a_waiting_one() -> None:
    hold = Holdback(("live",), delay_ms=1_000, max_pending=100)
    first, second = _action("a", 5_000, event_id="e1"), _action("b", 4_000, event_id="e2")
    hold.add(0, 0, None, now_ms=0)  # a view: only its offset
    hold.add(0, 1, first, now_ms=0)
    hold.add(0, 2, second, now_ms=0)
    hold.add(1, 7, None, now_ms=0)
    hold.list_read("live", 0, 4_500)  # enough for the second, not the first
    assert hold.release(now_ms=1, caught_up=_never) == []
    assert hold.committable() == {0: 1, 1: 8}
    hold.list_read("live", 0, 5_000)
    assert hold.release(now_ms=1, caught_up=_never) == [first, second]
    assert hold.committable() == {0: 3, 1: 8}
    assert len(hold) == 0


def test_the_holdback_is_bounded() -> None:
    hold = Holdback(("live",), delay_ms=1_000, max_pending=2)
    actions = [_action("a", 5_000 + n, event_id=f"e{n}") for n in range(4)]
    for n, action in enumerate(actions):
        hold.add(n % 2, n, action, now_ms=n)
    assert hold.release(now_ms=10, caught_up=_never) == actions[:2]
    assert len(hold) == 2


def test_forgotten_partitions_drop_their_waiting_events() -> None:
    hold = Holdback(("live",), delay_ms=1_000, max_pending=100)
    hold.add(0, 0, _action("a", 5_000), now_ms=0)
    hold.add(1, 0, _action("a", 5_000, event_id="e2"), now_ms=0)
    hold.forget([0])
    assert len(hold) == 1
    assert set(hold.committable()) == {1}
