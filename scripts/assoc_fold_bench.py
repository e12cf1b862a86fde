"""Micro-benchmark of the association fold (`streams.association.apply_inputs`) on real events.

Folds the first EVENTS events of a data set into profiles (as the profile agent does), keeps
their association inputs, then times `apply_inputs` over them in batches of 1,000 (the
association agent's batch size) and prints microseconds per input, the pair updates per input
and the share spent pruning full partner lists. No Kafka, no model.

    .venv/bin/python scripts/assoc_fold_bench.py [DATA_DIR] [EVENTS]
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from bench_util import data_and_counts, timed

import streams.association as association
from relata.runtime.replay import iter_jsonl
from schemas.messages import BehaviorEvent, UserProfile
from schemas.settings import StreamsSettings
from streams.profile import FoldConfig, fold_event

BATCH = 1000


def main(data_dir: Path, events: int) -> None:
    settings = StreamsSettings()
    fold_config = FoldConfig.from_settings(settings)
    config = association.AssociationConfig.from_settings(settings)
    profiles: dict[str, UserProfile] = {}
    inputs: list[association.AssociationInput] = []
    for _, raw in itertools.islice(iter_jsonl(data_dir / "events.jsonl.gz"), events):
        event = BehaviorEvent.model_validate_json(raw)
        result = fold_event(profiles.get(event.user_id), event, fold_config)
        profiles[event.user_id] = result.profile
        found = association.AssociationInput.from_fold(result, event)
        if found is not None:
            inputs.append(found)
    pairs = sum(
        len(delta.pairs) for inp in inputs for delta in association.plan_updates(inp).values()
    )

    timed_prune, pruning = timed(association._prune)
    association._prune = timed_prune  # type: ignore[assignment]  # measuring only
    table: dict[str, association.ItemRecord] = {}
    totals: association.TotalsRecord | None = None
    started = time.perf_counter()
    for start in range(0, len(inputs), BATCH):
        touched, totals = association.apply_inputs(
            inputs[start : start + BATCH], lookup=table.get, totals=totals, config=config
        )
        table.update(touched)
    elapsed = time.perf_counter() - started
    print(
        f"{len(inputs)} association inputs from {events} events of {data_dir.name}: "
        f"{elapsed / len(inputs) * 1e6:.0f} us per input, {pairs / len(inputs):.1f} pair updates "
        f"per input, {pruning[0] / elapsed:.0%} of it pruning partner lists"
    )


if __name__ == "__main__":
    data, (events,) = data_and_counts(60_000)
    main(data, events)
