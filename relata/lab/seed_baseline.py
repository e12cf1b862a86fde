"""The seed's naive recommendation pipeline, the benchmark's baseline (`relata bench --baseline seed`).

Per event, as the seed did it: rebuild that user's behaviour text from their history, encode it
with the transformer one user at a time, compute cosine similarity against the full item matrix
with scikit-learn, sort all items and take the top k not already in the history. It runs
in-process without Kafka (so it is measured without any broker or network overhead: a
generous baseline), sequentially and as fast as it can: its achieved rate is its maximum
throughput, and each event's latency is its processing time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from numpy.typing import NDArray

from relata.runtime.latency import LatencySeries
from schemas.messages import HistoryEntry
from workers.ranking import profile_text

logger = logging.getLogger(__name__)

# Event-type weights of the seed's history (a return cancels a purchase).
_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "return": -8.0}


@dataclass(frozen=True, slots=True)
class BaselineResult:
    events: int
    elapsed_s: float
    latency: LatencySeries

    @property
    def achieved_rate(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0


class SeedRecommender:
    """The seed's per-event recommender over a fixed item matrix (rows L2-normalised)."""

    def __init__(
        self,
        encode: Callable[[Sequence[str]], NDArray[np.float32]],
        *,
        item_ids: Sequence[str],
        item_matrix: NDArray[np.float32],
        titles: dict[str, str],
        k: int = 10,
        history_size: int = 50,
    ) -> None:
        self._encode = encode
        self._item_ids = list(item_ids)
        self._matrix = item_matrix
        self._titles = titles
        self._k = k
        self._history_size = history_size
        self._histories: dict[str, dict[str, HistoryEntry]] = {}

    def on_event(self, event: dict[str, object]) -> list[str]:
        """Fold one event into its user's history and return that user's fresh top-k item ids."""
        from sklearn.metrics.pairwise import cosine_similarity

        user = str(event["user_id"])
        item = str(event["item_id"])
        event_type = str(event["event_type"])
        ts = datetime.fromisoformat(str(event["ts"]))
        history = self._histories.setdefault(user, {})
        previous = history.pop(item, None)
        weight = _WEIGHTS.get(event_type, 1.0) + (previous.weight if previous else 0.0)
        count = (previous.count if previous else 0) + 1
        history[item] = HistoryEntry(
            item_id=item,
            weight=weight,
            last_event_type=event_type,
            last_ts=ts,
            count=count,
        )
        while len(history) > self._history_size:
            history.pop(next(iter(history)))
        entries = list(reversed(history.values()))  # most recent first
        text = profile_text(entries, self._titles)
        if not text:
            return []
        vector = self._encode([text])
        scores = cosine_similarity(vector, self._matrix)[0]
        order = np.argsort(-scores)
        top: list[str] = []
        for index in order:
            candidate = self._item_ids[index]
            if candidate not in history:
                top.append(candidate)
                if len(top) == self._k:
                    break
        return top


def run_baseline(
    recommender: SeedRecommender,
    lines: Iterable[bytes],
    *,
    max_events: int,
    max_seconds: float,
    on_progress: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Feed raw event lines to the seed recommender until `max_events` or `max_seconds`."""
    latency = LatencySeries()
    start = time.perf_counter()
    done = 0
    next_report = start + 1.0
    for raw in lines:
        if done >= max_events:
            break
        now = time.perf_counter()
        if now - start >= max_seconds:
            break
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        began = time.perf_counter()
        recommender.on_event(event)
        finished = time.perf_counter()
        latency.add(finished, (finished - began) * 1000)
        done += 1
        if on_progress is not None and finished >= next_report:
            next_report = finished + 1.0
            on_progress(done, finished - start)
    return BaselineResult(done, time.perf_counter() - start, latency)
