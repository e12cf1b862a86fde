"""Folding events into user profiles: weights, decay, bounds, de-duplication, baskets."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.profile as profile_module
from relata.runtime.replay import iter_jsonl
from schemas import vocabulary
from schemas.messages import BehaviorEvent, EventType, UserProfile
from schemas.settings import StreamsSettings
from streams.profile import FoldConfig, fold_event, fold_user_events, profile_update

T0 = datetime(2024, 1, 1, tzinfo=UTC)
HOUR = 3600.0

WEIGHTS: dict[EventType, float] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 4.0,
    "purchase": 8.0,
    "return": -8.0,
}


def config(**overrides: float) -> FoldConfig:
    values: dict[str, float] = {
        "half_life_s": HOUR,
        "history_size": 3,
        "dedup_size": 4,
        "session_window_s": 1800.0,
        "history_window": 2,
    }
    values.update(overrides)
    return FoldConfig(
        weights=WEIGHTS,
        half_life_s=values["half_life_s"],
        history_size=int(values["history_size"]),
        dedup_size=int(values["dedup_size"]),
        session_window_s=values["session_window_s"],
        history_window=int(values["history_window"]),
    )


def ev(
    event_id: str,
    item: str,
    *,
    at_s: float = 0.0,
    kind: EventType = "purchase",
    user: str = "u1",
    session: str | None = None,
) -> BehaviorEvent:
    return BehaviorEvent(
        event_id=event_id,
        user_id=user,
        item_id=item,
        event_type=kind,
        ts=T0 + timedelta(seconds=at_s),
        session_id=session,
    )


def fold_all(events: list[BehaviorEvent], cfg: FoldConfig) -> UserProfile | None:
    profile = None
    for e in events:
        profile = fold_event(profile, e, cfg).profile
    return profile


def test_from_settings_maps_every_weight_and_window() -> None:
    s = StreamsSettings(weight_click=3.0, half_life_hours=2.0, assoc_history_window=7)
    cfg = FoldConfig.from_settings(s)
    assert cfg.weights["click"] == 3.0
    assert cfg.weights["return"] == s.weight_return
    assert cfg.half_life_s == 7200.0
    assert cfg.history_window == 7
    assert cfg.history_size == s.history_size
    assert cfg.session_window_s == s.assoc_session_window_s


def test_missing_weight_is_rejected_with_the_valid_types() -> None:
    with pytest.raises(ValueError, match="return"):
        FoldConfig(weights={"view": 1.0}, half_life_s=1.0)  # type: ignore[arg-type]


def test_weight_is_decayed_sum_of_event_type_weights() -> None:
    cfg = config()
    p = fold_all([ev("1", "a", kind="view"), ev("2", "a", at_s=HOUR, kind="purchase")], cfg)
    assert p is not None
    (entry,) = p.history
    # view (1) decayed over one half-life, plus a purchase (8)
    assert entry.weight == pytest.approx(0.5 + 8.0)
    assert entry.count == 2
    assert entry.last_event_type == "purchase"
    assert entry.last_ts == T0 + timedelta(seconds=HOUR)


def test_history_is_bounded_most_recent_first() -> None:
    cfg = config(history_size=3)
    events = [ev(str(i), f"i{i}", at_s=i * 10) for i in range(5)]
    p = fold_all(events, cfg)
    assert p is not None
    assert [h.item_id for h in p.history] == ["i4", "i3", "i2"]
    # touching an old item moves it to the front
    p2 = fold_event(p, ev("x", "i2", at_s=100, kind="view"), cfg).profile
    assert [h.item_id for h in p2.history] == ["i2", "i4", "i3"]


def test_duplicate_event_is_a_no_op() -> None:
    cfg = config()
    first = fold_event(None, ev("1", "a"), cfg)
    again = fold_event(first.profile, ev("1", "a"), cfg)
    assert first.changed
    assert not again.changed
    assert again.profile is first.profile
    assert again.basket_kind is None and again.basket_items == () and again.prior_items == ()


def test_dedup_list_is_bounded_and_newest_last() -> None:
    cfg = config(dedup_size=4)
    p = fold_all([ev(str(i), "a", at_s=i) for i in range(10)], cfg)
    assert p is not None
    assert p.recent_event_ids == ["6", "7", "8", "9"]


def test_return_makes_weight_negative_and_item_stays_in_history() -> None:
    cfg = config()
    p = fold_all([ev("1", "a"), ev("2", "a", at_s=HOUR, kind="return", session="c1")], cfg)
    assert p is not None
    (entry,) = p.history
    assert entry.weight == pytest.approx(4.0 - 8.0)
    assert entry.last_event_type == "return"


def test_return_opens_no_basket_and_keeps_the_session() -> None:
    cfg = config()
    p = fold_all([ev("1", "a", session="s1"), ev("2", "x", at_s=1, session="s1")], cfg)
    ret = fold_event(p, ev("3", "a", at_s=5, kind="return", session="c9"), cfg)
    assert ret.changed and ret.basket_kind is None and not ret.sequence_step
    assert ret.profile.session_id == "s1"
    assert ret.profile.session_items == ["a", "x"]
    nxt = fold_event(ret.profile, ev("4", "b", at_s=6, session="s1"), cfg)
    # the returned item no longer counts as bought with the rest of its basket
    assert nxt.basket_items == ("x",)


def test_out_of_order_event_decays_down_and_keeps_recency() -> None:
    cfg = config()
    late = fold_all(
        [ev("1", "a", at_s=2 * HOUR), ev("2", "b", at_s=2 * HOUR + 1), ev("3", "a", kind="view")],
        cfg,
    )
    assert late is not None
    a = next(h for h in late.history if h.item_id == "a")
    # the late view (weight 1) is valued two half-lives before the entry's time
    assert a.weight == pytest.approx(8.0 + 0.25)
    assert a.last_ts == T0 + timedelta(seconds=2 * HOUR)
    assert a.last_event_type == "purchase"
    assert [h.item_id for h in late.history] == ["b", "a"]
    assert late.last_ts == T0 + timedelta(seconds=2 * HOUR + 1)


def test_basket_by_session_id_and_prior_items() -> None:
    cfg = config(history_window=2, history_size=10)
    r1 = fold_event(None, ev("1", "a", session="s1"), cfg)
    assert r1.basket_kind == "bought_together" and r1.new_basket and r1.basket_items == ()
    r2 = fold_event(r1.profile, ev("2", "b", at_s=1, session="s1"), cfg)
    assert r2.basket_items == ("a",) and not r2.new_basket
    # The order a basket is filled in is a sequence: its earlier items are transition sources.
    assert r2.prior_items == ("a",) and r2.sequence_step
    r3 = fold_event(r2.profile, ev("3", "c", at_s=2, session="s1"), cfg)
    assert r3.basket_items == ("a", "b")
    assert r3.prior_items == ("b", "a")
    r4 = fold_event(r3.profile, ev("4", "d", at_s=9000, session="s2"), cfg)
    assert r4.new_basket and r4.basket_items == ()
    assert r4.prior_items == ("c", "b")  # most recent first, up to the window of 2
    assert r4.sequence_step


def test_repeat_of_an_item_in_its_basket_is_not_counted_again() -> None:
    cfg = config()
    r1 = fold_event(None, ev("1", "a", session="s1"), cfg)
    r2 = fold_event(r1.profile, ev("2", "b", at_s=1, session="s1"), cfg)
    r3 = fold_event(r2.profile, ev("3", "a", at_s=2, session="s1"), cfg)
    assert r3.changed
    assert r3.basket_kind is None and not r3.sequence_step
    assert r3.profile.session_items == ["a", "b"]
    assert r3.profile.history[0].count == 2


def test_basket_by_time_window_without_session_id() -> None:
    cfg = config(session_window_s=1800.0, history_size=10)
    r1 = fold_event(None, ev("1", "a"), cfg)
    r2 = fold_event(r1.profile, ev("2", "b", at_s=600), cfg)
    assert r2.basket_items == ("a",)
    r3 = fold_event(r2.profile, ev("3", "c", at_s=600 + 1801), cfg)
    assert r3.basket_items == () and r3.new_basket
    assert r3.prior_items == ("b", "a")


def test_views_and_purchases_make_different_baskets() -> None:
    cfg = config(history_size=10)
    r1 = fold_event(None, ev("1", "a", kind="view", session="s"), cfg)
    r2 = fold_event(r1.profile, ev("2", "b", at_s=1, kind="purchase", session="s"), cfg)
    assert r2.basket_kind == "bought_together"
    assert r2.basket_items == ()  # "a" was only viewed
    r3 = fold_event(r2.profile, ev("3", "c", at_s=2, kind="click", session="s"), cfg)
    assert r3.basket_kind == "also_viewed"
    assert r3.basket_items == ("a", "b")
    # buying the viewed item joins the purchase basket once
    r4 = fold_event(r3.profile, ev("4", "a", at_s=3, kind="add_to_cart", session="s"), cfg)
    assert r4.basket_kind == "bought_together"
    assert r4.basket_items == ("b",)
    assert not r4.sequence_step


def test_profile_update_carries_history_and_trigger() -> None:
    cfg = config()
    event = ev("1", "a", kind="click")
    p = fold_event(None, event, cfg).profile
    now = T0 + timedelta(minutes=1)
    update = profile_update(p, trigger_event_ids=["1"], source_ts_ms=123, now=now, event=event)
    assert update.user_id == "u1"
    assert update.history == p.history
    assert update.last_event_type == "click" and update.last_item_id == "a"
    assert update.trigger_event_ids == ["1"] and update.source_ts_ms == 123
    assert update.updated_at == now


# ---- properties ------------------------------------------------------------------------------

event_specs = st.lists(
    st.tuples(
        st.integers(0, 30),  # event id (collisions = re-deliveries)
        st.sampled_from(["a", "b", "c", "d", "e", "f"]),
        st.sampled_from(vocabulary.event_types()),
        st.integers(-5000, 50_000),  # seconds, out of order on purpose
        st.sampled_from([None, "s1", "s2"]),
    ),
    max_size=40,
)


def _events(
    specs: list[tuple[int, str, EventType, int, str | None]], user: str
) -> list[BehaviorEvent]:
    return [
        ev(f"{user}-{i}", item, at_s=t + 10_000, kind=kind, user=user, session=s)
        for i, item, kind, t, s in specs
    ]


@settings(max_examples=150, deadline=None)
@given(event_specs)
def test_fold_never_exceeds_bounds(
    specs: list[tuple[int, str, EventType, int, str | None]],
) -> None:
    cfg = config(history_size=4, dedup_size=5, history_window=2)
    profile = None
    for e in _events(specs, "u"):
        result = fold_event(profile, e, cfg)
        profile = result.profile
        ids = [h.item_id for h in profile.history]
        assert len(ids) <= cfg.history_size and len(set(ids)) == len(ids)
        stamps = [h.last_ts for h in profile.history]
        assert stamps == sorted(stamps, reverse=True)
        assert len(profile.recent_event_ids) <= cfg.dedup_size
        assert len(profile.session_items) <= cfg.session_size
        assert len(result.prior_items) <= cfg.history_window
        assert e.item_id not in result.basket_items and e.item_id not in result.prior_items


@settings(max_examples=100, deadline=None)
@given(event_specs, st.data())
def test_refolding_any_recent_event_is_a_no_op(
    specs: list[tuple[int, str, EventType, int, str | None]], data: st.DataObject
) -> None:
    cfg = config(dedup_size=50)
    events = _events(specs, "u")
    profile = fold_all(events, cfg)
    if profile is None:
        return
    again = data.draw(st.sampled_from(events))
    result = fold_event(profile, again, cfg)
    assert not result.changed and result.profile is profile


@settings(max_examples=100, deadline=None)
@given(event_specs, event_specs, st.randoms(use_true_random=False))
def test_interleaving_of_unrelated_users_is_irrelevant(
    a: list[tuple[int, str, EventType, int, str | None]],
    b: list[tuple[int, str, EventType, int, str | None]],
    rnd: object,
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    cfg = config()
    ea, eb = _events(a, "ua"), _events(b, "ub")
    alone = {"ua": fold_all(ea, cfg), "ub": fold_all(eb, cfg)}
    # a random merge that keeps each user's own order
    merged: list[BehaviorEvent] = []
    ia = ib = 0
    while ia < len(ea) or ib < len(eb):
        if ib >= len(eb) or (ia < len(ea) and rnd.random() < 0.5):
            merged.append(ea[ia])
            ia += 1
        else:
            merged.append(eb[ib])
            ib += 1
    profiles: dict[str, UserProfile] = {}
    for e in merged:
        profiles[e.user_id] = fold_event(profiles.get(e.user_id), e, cfg).profile
    assert profiles.get("ua") == alone["ua"]
    assert profiles.get("ub") == alone["ub"]


def test_large_basket_pairs_with_its_most_recent_items_only() -> None:
    cfg = replace(config(history_size=10), basket_pairs=2)
    profile = None
    results = []
    for n, item in enumerate("abcd"):
        result = fold_event(profile, ev(str(n), item, at_s=n, session="s1"), cfg)
        results.append(result)
        profile = result.profile
    assert [r.basket_items for r in results] == [(), ("a",), ("a", "b"), ("b", "c")]
    assert [r.new_basket for r in results] == [True, False, False, False]
    # The basket still remembers "a" (session_size): a repeat is not a new basket item.
    repeat = fold_event(profile, ev("9", "a", at_s=9, session="s1"), cfg)
    assert repeat.changed and repeat.basket_kind is None and not repeat.sequence_step


def test_basket_pairs_setting_bounds_pairs_and_keeps_session_memory() -> None:
    assert FoldConfig.from_settings(StreamsSettings()).basket_pairs == 30
    cfg = FoldConfig.from_settings(StreamsSettings(assoc_basket_pairs=250))
    assert cfg.basket_pairs == 250
    assert cfg.session_size >= 250
    with pytest.raises(ValueError, match="basket_pairs"):
        replace(cfg, basket_pairs=0)


def test_fold_user_events_equals_event_by_event_and_counts_duplicates() -> None:
    cfg = config()
    events = [
        ev("e1", "i1", session="b1"),
        ev("e2", "i2", at_s=60, session="b1"),
        ev("e1", "i1", session="b1"),  # re-delivered
        ev("e3", "i3", at_s=120, kind="view"),
    ]
    fold = fold_user_events(None, events, cfg)
    assert fold.profile == fold_all(events, cfg)
    assert [at for at, _ in fold.changed] == [0, 1, 3]
    assert fold.duplicates == 1 and fold.failed == []
    # Each kept result is that event's own fold: its basket context, not the batch's.
    assert [result.basket_items for _, result in fold.changed] == [(), ("i1",), ()]


def test_fold_user_events_sets_aside_an_event_whose_fold_raises_without_a_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = profile_module._basket_context

    # The basket context is read after the event's history entry is computed: a fold that
    # raises there must leave neither (the profile is as if the event never came).
    def failing_on_e2(
        state: Any, event: BehaviorEvent, kind: Any, cfg: FoldConfig
    ) -> tuple[profile_module.EventFold, list[str]]:
        if event.event_id == "e2":
            raise RuntimeError("boom")
        return real(state, event, kind, cfg)

    monkeypatch.setattr(profile_module, "_basket_context", failing_on_e2)
    events = [ev("e1", "i1"), ev("e2", "i2", at_s=60), ev("e3", "i3", at_s=120)]
    fold = fold_user_events(None, events, config())
    assert [(at, str(exc)) for at, exc in fold.failed] == [(1, "boom")]
    assert [at for at, _ in fold.changed] == [0, 2]
    assert fold.profile is not None
    assert [h.item_id for h in fold.profile.history] == ["i3", "i1"]
    assert fold.profile.recent_event_ids == ["e1", "e3"]
    assert fold.profile == fold_all([events[0], events[2]], config())


def test_batched_fold_equals_the_event_by_event_fold_on_real_baskets() -> None:
    """online-retail's wholesale invoices (long baskets, returns, repeats), a re-delivered
    event now and then: the profile agent's batched fold gives the profiles and association
    contexts that folding one event at a time gives."""
    data = Path(__file__).resolve().parents[2] / "data" / "online-retail" / "events.jsonl.gz"
    cfg = FoldConfig.from_settings(StreamsSettings())
    raws = itertools.islice(iter_jsonl(data), 3000)
    events = [BehaviorEvent.model_validate_json(raw) for _, raw in raws]
    events = [e for n, event in enumerate(events) for e in [event] * (1 + (n % 40 == 0))]

    one_by_one: dict[str, UserProfile] = {}
    expected: list[tuple[str, Any]] = []
    for event in events:
        result = fold_event(one_by_one.get(event.user_id), event, cfg)
        one_by_one[event.user_id] = result.profile
        expected.append((event.event_id, context_of(result)))

    batched: dict[str, UserProfile] = {}
    got: list[tuple[str, Any]] = []
    for start in range(0, len(events), 250):
        by_user: dict[str, list[BehaviorEvent]] = {}
        for event in events[start : start + 250]:
            by_user.setdefault(event.user_id, []).append(event)
        for user_id, user_events in by_user.items():
            fold = fold_user_events(batched.get(user_id), user_events, cfg)
            assert fold.failed == []
            got.extend((user_events[at].event_id, context_of(c)) for at, c in fold.changed)
            if fold.profile is not None:
                batched[user_id] = fold.profile
    assert batched == one_by_one
    changed = [pair for pair in expected if pair[1]["changed"]]
    assert sorted(got, key=lambda pair: pair[0]) == sorted(changed, key=lambda pair: pair[0])
    assert len(changed) < len(expected)  # the re-delivered events were skipped
    assert any(context["basket_items"] for _, context in changed)


def context_of(fold: profile_module.EventFold) -> dict[str, Any]:
    """An event's fold context: a `FoldResult`'s fields but its profile."""
    return {f.name: getattr(fold, f.name) for f in dataclasses.fields(profile_module.EventFold)}


# -- conflicting duplicates (a known event id with other content) -----------------------------


def test_hostile_conflicting_duplicate_is_reported_and_the_exact_one_is_silent() -> None:
    cfg = config()
    first = ev("e1", "i1", at_s=0)
    profile = fold_event(None, first, cfg).profile
    again = fold_event(profile, first, cfg)
    assert not again.changed and again.conflict is None and again.profile is profile
    # The same instant written with another offset is the same event: a re-delivery.
    shifted = first.model_copy(update={"ts": first.ts.astimezone(timezone(timedelta(hours=2)))})
    assert fold_event(profile, shifted, cfg).conflict is None
    for other in (
        ev("e1", "i2", at_s=0),
        ev("e1", "i1", at_s=1),
        ev("e1", "i1", at_s=0, kind="view"),
        ev("e1", "i1", at_s=0, session="s9"),
        first.model_copy(update={"quantity": 3}),
    ):
        result = fold_event(profile, other, cfg)
        assert not result.changed and result.profile is profile
        assert result.conflict is not None and "e1" in result.conflict


def test_hostile_conflicts_in_one_batch_are_set_apart_from_duplicates() -> None:
    events = [ev("e1", "i1", at_s=0), ev("e1", "i1", at_s=0), ev("e1", "i2", at_s=5)]
    fold = fold_user_events(None, events, config())
    assert [at for at, _ in fold.changed] == [0]
    assert fold.duplicates == 1
    assert [at for at, _ in fold.conflicts] == [2]
    assert fold.profile is not None
    assert len(fold.profile.recent_event_digests) == len(fold.profile.recent_event_ids) == 1


def test_profiles_stored_before_digests_still_load_and_deduplicate() -> None:
    cfg = config(dedup_size=4)
    stored = {"user_id": "u1", "history": [], "recent_event_ids": ["old1", "old2"]}
    profile = UserProfile.model_validate_json(json.dumps(stored))
    assert profile.recent_event_digests == []
    # An old id has no digest: a repeat is taken for a re-delivery, whatever its content.
    assert fold_event(profile, ev("old2", "i9"), cfg).conflict is None
    folded = fold_user_events(profile, [ev("n1", "i1"), ev("n2", "i2"), ev("n3", "i3")], cfg)
    assert folded.profile is not None
    assert folded.profile.recent_event_ids == ["old2", "n1", "n2", "n3"]
    assert len(folded.profile.recent_event_digests) == 3  # aligned at the end
    assert fold_event(folded.profile, ev("n1", "i1"), cfg).conflict is None
    assert fold_event(folded.profile, ev("n1", "i2"), cfg).conflict is not None
    assert fold_event(folded.profile, ev("old2", "i2"), cfg).conflict is None
