"""What the recommender reads besides the profile update: item vectors and titles from the
store (`ItemCache`, an LRU of matrix rows), the compacted `related-items` topic in memory
(`RelatedIndex`) and the business rules file (`RulesFile`, hot-reloaded)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from schemas.messages import RelatedItems
from schemas.rules import BusinessRules
from workers.ranking import BlendWeights, RelatedTable, VectorRows, popularity_of, popularity_prior
from workers.vector_store import VectorStore

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


class ItemCache:
    """Bounded LRU of item vectors and titles read from the store (items rarely change). The
    vectors are rows of one matrix (`vectors()`), so ranking gathers a user's candidates in
    one numpy call."""

    # Items the store lacks (not indexed yet) are not asked for again for this long.
    ABSENT_TTL_S = 10.0

    def __init__(self, store: VectorStore, *, capacity: int = 200_000) -> None:
        self.store = store
        self.capacity = capacity
        self._titles: OrderedDict[str, str] = OrderedDict()  # the LRU order
        self._rows: dict[str, int] = {}
        self._matrix: FloatArray = np.zeros((0, 0), dtype=np.float32)
        self._free: list[int] = []
        self._absent: dict[str, float] = {}

    def fetch(self, ids: Iterable[str]) -> None:
        """Load the missing ones of `ids` with one store round trip."""
        now = time.monotonic()
        missing = [
            i for i in dict.fromkeys(ids) if i not in self._rows and self._absent.get(i, 0.0) <= now
        ]
        if not missing:
            return
        vectors = self.store.get_vectors(missing)
        payloads = self.store.get_payloads(list(vectors))
        for item_id, vector in vectors.items():
            title = payloads.get(item_id, {}).get("title") or ""
            self._titles[item_id] = str(title)
            row = self._row(len(vector))
            self._matrix[row] = vector
            self._rows[item_id] = row
        for item_id in missing:
            if item_id not in vectors:
                self._absent[item_id] = now + self.ABSENT_TTL_S
        if len(self._absent) > self.capacity:
            self._absent = {i: t for i, t in self._absent.items() if t > now}
        while len(self._titles) > self.capacity:
            item_id, _ = self._titles.popitem(last=False)
            self._free.append(self._rows.pop(item_id))

    def _row(self, dim: int) -> int:
        """A free row of the matrix, growing it (doubling) when full."""
        if self._free:
            return self._free.pop()
        used = len(self._rows) + len(self._free)
        if used == len(self._matrix):
            grown = np.zeros((max(1024, 2 * used), dim), dtype=np.float32)
            if used:
                grown[:used] = self._matrix[:used]
            self._matrix = grown  # views handed out before keep the old one
        return used

    def vectors(self) -> VectorRows:
        """The cached vectors by item id (valid until the next `fetch`)."""
        return VectorRows(self._matrix, self._rows)

    def get(self, item_id: str) -> tuple[FloatArray, str] | None:
        row = self._rows.get(item_id)
        if row is None:
            return None
        self._titles.move_to_end(item_id)
        return self._matrix[row], self._titles[item_id]

    def ids(self) -> list[str]:
        return list(self._rows)

    def size(self) -> int:
        return len(self._rows)

    def invalidate(self, ids: Iterable[str]) -> None:
        for item_id in ids:
            if self._titles.pop(item_id, None) is not None:
                self._free.append(self._rows.pop(item_id))


class CachedTitles(Mapping[str, str]):
    """The cache's titles as a read-only mapping (for `rank`'s reasons). Callers prefetch what
    they need first, so a lookup never costs a store round trip."""

    def __init__(self, cache: ItemCache) -> None:
        self._cache = cache

    def __getitem__(self, item_id: str) -> str:
        entry = self._cache.get(item_id)
        if entry is None or not entry[1]:
            raise KeyError(item_id)
        return entry[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache.ids())

    def __len__(self) -> int:
        return self._cache.size()


@dataclass(slots=True)
class RelatedIndex:
    """The compacted `related-items` topic in memory (in columns, `workers.ranking`), plus a
    popularity list from it."""

    # The popularity list is a prior: rebuilt at most this often (sorting every list on each
    # applied record was milliseconds a poll while related lists stream in).
    POPULARITY_REFRESH_S = 1.0

    table: RelatedTable = field(default_factory=RelatedTable)
    _popularity: list[tuple[str, float]] | None = None
    _prior: dict[str, float] | None = None
    _prior_weights: BlendWeights | None = None
    _changed: bool = False
    _built_at: float = 0.0

    def apply(self, item_id: str, value: RelatedItems | None) -> None:
        if value is None:
            self.table.remove(item_id)
        else:
            self.table.put(value)
        self._changed = True

    def __len__(self) -> int:
        return len(self.table)

    def popularity_with_prior(
        self, weights: BlendWeights
    ) -> tuple[list[tuple[str, float]], dict[str, float]]:
        """`popularity()` and its `ranking.popularity_prior`, from the same rebuild (the prior
        is kept with the list, not computed per ranked user)."""
        popularity = self.popularity()
        if self._prior is None or self._prior_weights is not weights:
            self._prior = popularity_prior(popularity, weights)
            self._prior_weights = weights
        return popularity, self._prior

    def popularity(self, limit: int = 1000) -> list[tuple[str, float]]:
        """Items by decayed basket/history count, most popular first (at most
        POPULARITY_REFRESH_S behind the applied lists)."""
        now = time.monotonic()
        stale = self._changed and now - self._built_at >= self.POPULARITY_REFRESH_S
        if self._popularity is None or stale:
            self._popularity = popularity_of(self.table.lists(), limit)
            self._prior = None
            self._changed, self._built_at = False, now
        return self._popularity


class RulesFile:
    """The business rules file, reloaded when its modification time or size changes (checked
    at most every CHECK_EVERY_S). An edit that does not validate is logged and the last valid
    rules stay in force: a typo must not drop every rule at once."""

    CHECK_EVERY_S = 1.0

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._rules: BusinessRules | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")

    def current(self) -> BusinessRules | None:
        if self.path is None:
            return None
        now = time.monotonic()
        if now - self._checked >= self.CHECK_EVERY_S:
            self._checked = now
            self._reload()
        return self._rules

    def _reload(self) -> None:
        assert self.path is not None
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self._rules = BusinessRules.load(self.path)
            logger.info("business rules loaded path=%s", self.path)
        except (OSError, ValidationError) as exc:
            logger.error("business rules not reloaded path=%s error=%s", self.path, exc)
