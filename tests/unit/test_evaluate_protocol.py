"""relata.lab.protocol: targets, histories, and no leakage of targets into fitted state."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

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


def test_the_automatic_fit_never_learns_from_evaluation_or_validation_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`relata evaluate`'s default (`hybrid+fit`) fits on the training histories only: no
    evaluation target reaches the fit, and the fit's own validation targets (each user's
    latest new purchase of what remains) never reach the evidence it fits and validates
    with."""
    import relata.lab.autofit as autofit
    from relata.runtime.evidence import fold_evidence
    from workers.fitting import Evidence, split_histories

    # u0..u5 buy x, y, then their own item c<n> (the fit's validation target), then t (the
    # evaluation target); v0..v5 buy x, y, z.
    events: list[BehaviorEvent] = []
    for n in range(6):
        events += [ev(f"u{n}", "x", 0), ev(f"u{n}", "y", 1), ev(f"u{n}", f"c{n}", 2)]
        events += [ev(f"u{n}", "t", 3)]
        events += [ev(f"v{n}", "x", 0), ev(f"v{n}", "y", 1), ev(f"v{n}", "z", 2)]
    items = {"x", "y", "z", "t"} | {f"c{n}" for n in range(6)}
    _write(tmp_path / "d", events, items)
    fitted: list[dict[str, Any]] = []
    learned: list[Evidence] = []

    def spy_fit(histories: Any, *args: Any, **kwargs: Any) -> Any:
        fitted.append({u: [e.item_id for e in h] for u, h in histories.items()})
        return real_fit(histories, *args, **kwargs)

    def spy_evidence(histories: Any) -> Evidence:
        seen.append({u: [e.item_id for e in h] for u, h in histories.items()})
        found = fold_evidence(histories)
        learned.append(found)
        return found

    import workers.fitting.ranker_step as ranker_step

    labelled: list[str] = []
    real_rows = ranker_step._rows

    def spy_rows(recorder: Any, targets: Any, users: Any) -> Any:
        labelled.extend(targets[u] for u in users.tolist())
        return real_rows(recorder, targets, users)

    real_fit = autofit.fit
    seen: list[dict[str, list[str]]] = []
    monkeypatch.setattr(ranker_step, "_rows", spy_rows)
    monkeypatch.setattr(autofit, "fit", spy_fit)
    monkeypatch.setattr(autofit, "fold_evidence", spy_evidence)
    monkeypatch.setattr(
        "workers.encoder.TransformerEncoder.from_settings",
        classmethod(lambda cls, s: _HashEncoder()),
    )
    monkeypatch.setenv("RELATA_ENCODER_CACHE_DIR", str(tmp_path / "cache"))
    from relata.lab.evaluate import evaluate

    report = evaluate(
        tmp_path / "d", k=4, methods=["hybrid+fit"], progress=False, echo=lambda _: None
    )
    assert report["default"] == "hybrid+fit" and report["fit"]["validation_users"] >= 6
    # The fit is handed the training histories: no evaluation target (t, z) at all.
    (histories,) = fitted
    assert not {"t", "z"} & {i for h in histories.values() for i in h}
    # Its evidence is learned without its validation targets: no user's own target, and the
    # targets only their user bought (c<n>) are nowhere, nor is t.
    split = split_histories(_profiles(histories, tmp_path))
    own = {f"c{n}" for n in range(6)} | {"t"}
    assert own - {"t"} <= {c.target for c in split.cases}
    (handed,) = seen
    for case in split.cases:
        assert case.target not in handed[case.user_id]
    assert not own & {i for h in handed.values() for i in h}
    (evidence,) = learned
    named = {i for lst in evidence.related.lists() for i in (lst.item_id, *lst.ids)}
    assert named and not own & (named | {i for i, _ in evidence.popularity})
    # The learned ranker learns from the fit's validation targets only, never the evaluation's.
    assert labelled and set(labelled) <= {c.target for c in split.cases} and "t" not in labelled


def _profiles(histories: dict[str, list[str]], tmp_path: Path) -> dict[str, Any]:
    """The folded profiles of the data set's training events, as the fit saw them."""
    prepared = prepare(tmp_path / "d", progress=False)
    assert {u: [e.item_id for e in h] for u, h in prepared.state.profiles.items()} == histories
    return dict(prepared.state.profiles)


class _HashEncoder:
    """A unit vector per text from its hash: item vectors without the model."""

    name = "hash-encoder"
    version = "v1"
    dim = 8
    max_length = 128

    def encode(self, texts: Any) -> Any:
        import hashlib

        import numpy as np

        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32).reshape(-1, self.dim)
