"""Streaming association statistics: arithmetic, decay, bounded memory, serialisation."""

from __future__ import annotations

import copy
import gc
import json
import math
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.messages import BehaviorEvent, RelatedItems
from schemas.settings import StreamsSettings
from streams.association import (
    AssociationConfig,
    AssociationFold,
    AssociationInput,
    InputPosition,
    ItemDelta,
    apply_inputs,
    plan_updates,
    update_item,
    update_totals,
)
from streams.neighbours import (
    AssociationIndex,
    CountMemo,
    association_evidence,
    item_count,
    material_change,
    record_size,
    top_partners,
)
from streams.profile import FoldConfig, fold_event

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NO_DECAY = 1e15  # seconds: a half-life far beyond any test's time span


def fold_config() -> FoldConfig:
    return FoldConfig.from_settings(StreamsSettings())


def feed(
    index: AssociationIndex, baskets: list[list[str]], *, user_per_basket: bool = True
) -> None:
    """Each basket: purchases under one session id, baskets an hour apart."""
    cfg = fold_config()
    profiles: dict[str, object] = {}
    n = 0
    for b, items in enumerate(baskets):
        user = f"u{b}" if user_per_basket else "u"
        for item in items:
            event = BehaviorEvent(
                event_id=f"e{n}",
                user_id=user,
                item_id=item,
                event_type="purchase",
                ts=T0 + timedelta(hours=b, seconds=len(profiles)),
                session_id=f"b{b}",
            )
            n += 1
            result = fold_event(profiles.get(user), event, cfg)  # type: ignore[arg-type]
            profiles[user] = result.profile
            index.observe_event(result, event)


# Five baskets; counted by hand:
#   A in 4 (b0 b1 b2 b4), B in 4 (b0 b1 b3 b4), C in 2, D in 2; total 5.
#   AB together in 3 -> confidence P(B|A) = 3/4, lift = 3*5/(4*4) = 0.9375
#   AC together in 2 -> confidence 2/4, lift = 2*5/(4*2) = 1.25
#   AD together in 1 -> below min_support 2, never published
HAND_BASKETS = [["A", "B"], ["A", "B", "C"], ["A", "C"], ["B", "D"], ["A", "B", "D"]]


def test_counts_and_totals_match_hand_computed_baskets() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=2))
    feed(index, HAND_BASKETS)
    now = index.last_ts
    counts = {i: item_count(index.items[i], "bought_together", now, NO_DECAY) for i in "ABCD"}
    assert counts == pytest.approx({"A": 4, "B": 4, "C": 2, "D": 2})
    assert index.totals is not None
    assert index.totals["counts"]["bought_together"] == pytest.approx(5)
    partners = index.items["A"]["partners"]["bought_together"]
    assert partners == pytest.approx({"B": 3, "C": 2, "D": 1})
    # symmetric
    assert index.items["C"]["partners"]["bought_together"]["A"] == pytest.approx(2)


def test_related_items_evidence_matches_hand_computation() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=2))
    feed(index, HAND_BASKETS)
    related = index.related("A", kinds=["bought_together"])
    assert related is not None
    assert related.item_count == pytest.approx(4)
    by_id = {r.item_id: r for r in related.related}
    assert set(by_id) == {"B", "C"}  # D: support 1 < 2
    b, c = by_id["B"].evidence, by_id["C"].evidence
    assert b.support == 3
    assert b.confidence == pytest.approx(0.75)
    assert b.lift == pytest.approx(0.9375)
    assert b.pmi == pytest.approx(math.log2(0.9375))
    assert b.text == "bought together in 3 baskets, lift 0.9"
    assert c.support == 2 and c.confidence == pytest.approx(0.5)
    assert c.lift == pytest.approx(1.25) and c.pmi == pytest.approx(math.log2(1.25))
    # score = association cosine: 3/sqrt(4*4) = 0.75 for B, 2/sqrt(4*2) = 0.7071 for C
    assert by_id["B"].score == pytest.approx(0.75 * 1.0)
    assert by_id["C"].score == pytest.approx(2 / math.sqrt(8))
    assert [r.item_id for r in related.related] == ["B", "C"]


