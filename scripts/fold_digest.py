"""A digest of what the profile fold makes of real events, to compare two versions of it.

Folds the first EVENTS events of a data set (every 50th delivered twice, so the duplicate path
runs too) with `fold_event` one event at a time (as `relata evaluate` does) and with
`fold_user_events` over batches of 500 grouped by user (as the profile agent does), and prints
for each the number of profiles and association inputs and a SHA-256 prefix of every final
profile's JSON and every association input in event order. The two lines must agree, and must
agree with the same script run on the code before a change of the fold (e.g. in a
`git worktree` of the earlier commit). No Kafka, no model.

    .venv/bin/python scripts/fold_digest.py [DATA_DIR] [EVENTS]
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import orjson
from bench_util import data_and_counts

from relata.runtime.replay import iter_jsonl
from schemas.messages import BehaviorEvent, UserProfile
from schemas.settings import StreamsSettings
from streams.association import AssociationInput
from streams.profile import FoldConfig, fold_event, fold_user_events

BATCH = 500
REDELIVER_EVERY = 50


def per_event(
    events: list[BehaviorEvent], config: FoldConfig
) -> tuple[dict[str, UserProfile], list[dict[str, Any]]]:
    profiles: dict[str, UserProfile] = {}
    inputs: list[dict[str, Any]] = []
    for event in events:
        result = fold_event(profiles.get(event.user_id), event, config)
        profiles[event.user_id] = result.profile
        found = AssociationInput.from_fold(result, event)
        if found is not None:
            inputs.append(found.to_dict())
    return profiles, inputs


def per_batch(
    events: list[BehaviorEvent], config: FoldConfig
) -> tuple[dict[str, UserProfile], list[dict[str, Any]]]:
    profiles: dict[str, UserProfile] = {}
    inputs: list[dict[str, Any]] = []
    for start in range(0, len(events), BATCH):
        by_user: dict[str, list[tuple[int, BehaviorEvent]]] = {}
        for index, event in enumerate(events[start : start + BATCH]):
            by_user.setdefault(event.user_id, []).append((index, event))
        batch_inputs: list[tuple[int, dict[str, Any]]] = []
        for user_id, user_events in by_user.items():
            fold = fold_user_events(profiles.get(user_id), [e for _, e in user_events], config)
            if fold.failed:
                raise fold.failed[0][1]
            for at, result in fold.changed:
                index, event = user_events[at]
                found = AssociationInput.from_fold(result, event)
                if found is not None:
                    batch_inputs.append((index, found.to_dict()))
            if fold.profile is not None:
                profiles[user_id] = fold.profile
        batch_inputs.sort(key=lambda pair: pair[0])
        inputs.extend(data for _, data in batch_inputs)
    return profiles, inputs


def digest(profiles: dict[str, UserProfile], inputs: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for user_id in sorted(profiles):
        h.update(profiles[user_id].model_dump_json().encode("utf-8"))
    h.update(orjson.dumps(inputs))
    return h.hexdigest()[:16]


def main(data_dir: Path, count: int) -> None:
    config = FoldConfig.from_settings(StreamsSettings())
    raws = itertools.islice(iter_jsonl(data_dir / "events.jsonl.gz"), count)
    events: list[BehaviorEvent] = []
    for n, (_, raw) in enumerate(raws):
        event = BehaviorEvent.model_validate_json(raw)
        events.extend((event, event) if n % REDELIVER_EVERY == 0 else (event,))
    for name, fold in (("per event", per_event), ("per batch", per_batch)):
        profiles, inputs = fold(events, config)
        print(
            f"{data_dir.name} {len(events)} events {name}: {len(profiles)} profiles, "
            f"{len(inputs)} association inputs, digest {digest(profiles, inputs)}"
        )


if __name__ == "__main__":
    data, (events,) = data_and_counts(60_000)
    main(data, events)
