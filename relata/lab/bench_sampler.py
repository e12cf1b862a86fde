"""Sampling of the running pipeline during the benchmark: consumer lag, and the CPU and RSS of
each process with its own children."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from relata.runtime.pipeline import Pipeline

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    t: float
    lag: dict[str, int]
    cpu_percent: dict[str, float]
    rss_mb: dict[str, float]


class Sampler:
    """Samples lag and per-process CPU/RSS every `interval_s`: each sampled process with its
    own children (psutil), not those sampled under a name of their own (the driver's children
    are the pipeline's processes).

    The process families are looked up every FAMILY_REFRESH_S, not per sample (each lookup
    reads every process's /proc/PID/stat: a third of the driver's samples at 500 events/s), and
    their psutil objects are kept, so a child's CPU is counted from its second sample on (a
    new object's first `cpu_percent` is 0.0).
    """

    FAMILY_REFRESH_S = 10.0

    def __init__(self, pipeline: Pipeline, *, interval_s: float = 1.0) -> None:
        import psutil

        self.pipeline = pipeline
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._roots = {name: psutil.Process(pid) for name, pid in pipeline.pids().items()}
        self._families: dict[str, dict[int, Any]] = {}
        self._families_at = 0.0
        self._refresh_families()
        for name in self._roots:
            self._cpu(name)  # prime cpu_percent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relata-bench-sampler", daemon=True)

    def _refresh_families(self) -> None:
        import psutil

        descendants: dict[str, set[int]] = {}
        for name, root in self._roots.items():
            try:
                descendants[name] = {c.pid for c in root.children(recursive=True)}
            except psutil.Error:
                descendants[name] = set()
        roots = {root.pid: name for name, root in self._roots.items()}
        for name, root in self._roots.items():
            mine = set(descendants[name])
            for pid in descendants[name] & roots.keys():
                mine -= {pid} | descendants[roots[pid]]
            kept = self._families.get(name, {})
            members = {root.pid: root}
            for pid in sorted(mine):
                member = kept.get(pid)
                if member is None:
                    try:
                        member = psutil.Process(pid)
                    except psutil.Error:
                        continue
                members[pid] = member
            self._families[name] = members
        self._families_at = time.monotonic()

    def family(self, name: str) -> list[int]:
        """The pids sampled under `name`: the process and its own children."""
        return sorted(self._families[name])

    def _cpu(self, name: str) -> float:
        import psutil

        total = 0.0
        for member in self._families[name].values():
            try:
                total += member.cpu_percent(None)
            except psutil.Error:
                continue
        return total

    def _rss(self, name: str) -> float:
        import psutil

        total = 0
        for member in self._families[name].values():
            try:
                total += member.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20

    def sample(self) -> Sample:
        """One sample now (the sampling thread takes one every `interval_s`)."""
        if time.monotonic() - self._families_at >= self.FAMILY_REFRESH_S:
            self._refresh_families()
        try:
            lag = self.pipeline.lags()
        except Exception as exc:  # a transient admin timeout must not end the benchmark
            logger.warning("lag sample failed error=%s", exc)
            lag = {}
        return Sample(
            t=time.time(),
            lag=lag,
            cpu_percent={n: round(self._cpu(n), 1) for n in self._roots},
            rss_mb={n: round(self._rss(n), 1) for n in self._roots},
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())

    def latest_lag(self) -> int | None:
        return sum(self.samples[-1].lag.values()) if self.samples else None