def test_association_evidence_arithmetic_and_text() -> None:
    e = association_evidence(37, 100, 50, 1000)
    assert e.support == 37
    assert e.confidence == pytest.approx(0.37)
    assert e.lift == pytest.approx(7.4)
    assert e.pmi == pytest.approx(math.log2(7.4))
    assert e.text == "bought together in 37 baskets, lift 7.4"
    empty = association_evidence(0, 0, 0, 0, kind="next_item")
    assert empty.lift is None and empty.pmi is None and empty.confidence is None
    assert empty.text == "chosen next after it 0 times"


def test_next_item_transitions_are_directed_and_weighted_by_distance() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=0.1))
    feed(index, [["A"], ["B"], ["C"]], user_per_basket=False)
    nxt = {i: index.items[i]["partners"].get("next_item", {}) for i in "ABC"}
    assert nxt["A"] == pytest.approx({"B": 1.0, "C": 0.5})  # C is two steps after A
    assert nxt["B"] == pytest.approx({"C": 1.0})
    assert nxt["C"] == {}
    assert "bought_together" not in index.items["A"]["partners"]  # separate baskets


def test_counts_decay_with_event_time_half_life() -> None:
    h = 100.0
    cfg = AssociationConfig(half_life_s=h)
    record = update_item(
        None,
        item_id="A",
        delta=ItemDelta(pairs=[("bought_together", "B", 1.0)]),
        ts=0.0,
        config=cfg,
    )
    record = update_item(
        record,
        item_id="A",
        delta=ItemDelta(pairs=[("bought_together", "B", 1.0)]),
        ts=h,
        config=cfg,
    )
    stored = record["partners"]["bought_together"]["B"]
    from streams.association import decayed

    assert decayed(record, stored, h, h) == pytest.approx(1.5)
    assert decayed(record, stored, 3 * h, h) == pytest.approx(1.5 / 4)
    # far in the future the record is rescaled (no overflow) and stays exact
    far = 1000 * h
    record = update_item(
        record, item_id="A", delta=ItemDelta(counts={"bought_together": 1.0}), ts=far, config=cfg
    )
    assert record["landmark"] == far
    assert item_count(record, "bought_together", far, h) == pytest.approx(1.0)
    assert decayed(record, record["partners"]["bought_together"]["B"], far, h) == pytest.approx(
        1.5 * 2.0**-999
    )


def test_hot_item_with_100k_distinct_partners_stays_bounded() -> None:
    cfg = AssociationConfig(half_life_s=NO_DECAY, top_n=50, capacity=200)
    record = None
    heavy = Counter[str]()
    for n in range(100_000):
        pairs = [("bought_together", f"x{n}", 1.0)]
        if n % 20 == 0:  # a few genuinely frequent partners among the long tail
            pairs.append(("bought_together", f"h{n % 3}", 1.0))
            heavy[f"h{n % 3}"] += 1
        record = update_item(
            record, item_id="HOT", delta=ItemDelta(pairs=pairs), ts=float(n), config=cfg
        )
    assert record is not None
    partners = record["partners"]["bought_together"]
    assert len(partners) <= cfg.capacity
    assert record_size(record) <= cfg.capacity
    assert len(json.dumps(record)) < 40_000  # a few hundred entries, not 100k
    errors = record["errors"]["bought_together"]
    for h, true in heavy.items():
        count, error = partners[h], errors.get(h, 0.0)
        assert count - error == pytest.approx(true)  # never evicted: exact
        assert count >= true - 1e-6
        assert true > record["floors"]["bought_together"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=400),
    st.integers(4, 12),
)
def test_space_saving_bounds_hold_for_any_stream(stream: list[int], capacity: int) -> None:
    cfg = AssociationConfig(half_life_s=NO_DECAY, top_n=1, capacity=capacity)
    record = None
    truth = Counter[str]()
    for t, p in enumerate(stream):
        # skew: small ids repeat more often
        partner = f"p{p % (1 + p // 4)}"
        truth[partner] += 1
        delta = ItemDelta(pairs=[("also_viewed", partner, 1.0)])
        record = update_item(record, item_id="X", delta=delta, ts=float(t), config=cfg)
    assert record is not None
    partners = record["partners"]["also_viewed"]
    floor = record["floors"].get("also_viewed", 0.0)
    assert len(partners) <= capacity
    errors = record["errors"].get("also_viewed", {})
    assert set(errors) <= set(partners)  # a dropped partner's error goes with it
    for partner, count in partners.items():
        error = errors.get(partner, 0.0)
        assert count - error <= truth[partner] + 1e-6
        assert truth[partner] <= count + 1e-6
    for partner, true in truth.items():
        if true > floor:
            assert partner in partners


