"""The sequence user encoder's data: training rows from the histories, and the evaluated
users' rows, both as the live recommender would see them.

A training row is a user's profile (folded with the live fold, `streams.profile.fold_event`)
just before an event on an item the user had not touched before, of the data set's positive
type (the evaluation's definition of a target), and that item. Only `split.history_events`
are replayed, so no evaluation target (nor, in `relata train`'s split, any validation target)
or anything after it is ever a row or part of one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from relata.lab.datasets import positive_type
from relata.lab.protocol import Prepared
from relata.lab.vectors import VectorInputs, pooled_users, vector_hits
from schemas.messages import HistoryEntry, UserProfile
from schemas.settings import StreamsSettings
from streams.profile import FoldConfig, fold_event
from workers.ranking import BlendWeights, VectorRows
from workers.sequence_inputs import (
    HistoryArrays,
    InputConfig,
    empty_arrays,
    fill_row,
    history_arrays,
)
from workers.user_encoder import UserEncoder
from workers.user_encoder_fit import FitReport, SequenceSet, fit_user_encoder

# Snapshots featurised at once (bounds the histories held in memory).
CHUNK = 8192


def training_set(
    prepared: Prepared,
    config: InputConfig,
    *,
    settings: StreamsSettings | None = None,
) -> SequenceSet:
    """(profile before the event, next new positive item) for every such event of the fitted
    histories, in time order."""
    events = prepared.split.history_events
    if not events:
        return SequenceSet(empty_arrays(0, config.max_len), np.zeros(0, dtype=np.int64))
    positive = positive_type(events)
    fold_config = FoldConfig.from_settings(settings or StreamsSettings())
    rows = {item_id: n for n, item_id in enumerate(prepared.item_ids)}
    type_code = {name: n for n, name in enumerate(config.event_types)}
    profiles: dict[str, UserProfile] = {}
    touched: dict[str, set[str]] = {}
    parts: list[HistoryArrays] = []
    targets: list[int] = []
    pending: list[Sequence[HistoryEntry]] = []

    def flush() -> None:
        part = empty_arrays(len(pending), config.max_len)
        for r, history in enumerate(pending):
            fill_row(part, r, history, rows, config, type_code)
        parts.append(part)
        pending.clear()

    for event in events:
        profile = profiles.get(event.user_id)
        seen = touched.setdefault(event.user_id, set())
        if (
            event.event_type == positive
            and event.item_id not in seen
            and profile is not None
            and profile.history
            and event.item_id in rows
        ):
            pending.append(profile.history)
            targets.append(rows[event.item_id])
            if len(pending) >= CHUNK:
                flush()
        seen.add(event.item_id)
        profiles[event.user_id] = fold_event(profile, event, fold_config).profile
    if pending:
        flush()
    arrays = HistoryArrays.concat(parts) if parts else empty_arrays(0, config.max_len)
    return SequenceSet(arrays, np.asarray(targets, dtype=np.int64))


def case_set(prepared: Prepared, config: InputConfig) -> SequenceSet:
    """The evaluated (or validation) users: their folded profiles, their targets, and every
    history item as seen (the ranking leaves them all out)."""
    rows = {item_id: n for n, item_id in enumerate(prepared.item_ids)}
    cases = prepared.split.cases
    histories = [prepared.state.profiles[c.user_id] for c in cases]
    arrays = history_arrays(histories, rows, config)
    targets = np.asarray([rows[c.target] for c in cases], dtype=np.int64)
    return SequenceSet(arrays, targets, seen=prepared.history_idx)


def describe(data: SequenceSet) -> dict[str, Any]:
    """Row count and history length percentiles, for logs and provenance."""
    lengths = (data.arrays.items >= 0).sum(axis=1)
    if not len(lengths):
        return {"rows": 0}
    p50, p90 = np.percentile(lengths, [50, 90]).tolist()
    return {"rows": len(data), "length_p50": p50, "length_p90": p90}


def item_rows(prepared: Prepared) -> Mapping[str, int]:
    return {item_id: n for n, item_id in enumerate(prepared.item_ids)}


def sequence_inputs(
    prepared: Prepared,
    encoder: UserEncoder,
    matrix: np.ndarray,
    weights: BlendWeights,
    *,
    top: int,
) -> VectorInputs:
    """The encoder's user vector per case, pooling where it gives none (as the live
    recommender falls back), and their exact top hits."""
    data = case_set(prepared, encoder.input_config)
    users = encoder.encode_arrays(data.arrays, matrix)
    fallback = ~data.arrays.usable()
    if fallback.any():
        users[fallback] = pooled_users(prepared, matrix, weights)[fallback]
    hits = vector_hits(users, matrix, prepared.item_ids, prepared.history_idx, top=top)
    return VectorInputs(users=users, hits=hits, items=VectorRows(matrix, dict(item_rows(prepared))))


def fit_encoder(
    prepared: Prepared,
    matrix: np.ndarray,
    *,
    time_budget_s: float,
    seed: int,
    item_vectors: Mapping[str, Any],
    max_len: int = InputConfig.max_len,
    echo: Callable[[str], None] | None = None,
) -> tuple[UserEncoder, FitReport]:
    """Fit the sequence user encoder on `prepared`'s histories (validation: its cases), over
    `matrix` (the item vectors as indexed, described by `item_vectors` in the artifact)."""
    config = InputConfig.default(max_len=max_len)
    train = training_set(prepared, config)
    valid = case_set(prepared, config)
    encoder, report = fit_user_encoder(
        train,
        valid,
        matrix,
        input_config=config,
        time_budget_s=time_budget_s,
        seed=seed,
        progress=echo,
    )
    encoder.meta.update(
        {"item_vectors": dict(item_vectors), "training": describe(train), "seed": seed}
    )
    return encoder, report
