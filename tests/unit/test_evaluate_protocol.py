"""relata.lab.protocol: targets, histories, and no leakage of targets into fitted state."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relata.lab.datasets import positive_type
from relata.lab.evaluate import rank_users
from relata.lab.protocol import prepare, split_users
from schemas.messages import BehaviorEvent
from workers.ranking import BlendWeights

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def ev(user: str, item: str, step: int, etype: str = "purchase") -> BehaviorEvent:
    return BehaviorEvent(
        event_id=f"{user}-{step}-{item}",
        user_id=user,
        item_id=item,
        event_type=etype,  # type: ignore[arg-type]
        ts=T0 + timedelta(days=step),
    )


def test_target_is_last_new_positive_item_and_later_events_are_dropped() -> None:
    events = [
        ev("u", "a", 0),
        ev("u", "b", 1),
        ev("u", "c", 2),
        ev("u", "a", 3),
        ev("u", "c", 4, "return"),
    ]
    split = split_users(events, positive="purchase")
    assert [(c.user_id, c.target) for c in split.cases] == [("u", "c")]
    assert [e.item_id for e in split.history_events] == ["a", "b"]


def test_user_without_target_is_skipped_but_still_teaches_statistics() -> None:
    events = [ev("solo", "a", 0), ev("rep", "a", 0), ev("rep", "a", 1)]
    split = split_users(events, positive="purchase")
    assert split.cases == []
    assert split.skipped["no new positive target"] == 2
    assert len(split.history_events) == 3


def test_validation_split_never_sees_the_evaluation_target() -> None:
    events = [ev("u", "a", 0), ev("u", "b", 1), ev("u", "c", 2), ev("u", "d", 3)]
    split = split_users(events, positive="purchase", holdout=2)
    assert [c.target for c in split.cases] == ["c"]
    assert {e.item_id for e in split.history_events} == {"a", "b"}


def test_positive_type_falls_back_to_carts_then_clicks() -> None:
    assert positive_type([ev("u", "a", 0, "view"), ev("u", "b", 1, "add_to_cart")]) == "add_to_cart"
    assert positive_type([ev("u", "a", 0, "click")]) == "click"


def _write(dir_: Path, events: list[BehaviorEvent], items: set[str]) -> None:
    dir_.mkdir()
    with gzip.open(dir_ / "items.jsonl.gz", "wt") as fh:
        for i in sorted(items):
            fh.write(json.dumps({"item_id": i, "title": f"item {i}", "categories": []}) + "\n")
    with gzip.open(dir_ / "events.jsonl.gz", "wt") as fh:
        for e in events:
            fh.write(e.model_dump_json() + "\n")


def test_targets_never_enter_association_state_or_scores(tmp_path: Path) -> None:
    # Many users buy x then y (history). Users u0..u4 then buy "t" as their target: if targets
    # leaked into the statistics, y -> t would become a strong transition.
    events: list[BehaviorEvent] = []
    for n in range(5):
        events += [ev(f"u{n}", "x", 0), ev(f"u{n}", "y", 1), ev(f"u{n}", "t", 2)]
    for n in range(5):
        events += [ev(f"v{n}", "x", 0), ev(f"v{n}", "y", 1), ev(f"v{n}", "z", 2)]
    items = {"x", "y", "z", "t"}
    _write(tmp_path / "with", events, items)
    prepared = prepare(tmp_path / "with", progress=False)
    assert {c.target for c in prepared.split.cases} == {"t", "z"}
    state = prepared.state
    for item_id in items:
        related = state.index.related(item_id)
        partners = {r.item_id for r in related.related} if related else set()
        assert "t" not in partners and "z" not in partners
    assert "t" not in state.item_counts and "z" not in state.item_counts

    # The histories themselves were learned (x -> y), so the state is not simply empty ...
    related_x = state.index.related("x")
    assert related_x is not None and "y" in {r.item_id for r in related_x.related}
    # ... and no target can get a score from its own (or any other) target event.
    result = rank_users(
        cases=prepared.split.cases,
        state=state,
        weights=BlendWeights(vector=0.0),
        k=4,
        hits=None,
        progress=False,
    )
    assert result.ranks == [None] * len(prepared.split.cases)


def test_plain_baselines_never_learn_from_targets(tmp_path: Path) -> None:
    from relata.lab import baselines
    from relata.lab.evaluate import plain_result

    events: list[BehaviorEvent] = []
    for n in range(5):
        events += [ev(f"u{n}", "x", 0), ev(f"u{n}", "y", 1), ev(f"u{n}", "t", 2)]
    _write(tmp_path / "d", events, {"x", "y", "t"})
    prepared = prepare(tmp_path / "d", progress=False)
    model = baselines.fit(baselines.sequences(prepared.split.history_events), prepared.item_ids)
    t = prepared.item_ids.index("t")
    # No pair with the targets, no transition into them, no popularity from them.
    assert not model.cosine[:, t].nnz and not model.transitions[:, t].nnz
    assert model.popularity[t] == 0
    for method in baselines.PLAIN_METHODS.values():
        scored = baselines.scores(model, method, [["y", "x"]])[0]
        assert scored[t] == 0.0
        # t is the only item left to rank: it is found, with nothing learned about it.
        assert plain_result(prepared, model, method, k=1).ranks == [1] * 5


def _rows_items(prepared_items: list[str], data: object) -> tuple[set[str], set[str]]:
    """The item ids a sequence training set learns from: its targets, its histories."""
    targets = {prepared_items[i] for i in data.targets.tolist()}  # type: ignore[attr-defined]
    seen = data.arrays.items  # type: ignore[attr-defined]
    return targets, {prepared_items[i] for i in seen[seen >= 0].tolist()}


def test_sequence_training_rows_never_hold_a_target_or_what_follows(tmp_path: Path) -> None:
    from relata.lab.sequences import training_set
    from workers.sequence_inputs import InputConfig

    # Each user: x, y (history), then a validation target v<n>, the evaluation target t<n>,
    # and a view of a<n> after it; w users walk x -> y -> z without targets of their own.
    events: list[BehaviorEvent] = []
    items = {"x", "y", "z"}
    for n in range(5):
        events += [ev(f"u{n}", "x", 0), ev(f"u{n}", "y", 1), ev(f"u{n}", f"v{n}", 2)]
        events += [ev(f"u{n}", f"t{n}", 3), ev(f"u{n}", f"a{n}", 4, "view")]
        items |= {f"v{n}", f"t{n}", f"a{n}"}
    _write(tmp_path / "d", events, items)
    config = InputConfig.default(max_len=5)
    secret = {f"t{n}" for n in range(5)} | {f"a{n}" for n in range(5)}

    evaluation = prepare(tmp_path / "d", progress=False)
    assert {c.target for c in evaluation.split.cases} == {f"t{n}" for n in range(5)}
    targets, history = _rows_items(evaluation.item_ids, training_set(evaluation, config))
    assert not (targets | history) & secret
    assert targets == {"y"} | {f"v{n}" for n in range(5)}  # what the histories hold, learned

    validation = prepare(tmp_path / "d", holdout=2, progress=False)
    assert {c.target for c in validation.split.cases} == {f"v{n}" for n in range(5)}
    targets, history = _rows_items(validation.item_ids, training_set(validation, config))
    assert not (targets | history) & (secret | {f"v{n}" for n in range(5)})
    assert targets == {"y"}