def test_min_support_uses_the_lower_bound() -> None:
    cfg = AssociationConfig(half_life_s=NO_DECAY, top_n=1, capacity=1, min_support=2)
    index = AssociationIndex(cfg)
    record = update_item(
        None,
        item_id="A",
        delta=ItemDelta(pairs=[("bought_together", "B", 1.0)] * 5),
        ts=0.0,
        config=cfg,
    )
    record = update_item(
        record,
        item_id="A",
        delta=ItemDelta(pairs=[("bought_together", "C", 1.0)]),
        ts=1.0,
        config=cfg,
    )
    index.items["A"] = record
    # C replaced B and inherited B's 5 as error: its lower bound 1 is below min_support
    assert record["partners"]["bought_together"]["C"] == pytest.approx(6.0)
    assert record["errors"]["bought_together"]["C"] == pytest.approx(5.0)
    assert index.scores("A", kind="bought_together") == {}


def test_input_and_record_round_trip_through_json() -> None:
    inp = AssociationInput(
        item_id="A",
        ts=12.5,
        kind="bought_together",
        basket_items=("B", "C"),
        prior_items=("Z",),
        sequence_step=True,
        new_basket=False,
    )
    assert AssociationInput.from_dict(json.loads(json.dumps(inp.to_dict()))) == inp
    with pytest.raises(ValueError, match="bought_together"):
        AssociationInput.from_dict({**inp.to_dict(), "kind": "nonsense"})
    # a record restored from JSON keeps counting where it left off
    cfg = AssociationConfig(half_life_s=NO_DECAY)
    deltas = plan_updates(inp)
    assert set(deltas) == {"A", "B", "C", "Z"}
    record = update_item(None, item_id="A", delta=deltas["A"], ts=inp.ts, config=cfg)
    restored = json.loads(json.dumps(record))
    again = update_item(restored, item_id="A", delta=deltas["A"], ts=inp.ts, config=cfg)
    assert again["partners"]["bought_together"]["B"] == pytest.approx(2.0)
    assert again["counts"] == pytest.approx(
        {"bought_together": 2.0, "also_bought": 2.0, "next_item": 2.0}
    )


def test_records_leave_the_garbage_collector_alone() -> None:
    # The fold's cost was half collections walking partner entries ([count, error] lists);
    # every leaf is now a float in a str-keyed dict, which the collector never tracks. A record
    # written by an earlier relata is converted when it is next updated or scored.
    cfg = AssociationConfig(half_life_s=600.0, top_n=2, capacity=4)
    index = AssociationIndex(cfg)
    feed(index, [["A", "B", "C", "D", "E", "F"], ["A", "B"]] * 3)
    assert index.items["A"]["errors"]  # partners admitted over a floor carry their error
    before = copy.deepcopy(index.items)
    # The earlier format: entries [count, error], no errors map.
    for item_id in ("A", "C"):
        record = json.loads(json.dumps(index.items[item_id]))
        errors = record.pop("errors")
        record["partners"] = {
            kind: {p: [c, errors.get(kind, {}).get(p, 0.0)] for p, c in partners.items()}
            for kind, partners in record["partners"].items()
        }
        index.items[item_id] = record
    assert index.scores("C", kind="bought_together") == pytest.approx(
        _with(cfg, before, index).scores("C", kind="bought_together")
    )
    assert index.items["C"] == before["C"]  # converted by scoring
    feed(index, [["A", "B"]])
    gc.collect()
    for record in index.items.values():
        assert "errors" in record
        leaves = [record["counts"], *record["partners"].values(), *record["errors"].values()]
        for values in leaves:
            assert not gc.is_tracked(values)
            assert all(type(v) is float for v in values.values())


