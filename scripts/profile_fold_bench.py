"""Micro-benchmark of the profile agent's per-event work on real events, without Kafka.

Replays the first EVENTS events of a data set in batches of BATCH (the profile agent's batch
size) through the same steps as `StreamsApp.handle_events`: decode and validate each event,
group the batch by user, read each user's stored profile (JSON), fold the user's events in
order (`fold_user_events`, as the agent does), write the profile and one profile update
(JSON), and serialise the batch's association inputs. Prints microseconds per event in all and
the share of the fold itself. No Kafka, no model.

    .venv/bin/python scripts/profile_fold_bench.py [DATA_DIR] [EVENTS] [BATCH]
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from bench_util import data_and_counts, timed

from relata.runtime.replay import iter_jsonl
from schemas.decoding import decode
from schemas.messages import BehaviorEvent, UserProfile
from schemas.settings import StreamsSettings
from streams.association import AssociationInput
from streams.profile import FoldConfig, fold_user_events, profile_update


def main(data_dir: Path, events: int, batch: int) -> None:
    config = FoldConfig.from_settings(StreamsSettings())
    raws = [raw for _, raw in itertools.islice(iter_jsonl(data_dir / "events.jsonl.gz"), events)]
    timed_fold, folding = timed(fold_user_events)

    store: dict[str, bytes] = {}
    updates = 0
    started = time.perf_counter()
    for start in range(0, len(raws), batch):
        by_user: dict[str, list[tuple[int, BehaviorEvent]]] = {}
        for index, raw in enumerate(raws[start : start + batch]):
            event = decode(raw, BehaviorEvent)
            if isinstance(event, BehaviorEvent):
                by_user.setdefault(event.user_id, []).append((index, event))
        inputs: list[tuple[int, dict[str, Any]]] = []
        for user_id, user_events in by_user.items():
            stored = store.get(user_id)
            profile = None if stored is None else UserProfile.model_validate_json(stored)
            fold = timed_fold(profile, [event for _, event in user_events], config)
            for at, result in fold.changed:
                index, event = user_events[at]
                assoc = AssociationInput.from_fold(result, event)
                if assoc is not None:
                    inputs.append((index, assoc.to_dict()))
            folded = [user_events[at][1] for at, _ in fold.changed]
            profile = fold.profile
            if profile is None or not folded:
                continue
            store[user_id] = profile.model_dump_json().encode("utf-8")
            update = profile_update(
                profile,
                trigger_event_ids=[event.event_id for event in folded],
                source_ts_ms=0,
                now=datetime.now(UTC),
                event=folded[-1],
            )
            update.model_dump_json().encode("utf-8")
            updates += 1
        inputs.sort(key=lambda pair: pair[0])
        orjson.dumps([data for _, data in inputs])
    elapsed = time.perf_counter() - started
    print(
        f"{len(raws)} events of {data_dir.name} in batches of {batch}: "
        f"{elapsed / len(raws) * 1e6:.1f} us per event ({updates} profile updates), "
        f"fold_user_events {folding[0] / len(raws) * 1e6:.1f} us per event "
        f"({folding[0] / elapsed:.0%})"
    )


if __name__ == "__main__":
    data, (events, batch) = data_and_counts(60_000, 500)
    main(data, events, batch)
