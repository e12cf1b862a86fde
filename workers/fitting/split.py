"""The fit's validation split of user histories: each user's latest new positive item is held
out as the validation target, and it and everything after it are never fitted on.

A history is what the recommender receives on `profile-updates` (and what the lab folds with
the same code): distinct items, most recent first, each with its folded weight, last event
type and count. A *new positive item* is an entry folded from exactly one event, of the
positive type (`positive_type`): the user's first contact with the item was that choice. The
entries more recent than the target were touched after it, so they leave with it; what stays
is the history as it was just before the target (up to the history bound)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas import vocabulary
from schemas.messages import HistoryEntry

History = Sequence[HistoryEntry]


@dataclass(frozen=True, slots=True)
class ValidationCase:
    """One held-out target and the history before it (most recent first)."""

    user_id: str
    target: str
    history: History


@dataclass
class ValidationSplit:
    """Validation targets and what may be fitted on: every user's history with its target and
    everything after it removed (users without a target keep theirs whole)."""

    cases: list[ValidationCase]
    training: dict[str, History]
    positive: str | None
    skipped: Counter[str] = field(default_factory=Counter)


def positive_type(histories: Mapping[str, History]) -> str | None:
    """The strongest target event type present in the histories (purchase, else
    add_to_cart, else click: the vocabulary's target preference), or None."""
    present = {e.last_event_type for history in histories.values() for e in history}
    return next((t for t in vocabulary.target_preference() if t in present), None)


def target_position(history: History, positive: str) -> int | None:
    """Position of the most recent new positive item of a history, or None."""
    for n, entry in enumerate(history):
        if entry.count == 1 and entry.last_event_type == positive:
            return n
    return None


def split_histories(histories: Mapping[str, History]) -> ValidationSplit:
    """Hold out each user's latest new positive item (and everything after it)."""
    positive = positive_type(histories)
    cases: list[ValidationCase] = []
    training: dict[str, History] = {}
    skipped: Counter[str] = Counter()
    for user_id, history in histories.items():
        at = None if positive is None else target_position(history, positive)
        if at is None:
            skipped["no new positive item"] += 1
            training[user_id] = history
            continue
        before = history[at + 1 :]
        training[user_id] = before
        if not any(e.weight > 0 for e in before):
            skipped["empty history"] += 1
            continue
        cases.append(ValidationCase(user_id, history[at].item_id, before))
    return ValidationSplit(cases=cases, training=training, positive=positive, skipped=skipped)