def _with(
    cfg: AssociationConfig, items: dict[str, Any], like: AssociationIndex
) -> AssociationIndex:
    other = AssociationIndex(cfg)
    other.items, other.totals, other.last_ts = items, like.totals, like.last_ts
    return other


def test_material_change_threshold() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=1))
    feed(index, HAND_BASKETS)
    full = index.related("A", kinds=["bought_together"])
    assert full is not None and len(full.related) == 3
    fewer = RelatedItems.model_validate(
        {**full.model_dump(), "related": full.model_dump()["related"][:2]}
    )
    assert material_change(None, full, 0.2)
    assert not material_change(full, full, 0.0)
    assert material_change(full, fewer, 0.2)  # one of three changed: 0.33 >= 0.2
    assert not material_change(full, fewer, 0.5)


def test_duplicates_and_returns_add_nothing() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY))
    cfg = fold_config()
    e = BehaviorEvent(
        event_id="1", user_id="u", item_id="A", event_type="purchase", ts=T0, session_id="s"
    )
    r = fold_event(None, e, cfg)
    assert index.observe_event(r, e) == {"A"}
    dup = fold_event(r.profile, e, cfg)
    assert index.observe_event(dup, e) == set()
    ret = e.model_copy(update={"event_id": "2", "event_type": "return"})
    assert index.observe_event(fold_event(r.profile, ret, cfg), ret) == set()
    assert index.items["A"]["counts"]["bought_together"] == pytest.approx(1.0)


def _inputs(baskets: list[list[str]], *, cfg: FoldConfig) -> list[AssociationInput]:
    """Association inputs of purchase baskets by three alternating users, baskets an hour
    apart (so histories, also_bought and next_item take part too)."""
    profiles: dict[str, object] = {}
    out = []
    n = 0
    for b, items in enumerate(baskets):
        user = f"u{b % 3}"
        for item in items:
            event = BehaviorEvent(
                event_id=f"e{n}",
                user_id=user,
                item_id=item,
                event_type="purchase",
                ts=T0 + timedelta(hours=b, seconds=n),
                session_id=f"b{b}",
            )
            n += 1
            result = fold_event(profiles.get(user), event, cfg)  # type: ignore[arg-type]
            profiles[user] = result.profile
            inp = AssociationInput.from_fold(result, event)
            if inp is not None:
                out.append(inp)
    return out


def baskets(items: int, *, max_basket: int, max_baskets: int) -> st.SearchStrategy[list[list[str]]]:
    """Purchase baskets over `items` item ids."""
    basket = st.lists(
        st.sampled_from([f"i{n}" for n in range(items)]), min_size=1, max_size=max_basket
    )
    return st.lists(basket, min_size=1, max_size=max_baskets)


@settings(max_examples=40, deadline=None)
@given(
    baskets(12, max_basket=8, max_baskets=25),
    st.integers(1, 30),
    st.sampled_from([600.0, 1e15]),
)
def test_batched_application_equals_one_by_one(
    stream: list[list[str]], batch: int, half_life_s: float
) -> None:
    # Small capacity and a short half-life: evictions and landmark rescaling happen too.
    cfg = AssociationConfig(half_life_s=half_life_s, top_n=1, capacity=4)
    fold_cfg = replace(fold_config(), basket_pairs=3)
    inputs = _inputs(stream, cfg=fold_cfg)
    # Reference: each input applied on its own, each touched record stored per input.
    items: dict[str, dict[str, object]] = {}
    totals = None
    for inp in inputs:
        for item_id, delta in plan_updates(inp).items():
            record = copy.deepcopy(items.get(item_id))
            items[item_id] = update_item(  # type: ignore[assignment]
                record,  # type: ignore[arg-type]
                item_id=item_id,
                delta=delta,
                ts=inp.ts,
                config=cfg,
            )
        totals = update_totals(totals, inp, cfg)
    batched = AssociationIndex(cfg)
    for start in range(0, len(inputs), batch):
        batched.observe_batch(inputs[start : start + batch])
    assert batched.items == items
    assert batched.totals == totals
    _, all_at_once = apply_inputs(inputs, lookup=lambda _: None, totals=None, config=cfg)
    assert all_at_once == totals


