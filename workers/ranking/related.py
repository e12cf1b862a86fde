"""The related-items lists and item vectors that ranking reads, in columns."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from schemas import vocabulary
from schemas.messages import RelatedItems


def kind_codes() -> dict[str, int]:
    """Relation kinds as small integer codes: their position in the vocabulary."""
    return {kind: code for code, kind in enumerate(vocabulary.relation_kinds())}


class RelatedList(NamedTuple):
    """One item's related-items list in columns: what `rank` reads of it.

    One object for the garbage collector per list (numpy arrays and tuples of strings are not
    scanned), where pydantic objects were ~6 per neighbour: with thousands of lists of 50, full
    collections paused the recommender 50-180 ms (gc.callbacks at 250 events/s)."""

    item_id: str
    item_count: float
    ids: tuple[str, ...]  # neighbour item ids, best first
    idx: npt.NDArray[np.int64]  # the same, interned by the table (RelatedTable.index)
    kinds: npt.NDArray[np.int8]  # relation kind codes (`kind_codes`)
    scores: npt.NDArray[np.float64]
    # P(neighbour | item) where the evidence has it (its confidence), else the score: what a
    # sequence kind contributes (a transition probability ranks likely next items, where the
    # cosine favours rare pairs).
    confidences: npt.NDArray[np.float64]
    texts: tuple[str, ...]  # evidence texts
    # Evidence numbers, one row per neighbour, columns `EVIDENCE_COLUMNS`, NaN where the
    # evidence has none: numbers in one array, not an object per neighbour (see above).
    stats: npt.NDArray[np.float64]


# The columns of `RelatedList.stats`: the numeric evidence fields a reason carries.
EVIDENCE_COLUMNS: tuple[str, ...] = ("support", "confidence", "lift", "pmi", "cosine")


def evidence_row(lst: RelatedList, at: int) -> dict[str, float | int]:
    """The evidence numbers of one neighbour that it has (support as an integer)."""
    row = lst.stats[at]
    out: dict[str, float | int] = {}
    for name, value in zip(EVIDENCE_COLUMNS, row.tolist(), strict=True):
        if value == value:  # not NaN
            out[name] = int(value) if name == "support" else value
    return out


class RelatedTable:
    """Related-items lists by item id, in columns, with every item id interned as an integer
    (scoring a user's candidates is then array arithmetic, not a Python loop per neighbour).
    Interned ids are kept for the table's life: bounded by the catalog, not by traffic."""

    __slots__ = ("_index", "_lists", "_names")

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._lists: dict[str, RelatedList] = {}

    @classmethod
    def of(cls, related: Mapping[str, RelatedItems]) -> RelatedTable:
        table = cls()
        for value in related.values():
            table.put(value)
        return table

    def index(self, item_id: str) -> int:
        """The integer of an item id (assigned on first sight)."""
        n = self._index.get(item_id)
        if n is None:
            n = self._index[item_id] = len(self._names)
            self._names.append(item_id)
        return n

    def known(self, item_ids: Iterable[str]) -> npt.NDArray[np.int64]:
        """The integers of those of `item_ids` the table has seen (none are assigned)."""
        index = self._index
        return np.array([n for n in map(index.get, item_ids) if n is not None], dtype=np.int64)

    def flags(self, item_ids: Iterable[str]) -> npt.NDArray[np.bool_]:
        """A flag per interned integer: True for those of `item_ids` (index it with `idx`)."""
        flags = np.zeros(len(self._names), dtype=np.bool_)
        flags[self.known(item_ids)] = True
        return flags

    def unique(
        self, idx: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
        """`np.unique(idx, return_inverse=True)` for interned integers, by one pass over a
        flag per integer instead of a sort (the same arrays)."""
        present = np.zeros(len(self._names), dtype=np.bool_)
        present[idx] = True
        uniq = np.flatnonzero(present)
        position = np.cumsum(present, dtype=np.intp) - 1
        return uniq.astype(np.int64, copy=False), position[idx]

    def names(self, idx: Sequence[int] | npt.NDArray[np.int64]) -> list[str]:
        return list(map(self._names.__getitem__, idx))

    def put(self, value: RelatedItems) -> None:
        related = value.related
        codes = kind_codes()
        ids = tuple(r.item_id for r in related)
        self._lists[value.item_id] = RelatedList(
            value.item_id,
            value.item_count,
            ids,
            np.fromiter((self.index(i) for i in ids), dtype=np.int64, count=len(ids)),
            np.fromiter((codes[r.kind] for r in related), dtype=np.int8, count=len(ids)),
            np.fromiter((r.score for r in related), dtype=np.float64, count=len(ids)),
            np.fromiter(
                (
                    r.score if r.evidence.confidence is None else r.evidence.confidence
                    for r in related
                ),
                dtype=np.float64,
                count=len(ids),
            ),
            tuple(r.evidence.text for r in related),
            np.array(
                [
                    [_number(getattr(r.evidence, name)) for name in EVIDENCE_COLUMNS]
                    for r in related
                ],
                dtype=np.float64,
            ).reshape(len(ids), len(EVIDENCE_COLUMNS)),
        )

    def remove(self, item_id: str) -> None:
        self._lists.pop(item_id, None)

    def get(self, item_id: str) -> RelatedList | None:
        return self._lists.get(item_id)

    def lists(self) -> Iterable[RelatedList]:
        return self._lists.values()

    def __len__(self) -> int:
        return len(self._lists)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._lists


class VectorRows(Mapping[str, np.ndarray]):
    """Item id -> row of an item matrix, without copying; `gather` takes many rows in one
    numpy call (rank's candidate cosines), where stacking one array per item cost more than
    the product itself at ~1,000 behaviour candidates a user."""

    def __init__(self, matrix: np.ndarray, rows: Mapping[str, int]) -> None:
        self.matrix = matrix
        self.rows = rows

    def __getitem__(self, item_id: str) -> np.ndarray:
        row: np.ndarray = self.matrix[self.rows[item_id]]
        return row

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, item_ids: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """The ids of `item_ids` that have a row, and their rows as one matrix."""
        ids = list(item_ids)
        rows = np.fromiter(map(self.rows.get, ids, itertools.repeat(-1)), dtype=np.intp)
        found = np.flatnonzero(rows >= 0)
        if len(found) < len(ids):
            return [ids[n] for n in found.tolist()], self.matrix[rows[found]]
        return ids, self.matrix[rows]


def gather(
    vectors: Mapping[str, np.ndarray], item_ids: Iterable[str]
) -> tuple[list[str], np.ndarray | None]:
    """The ids of `item_ids` that `vectors` holds, and their vectors stacked (None if none)."""
    if isinstance(vectors, VectorRows):
        ids, matrix = vectors.gather(item_ids)
        return ids, matrix if ids else None
    found = [(i, v) for i in item_ids if (v := _vector_of(vectors, i)) is not None]
    if not found:
        return [], None
    return [i for i, _ in found], np.stack([np.asarray(v, dtype=np.float32) for _, v in found])


def _number(value: float | None) -> float:
    return np.nan if value is None else float(value)


def table_of(related: RelatedTable | Mapping[str, RelatedItems]) -> RelatedTable:
    return related if isinstance(related, RelatedTable) else RelatedTable.of(related)


def _vector_of(vectors: Mapping[str, np.ndarray] | None, item_id: str) -> np.ndarray | None:
    if vectors is None:
        return None
    try:
        return vectors[item_id]
    except KeyError:
        return None


def popularity_of(lists: Iterable[RelatedList], limit: int = 1000) -> list[tuple[str, float]]:
    """The popularity ranking: items by their decayed basket/history count (`item_count` of
    their related-items list), most popular first, ties by item id."""
    ranked = sorted(lists, key=lambda r: (-r.item_count, r.item_id))
    return [(r.item_id, r.item_count) for r in ranked[:limit]]
