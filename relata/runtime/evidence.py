"""The fit's evidence source: association statistics and popularity learned from user
histories with the stream processor's own fold, for `workers.fitting.fit` (which the
workers may not import `streams/` for: the composition roots hand this in).

A history (what `profile-updates` carries) is read back as events: one per entry, at its last
timestamp, of its last event type, oldest first. Repeats collapse into one event and there
are no session ids, so baskets are the fold's time-window sessions (an invoice's lines share
their timestamp). The same reading serves `relata evaluate` and the live fitter, so the
offline figure is the figure of what the workers fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from relata.lab.protocol import build_state
from schemas.messages import BehaviorEvent, HistoryEntry
from schemas.settings import StreamsSettings
from workers.fitting import Evidence
from workers.fitting.split import positive_type


def history_events(histories: Mapping[str, Sequence[HistoryEntry]]) -> list[BehaviorEvent]:
    """Each history's entries as events, oldest first, all users in time order (stable, so
    one user's entries of one timestamp keep their order)."""
    events: list[BehaviorEvent] = []
    for user_id, history in histories.items():
        for n, entry in enumerate(reversed(history)):
            events.append(
                BehaviorEvent.model_construct(
                    event_id=f"{user_id}#{n}",
                    user_id=user_id,
                    item_id=entry.item_id,
                    event_type=entry.last_event_type,
                    ts=entry.last_ts,
                    session_id=None,
                    quantity=None,
                )
            )
    events.sort(key=lambda e: e.ts)
    return events


def fold_evidence(
    histories: Mapping[str, Sequence[HistoryEntry]], settings: StreamsSettings | None = None
) -> Evidence:
    """The related lists and popularity the stream processor would publish after these
    histories' events (`relata.lab.protocol.build_state`: the live fold)."""
    positive = positive_type(histories) or "purchase"
    state = build_state(
        history_events(histories),
        settings or StreamsSettings(),
        positive=positive,
        progress=False,
    )
    return Evidence(related=state.related, popularity=state.popularity)