def test_published_lists_round_trip_through_the_topic_json() -> None:
    """related_items builds plain fields and validates the whole list once: what it builds,
    with decayed (fractional) counts, round-trips through the topic's JSON."""
    index = AssociationIndex(AssociationConfig(half_life_s=86_400.0, min_support=1))
    feed(index, HAND_BASKETS)
    built = [index.related(item) for item in ("A", "B")]
    assert all(b is not None and b.related for b in built)
    for b in built:
        assert b is not None
        again = RelatedItems.model_validate_json(b.model_dump_json())
        assert again.model_dump() == b.model_dump()
        assert all(r.evidence.text and (r.evidence.support or 0) >= 0 for r in again.related)


@settings(max_examples=30, deadline=None)
@given(baskets(10, max_basket=6, max_baskets=30))
def test_a_count_memo_shared_across_lists_changes_no_score(stream: list[list[str]]) -> None:
    """The flush scores every touched list with one memo of partner counts: each list's top
    partners equal those computed without it, in any order of the lists."""
    cfg = AssociationConfig(half_life_s=86_400.0, min_support=1, top_n=3, capacity=4)
    index = AssociationIndex(cfg)
    index.observe_batch(_inputs(stream, cfg=fold_config()))
    memo: CountMemo = {}
    scored = False
    for item_id in sorted(index.items, reverse=True):
        record = index.items[item_id]
        args = {"lookup": index.items.get, "now": index.last_ts, "config": cfg}
        top = top_partners(record, **args)  # type: ignore[arg-type]
        assert top_partners(record, memo=memo, **args) == top  # type: ignore[arg-type]
        scored = scored or bool(top)
    assert (
        any(memo.values()) == scored
    )  # filled by the lists that scored partners, used by later ones


# --- exact over re-delivery: kill -9 between a window's changelog writes and its offset commit


def _messages(inputs: list[AssociationInput], sizes: list[int]) -> list[list[AssociationInput]]:
    """The inputs cut into association-input messages of the given sizes (cycled)."""
    out: list[list[AssociationInput]] = []
    at = 0
    while at < len(inputs):
        size = sizes[len(out) % len(sizes)]
        out.append(inputs[at : at + size])
        at += size
    return out


