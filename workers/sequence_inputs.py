"""What the sequence user encoder reads of a history: numpy arrays, no torch.

A user's recent history (the profile's entries, most recent first) becomes fixed-width rows:
the item's row in an item matrix (-1: padding, or an item without a vector), its last event
type, the age of the entry relative to the newest one (bucketed), how many events were folded
into it (bucketed), and its share of the pooled user vector (`source_weights`, the weights of
the `pooled` user vector), which the encoder adds its learned correction to. The live
recommender and the lab build their inputs with this one function, so training and serving
read the same features.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas import vocabulary
from schemas.messages import HistoryEntry
from workers.ranking.user_vector import source_weights

I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]
F32 = npt.NDArray[np.float32]

# Age of an entry behind the user's newest one, in seconds: same minute, hour, day, week,
# month, year, older. Relative to the newest entry, so a profile reads the same whenever it
# is encoded (live) and at whatever point of a replayed history (training).
AGE_EDGES_S = (60.0, 3600.0, 86_400.0, 7 * 86_400.0, 30 * 86_400.0, 365 * 86_400.0)
# Events folded into one entry: 1, 2, 3-4, 5-9, 10+.
COUNT_EDGES = (2, 3, 5, 10)


@dataclass(frozen=True)
class InputConfig:
    """How histories become rows; stored in the encoder artifact so serving matches fitting."""

    # The most recent entries read (of the profile's `history_size`, 50 by default): the
    # fit's cost grows with it, and online-retail's histories mostly fill all 50.
    max_len: int = 30
    event_types: tuple[str, ...] = ()
    # The pooled base: the `pooled` user vector's decay and weight exponent (BlendWeights'
    # defaults), over at most `pool_items` recent entries.
    pool_recency: float = 0.5
    weight_exponent: float = 0.5
    pool_items: int = 20

    @classmethod
    def default(cls, *, max_len: int = 30) -> InputConfig:
        return cls(max_len=max_len, event_types=vocabulary.event_types())

    @property
    def age_buckets(self) -> int:
        return len(AGE_EDGES_S) + 1

    @property
    def count_buckets(self) -> int:
        return len(COUNT_EDGES) + 1


@dataclass
class HistoryArrays:
    """Rows of histories; `items` -1 marks an empty slot (padding or no vector)."""

    items: I32  # [n, max_len] row in the item matrix
    types: I8  # [n, max_len] index into InputConfig.event_types (0 in empty slots)
    ages: I8  # [n, max_len] AGE_EDGES_S bucket
    counts: I8  # [n, max_len] COUNT_EDGES bucket
    pool: F32  # [n, max_len] weight of the entry in the pooled base vector

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def take(self, rows: npt.NDArray[np.intp] | slice) -> HistoryArrays:
        return HistoryArrays(
            items=self.items[rows],
            types=self.types[rows],
            ages=self.ages[rows],
            counts=self.counts[rows],
            pool=self.pool[rows],
        )

    def usable(self) -> npt.NDArray[np.bool_]:
        """Rows the encoder answers: some entry with a vector counts in the pooled base (the
        others get what pooling gets: no user vector)."""
        return np.asarray(((self.items >= 0) & (self.pool > 0)).any(axis=1))

    @staticmethod
    def concat(parts: Sequence[HistoryArrays]) -> HistoryArrays:
        return HistoryArrays(
            items=np.concatenate([p.items for p in parts]),
            types=np.concatenate([p.types for p in parts]),
            ages=np.concatenate([p.ages for p in parts]),
            counts=np.concatenate([p.counts for p in parts]),
            pool=np.concatenate([p.pool for p in parts]),
        )


def empty_arrays(n: int, max_len: int) -> HistoryArrays:
    return HistoryArrays(
        items=np.full((n, max_len), -1, dtype=np.int32),
        types=np.zeros((n, max_len), dtype=np.int8),
        ages=np.zeros((n, max_len), dtype=np.int8),
        counts=np.zeros((n, max_len), dtype=np.int8),
        pool=np.zeros((n, max_len), dtype=np.float32),
    )


def history_arrays(
    histories: Sequence[Sequence[HistoryEntry]],
    rows: Mapping[str, int],
    config: InputConfig,
) -> HistoryArrays:
    """The encoder's input rows of `histories` (each most recent first); `rows` maps item ids
    to rows of the item matrix the encoder will read (an id it lacks: no vector)."""
    out = empty_arrays(len(histories), config.max_len)
    type_code = {name: n for n, name in enumerate(config.event_types)}
    for r, history in enumerate(histories):
        fill_row(out, r, history, rows, config, type_code)
    return out


def fill_row(
    out: HistoryArrays,
    r: int,
    history: Sequence[HistoryEntry],
    rows: Mapping[str, int],
    config: InputConfig,
    type_code: Mapping[str, int],
) -> None:
    """Write one history into row `r` of `out` (the loop body of `history_arrays`, for
    callers that build many rows from snapshots)."""
    recent = history[: config.max_len]
    if not recent:
        return
    newest = recent[0].last_ts.timestamp()
    weights = {
        id(entry): w
        for entry, w in source_weights(
            recent,
            recency=config.pool_recency,
            weight_exponent=config.weight_exponent,
            max_sources=config.pool_items,
        )
    }
    items, types, ages, counts, pool = out.items, out.types, out.ages, out.counts, out.pool
    for c, entry in enumerate(recent):
        row = rows.get(entry.item_id)
        if row is None:
            continue  # no vector: an empty slot, as in pooling
        items[r, c] = row
        types[r, c] = type_code.get(entry.last_event_type, 0)
        ages[r, c] = bisect.bisect_right(AGE_EDGES_S, newest - entry.last_ts.timestamp())
        counts[r, c] = bisect.bisect_right(COUNT_EDGES, entry.count)
        pool[r, c] = weights.get(id(entry), 0.0)
