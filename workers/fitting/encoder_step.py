"""The fit's user-encoder step: the sequence user encoder (`workers.user_encoder`) trained on
the fit's training histories, within a time budget.

What it learns from is only what `TrainingData` holds: the histories with the fit's
validation targets (and everything after them) already removed. Its own early stopping needs
targets too: the same split again (`split_histories`), so each user's next-latest new
positive item. The training rows are the prefixes of every training history: for each
positive entry with older entries, (the entries before it, that entry), the history as it was
when the user chose the item, up to the entries the profile kept.

The step is a picklable dataclass: the recommender's background fit runs it in a child
process (`workers.fitting.refit.ProcessRunner`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from schemas.messages import HistoryEntry
from workers.sequence_inputs import (
    HistoryArrays,
    InputConfig,
    empty_arrays,
    fill_row,
    history_arrays,
)
from workers.user_encoder import UserEncoder
from workers.user_encoder_fit import SequenceSet, fit_user_encoder

from .procedure import TrainingData
from .split import split_histories

logger = logging.getLogger(__name__)

History = Sequence[HistoryEntry]
# Training rows built per array block (bounds the transient memory of a large record).
CHUNK = 8192


def prefix_rows(
    histories: Mapping[str, History],
    rows: Mapping[str, int],
    config: InputConfig,
    positive: str | None,
) -> SequenceSet:
    """(entries older than a positive entry, that entry's item row) for every positive entry
    of every history (most recent first) that has an older entry and an item vector."""
    type_code = {name: n for n, name in enumerate(config.event_types)}
    parts: list[HistoryArrays] = []
    targets: list[int] = []
    pending: list[History] = []

    def flush() -> None:
        part = empty_arrays(len(pending), config.max_len)
        for r, before in enumerate(pending):
            fill_row(part, r, before, rows, config, type_code)
        parts.append(part)
        pending.clear()

    for history in histories.values():
        for n, entry in enumerate(history[:-1]):
            row = rows.get(entry.item_id)
            if row is None or entry.weight <= 0 or entry.last_event_type != positive:
                continue
            pending.append(history[n + 1 :])
            targets.append(row)
            if len(pending) >= CHUNK:
                flush()
    if pending:
        flush()
    arrays = HistoryArrays.concat(parts) if parts else empty_arrays(0, config.max_len)
    return SequenceSet(arrays, np.asarray(targets, dtype=np.int64))


@dataclass(frozen=True)
class SequenceEncoderStep:
    """Fit a sequence user encoder on `TrainingData` in at most `budget_s` seconds."""

    budget_s: float
    seed: int = 0
    max_len: int = InputConfig.max_len
    # torch's CPU threads during the fit (None: torch's default).
    threads: int | None = None

    def __call__(self, training: TrainingData) -> UserEncoder:
        config = InputConfig.default(max_len=self.max_len)
        rows = training.items.rows
        split = split_histories(training.histories)
        train = prefix_rows(split.training, rows, config, split.positive)
        cases = [c for c in split.cases if c.target in rows]
        valid = SequenceSet(
            history_arrays([c.history for c in cases], rows, config),
            np.asarray([rows[c.target] for c in cases], dtype=np.int64),
        )
        encoder, report = fit_user_encoder(
            train,
            valid,
            training.items.matrix,
            input_config=config,
            time_budget_s=self.budget_s,
            seed=self.seed,
            threads=self.threads,
        )
        encoder.meta.update(
            {
                "training": {"rows": len(train), "validation_rows": len(valid)},
                "fit": report.as_dict(),
                "seed": self.seed,
            }
        )
        logger.info(
            "user encoder fitted rows=%d validation=%d stopped=%s seconds=%.1f",
            len(train),
            len(valid),
            report.stopped,
            report.seconds,
        )
        return encoder