class ChangelogStore:
    """The agent's tables as their changelog holds them: JSON per record, written per key."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.totals: str | None = None

    def lookup(self, item_id: str) -> Any:
        raw = self.records.get(item_id)
        return None if raw is None else json.loads(raw)

    def fold(
        self,
        messages: list[list[AssociationInput]],
        first_offset: int,
        cfg: AssociationConfig,
        *,
        slice_size: int = 7,
    ) -> AssociationFold:
        """One window: the messages (offsets from `first_offset`) folded in slices, as the
        agent does; nothing is written."""
        inputs = [inp for message in messages for inp in message]
        positions = [
            InputPosition.of(inp, partition=0, offset=first_offset + n)
            for n, message in enumerate(messages)
            for inp in message
        ]
        totals = None if self.totals is None else json.loads(self.totals)
        fold = AssociationFold(lookup=self.lookup, totals=totals, config=cfg)
        for start in range(0, len(inputs), slice_size):
            end = start + slice_size
            fold.apply(inputs[start:end], positions[start:end])
        return fold

    def write(self, fold: AssociationFold, keep: Any = lambda _: True, totals: bool = True) -> None:
        for item_id, record in fold.touched.items():
            if keep(item_id):
                self.records[item_id] = json.dumps(record)
        if totals and fold.totals is not None:
            self.totals = json.dumps(fold.totals)

    def run(
        self,
        messages: list[list[AssociationInput]],
        cfg: AssociationConfig,
        *,
        first_offset: int = 0,
        window: int = 3,
    ) -> None:
        for start in range(0, len(messages), window):
            self.write(self.fold(messages[start : start + window], first_offset + start, cfg))


@settings(max_examples=40, deadline=None)
@given(
    baskets(10, max_basket=6, max_baskets=25),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.integers(1, 4),
)
def test_kill_redelivered_inputs_are_folded_once(
    stream: list[list[str]], sizes: list[int], window: int
) -> None:
    cfg = AssociationConfig(half_life_s=600.0, top_n=1, capacity=4)
    messages = _messages(_inputs(stream, cfg=fold_config()), sizes)
    clean = ChangelogStore()
    clean.run(messages, cfg, window=window)
    again = ChangelogStore()
    again.records, again.totals = dict(clean.records), clean.totals
    fold = again.fold(messages, 0, cfg)
    assert fold.touched == {}
    assert fold.skipped == set(clean.records)
    again.write(fold)
    assert (again.records, again.totals) == (clean.records, clean.totals)


@settings(max_examples=80, deadline=None)
@given(
    baskets(10, max_basket=6, max_baskets=25),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.integers(1, 4),
    st.data(),
)
def test_kill_mid_changelog_flush_then_redelivery_equals_a_clean_fold(
    stream: list[list[str]], sizes: list[int], window: int, data: st.DataObject
) -> None:
    """The process dies after some of a window's records reached the changelog (any subset,
    the totals or not) and before the offsets of the window, and maybe of earlier ones, were
    committed; the restarted fold re-reads from the committed offset, in other windows."""
    cfg = AssociationConfig(half_life_s=600.0, top_n=1, capacity=4)
    messages = _messages(_inputs(stream, cfg=fold_config()), sizes)
    clean = ChangelogStore()
    clean.run(messages, cfg, window=window)

    crashed = ChangelogStore()
    killed_at = data.draw(st.integers(0, len(messages) - 1), label="first message of the window")
    killed_end = data.draw(st.integers(killed_at + 1, len(messages)), label="window end")
    committed = data.draw(st.integers(0, killed_at), label="committed offset")
    crashed.run(messages[:killed_at], cfg, window=window)
    fold = crashed.fold(messages[killed_at:killed_end], killed_at, cfg)
    written = data.draw(
        st.sets(st.sampled_from(sorted(fold.touched))) if fold.touched else st.just(set())
    )
    crashed.write(fold, keep=written.__contains__, totals=data.draw(st.booleans(), label="totals"))

    restart_window = data.draw(st.integers(1, 5), label="window after the restart")
    crashed.run(messages[committed:], cfg, first_offset=committed, window=restart_window)
    assert crashed.records == clean.records
    assert crashed.totals == clean.totals


def test_kill_recovery_reads_records_written_before_they_carried_offsets() -> None:
    cfg = AssociationConfig(half_life_s=NO_DECAY)
    messages = _messages(_inputs([["A", "B"], ["A", "B"]], cfg=fold_config()), [2])
    store = ChangelogStore()
    store.run(messages[:1], cfg)
    # As an earlier relata wrote them: no offsets.
    for item_id, raw in store.records.items():
        record = json.loads(raw)
        del record["applied"]
        store.records[item_id] = json.dumps(record)
    store.run(messages[1:], cfg, first_offset=1)
    a = json.loads(store.records["A"])
    assert a["applied"] == {"0": 1}
    assert a["partners"]["bought_together"] == pytest.approx({"B": 2.0})
    # Offline folds (no positions) carry no offsets at all.
    index = AssociationIndex(cfg)
    index.observe_batch(inp for message in messages for inp in message)
    assert all("applied" not in record for record in index.items.values())


@settings(max_examples=60, deadline=None)
@given(
    baskets(10, max_basket=6, max_baskets=25),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.data(),
)
def test_kill_of_the_profiles_role_resends_inputs_that_are_folded_once(
    stream: list[list[str]], sizes: list[int], data: st.DataObject
) -> None:
    """The profiles role acknowledged a batch's association inputs, then died before its
    changelog (or its offsets) were: it folds the events again and sends the same inputs
    again, in new association-input messages at new offsets. Inputs name their source event,
    so the re-sent ones are recognised and the statistics equal a clean run's."""
    cfg = AssociationConfig(half_life_s=600.0, top_n=1, capacity=4)
    plain = _inputs(stream, cfg=fold_config())
    # Two behavior-events partitions, each read in offset order.
    next_offset = [0, 0]
    sourced = []
    for n, inp in enumerate(plain):
        partition = n % 3 % 2
        sourced.append(replace(inp, source=(partition, next_offset[partition])))
        next_offset[partition] += 1
    messages = _messages(sourced, sizes)
    clean = ChangelogStore()
    clean.run(messages, cfg)

    crashed = ChangelogStore()
    resend_from = data.draw(st.integers(0, len(messages) - 1), label="first re-sent message")
    resend_to = data.draw(st.integers(resend_from + 1, len(messages)), label="re-sent up to")
    # Sent, acknowledged and folded; then the same inputs again, cut into other messages.
    again = _messages(
        [inp for message in messages[resend_from:resend_to] for inp in message],
        data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), label="resent sizes"),
    )
    sent = messages[:resend_to] + again + messages[resend_to:]
    crashed.run(sent, cfg, window=data.draw(st.integers(1, 4), label="window"))
    assert crashed.records == clean.records
    assert crashed.totals == clean.totals


def test_association_inputs_carry_their_source_through_json() -> None:
    (inp, *_) = _inputs([["A", "B"]], cfg=fold_config())
    sourced = replace(inp, source=(3, 41))
    assert AssociationInput.from_dict(json.loads(json.dumps(sourced.to_dict()))) == sourced
    assert "source" not in inp.to_dict()
    for bad in ([1], [1, -2], ["1", 2], [True, 2], 7):
        with pytest.raises(ValueError, match="source"):
            AssociationInput.from_dict(sourced.to_dict() | {"source": bad})


def test_a_basket_filled_in_order_teaches_transitions_between_its_items() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=0.1))
    feed(index, [["A", "B", "C"]])
    nxt = {i: index.items[i]["partners"].get("next_item", {}) for i in "ABC"}
    assert nxt["A"] == pytest.approx({"B": 1.0, "C": 0.5})
    assert nxt["B"] == pytest.approx({"C": 1.0})
    assert nxt["C"] == {}


def test_a_kind_with_many_strong_pairs_does_not_crowd_the_others_out() -> None:
    # A is bought together with 9 items in 3 baskets each (cosine ~0.58); one customer then
    # buys A, X, A, Y, A, X one a day: transitions A -> X twice, A -> Y once, weaker pairs.
    # By score alone a list of 6 would be all baskets; each kind present gets its share.
    config = AssociationConfig(half_life_s=NO_DECAY, min_support=1, top_n=6, capacity=40)
    index = AssociationIndex(config)
    baskets = [["A", *(f"b{n}" for n in range(9))] for _ in range(3)]
    feed(index, [*baskets, ["X"], ["Y"]], user_per_basket=True)
    feed(index, [["A"], ["X"], ["A"], ["Y"], ["A"], ["X"]], user_per_basket=False)
    top = top_partners(index.items["A"], lookup=index.items.get, now=index.last_ts, config=config)
    assert len(top) == 6
    kinds = Counter(kind for _, _, kind, _, _ in top)
    assert set(kinds) == {"bought_together", "next_item", "also_bought"}
    assert all(n >= 6 // len(kinds) for n in kinds.values())
    # A sequence kind keeps the item's most frequent successor first: X (twice), not Y.
    successors = [p for _, p, kind, _, _ in top if kind == "next_item"]
    assert "X" in successors
    assert [s for _, s, _, _, _ in top] == [s for _, s, _, _, _ in sorted(top, key=lambda t: -t[0])]


def test_published_lists_are_read_at_their_items_last_touch() -> None:
    # A and B were bought together once, a year before the data ends: decayed to the end, the
    # pair falls below min_support 1, but the association agent published A's list when A was
    # last touched, and the compacted topic still holds it.
    half_life = 90 * 86400.0
    index = AssociationIndex(AssociationConfig(half_life_s=half_life, min_support=1))
    feed(index, [["A", "B"]])
    late = BehaviorEvent(
        event_id="late",
        user_id="other",
        item_id="Z",
        event_type="purchase",
        ts=T0 + timedelta(days=365),
    )
    index.observe_event(fold_event(None, late, fold_config()), late)
    assert index.touched_at["A"] < index.last_ts
    ended = index.related("A")
    assert ended is None or not ended.related
    published = index.published("A")
    assert published is not None
    assert {r.item_id for r in published.related} == {"B"}
