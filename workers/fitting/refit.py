"""The recommender's background fitter: on a schedule, or after enough new profile updates,
fit a candidate model on the recorded histories (`procedure.fit`), compare it with the model
serving on the same validation targets, and swap it in only when it wins.

The serving loop never waits for it: the fitter thread snapshots the recorded histories,
reads the item vectors from the store, and hands the fit to a runner — in production a child
process (`ProcessRunner`: no shared interpreter lock, a lower CPU priority, bounded thread
pools), in tests the calling thread. The swap is the recommender's `use_model`, adopted
between two micro-batches.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from schemas.fit_settings import FitSettings
from workers.metrics import WorkerMetrics

from .bundle import ModelBundle
from .history_log import HistoryLog, Rows
from .offline import ItemSpace
from .procedure import CANDIDATES, EvidenceSource, FitError, FitResult, UserEncoderStep

logger = logging.getLogger(__name__)

# Item ids per store look-up while gathering the fit's item vectors: short calls, so the
# serving loop's own look-ups are never queued behind a long one.
STORE_CHUNK = 1000


class FitStopped(FitError):
    """The fit was abandoned because the process is stopping."""


@dataclass(frozen=True)
class FitJob:
    """Everything one fit needs, picklable (it crosses into the fit process): a user
    encoder step, and the encoder it returns, must pickle too."""

    histories: dict[str, Rows]
    items: ItemSpace
    current: ModelBundle
    evidence: EvidenceSource
    k: int
    candidates: int
    mmr_lambda: float
    user_encoder_step: UserEncoderStep | None = None
    learned_ranker: bool = True


FitRunner = Callable[[FitJob, threading.Event], FitResult]


def inline_runner(job: FitJob, stop: threading.Event) -> FitResult:
    """Run the fit in the calling thread (tests, tools)."""
    from workers.fit_child import run_job

    result: FitResult = run_job(job)
    return result


class ProcessRunner:
    """Runs each fit in a fresh child process (spawned: none of the parent's threads, clients
    or interpreter lock), at CPU priority `nice` with `threads` BLAS/OpenMP threads; killed
    when the workers stop."""

    def __init__(self, *, threads: int = 1, nice: int = 10, poll_s: float = 0.5) -> None:
        self.threads = threads
        self.nice = nice
        self.poll_s = poll_s

    def __call__(self, job: FitJob, stop: threading.Event) -> FitResult:
        from workers import fit_child

        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(
            target=fit_child.main,
            args=(theirs, self.threads, self.nice),
            name="relata-fit",
            daemon=True,
        )
        process.start()
        theirs.close()
        try:
            ours.send(job)
            while not ours.poll(self.poll_s):
                if stop.is_set():
                    raise FitStopped("the workers are stopping: fit abandoned")
                if not process.is_alive():
                    msg = f"the fit process ended without a result (exit code {process.exitcode})"
                    raise FitError(msg)
            status, value = ours.recv()
        finally:
            ours.close()
            process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        if status != "ok":
            raise FitError(f"the fit failed in its process: {value}")
        if not isinstance(value, FitResult):
            raise FitError(f"the fit process answered {type(value).__name__}, not a FitResult")
        return value


def user_encoder_step(settings: FitSettings) -> UserEncoderStep | None:
    """The fit's sequence user encoder step as `settings` ask (None: a budget of 0), on the
    fit's threads: what the background fitter and `relata evaluate`'s default both run."""
    if settings.user_encoder_budget_s <= 0:
        return None
    from .encoder_step import SequenceEncoderStep  # torch: only when an encoder is fitted

    return SequenceEncoderStep(budget_s=settings.user_encoder_budget_s, threads=settings.threads)


class _Store(Protocol):
    def get_vectors(self, ids: Iterable[str]) -> dict[str, np.ndarray]: ...

    def get_payloads(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]: ...


def store_items(store: _Store, ids: Collection[str], *, chunk: int = STORE_CHUNK) -> ItemSpace:
    """The item vectors and availability of `ids` the store holds (items not indexed yet are
    left out), rows L2-normalised as the store's cosine treats them."""
    wanted = sorted(set(ids))
    vectors: dict[str, np.ndarray] = {}
    available: set[str] = set()
    for start in range(0, len(wanted), chunk):
        part = wanted[start : start + chunk]
        vectors.update(store.get_vectors(part))
        payloads = store.get_payloads(part)
        available.update(i for i, p in payloads.items() if p.get("available") is True)
    found = [i for i in wanted if i in vectors]
    if not found:
        return ItemSpace([], np.zeros((0, 1), dtype=np.float32), frozenset())
    matrix = np.stack([np.asarray(vectors[i], dtype=np.float32) for i in found])
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix = (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return ItemSpace(found, matrix, frozenset(available))


class Refitter:
    """Decides when to fit, runs the fit, and swaps the winner in (`run` is its thread)."""

    def __init__(
        self,
        *,
        log: HistoryLog,
        settings: FitSettings,
        current: Callable[[], ModelBundle],
        swap: Callable[[ModelBundle], None],
        items: Callable[[Collection[str]], ItemSpace],
        evidence: EvidenceSource,
        metrics: WorkerMetrics,
        runner: FitRunner = inline_runner,
        k: int = 10,
        candidates: int = CANDIDATES,
        mmr_lambda: float = 1.0,
        user_encoder_step: UserEncoderStep | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 1.0,
    ) -> None:
        self.log = log
        self.settings = settings
        self.current = current
        self.swap = swap
        self.items = items
        self.evidence = evidence
        self.metrics = metrics
        self.runner = runner
        self.k = k
        self.candidates = candidates
        self.mmr_lambda = mmr_lambda
        self.user_encoder_step = user_encoder_step
        self.clock = clock
        self.poll_s = poll_s
        self.stop = threading.Event()
        self._fitted_updates = 0
        self._last_fit = clock()

    def due(self) -> bool:
        """Enough histories, and enough new updates or enough time since the last fit."""
        new = self.log.updates - self._fitted_updates
        if new <= 0 or len(self.log) < self.settings.min_users:
            return False
        waited = self.clock() - self._last_fit
        return new >= self.settings.every_updates or waited >= self.settings.interval_s

    def fit_once(self) -> str:
        """One fit now: `swapped`, `kept` or `failed` (counted and logged); `stopped` when
        the workers stop meanwhile (not counted)."""
        started = time.perf_counter()
        self._fitted_updates = self.log.updates
        self._last_fit = self.clock()
        current = self.current()
        try:
            snapshot = self.log.snapshot()
            universe = {row[0] for rows in snapshot.values() for row in rows}
            job = FitJob(
                histories=snapshot,
                items=self.items(universe),
                current=current,
                evidence=self.evidence,
                k=self.k,
                candidates=self.candidates,
                mmr_lambda=self.mmr_lambda,
                user_encoder_step=self.user_encoder_step,
                learned_ranker=self.settings.learned_ranker,
            )
            result = self.runner(job, self.stop)
        except FitStopped:
            logger.info("fit abandoned: stopping")
            return "stopped"
        except Exception as exc:
            seconds = time.perf_counter() - started
            logger.warning("fit failed seconds=%.1f error=%s: %s", seconds, type(exc).__name__, exc)
            self.metrics.fits.labels(outcome="failed").inc()
            self.metrics.fit_seconds.observe(seconds)
            return "failed"
        seconds = time.perf_counter() - started
        self.metrics.fit_seconds.observe(seconds)
        self.metrics.fit_validation_ndcg.labels(model="candidate").set(result.score)
        self.metrics.fit_validation_ndcg.labels(model="current").set(result.current_score)
        serving = self.current()
        wins = result.wins(self.settings.min_gain)
        # A model swapped in by someone else meanwhile was not what the candidate beat.
        outcome = "swapped" if wins and serving.version == current.version else "kept"
        if outcome == "swapped":
            self.swap(result.candidate)
            self._save(result.candidate)
        self.metrics.fits.labels(outcome=outcome).inc()
        logger.info(
            "fit outcome=%s users=%d candidate=%s ndcg=%.5f current=%s ndcg_current=%.5f "
            "seconds=%.1f phases=%s",
            outcome,
            result.users,
            result.candidate.version,
            result.score,
            current.version,
            result.current_score,
            seconds,
            ",".join(f"{phase}:{sec:.1f}" for phase, sec in result.timings.items()),
        )
        return outcome

    def _save(self, bundle: ModelBundle) -> None:
        path: Path | None = self.settings.model_path
        if path is None:
            return
        try:
            bundle.save(path)
        except OSError as exc:  # serving goes on with the winner; the next start reads the old
            logger.warning("saving the fitted model failed path=%s error=%s", path, exc)

    def run(self, stop_event: threading.Event) -> None:
        """Check every `poll_s` whether a fit is due, until `stop_event`."""
        self.stop = stop_event
        logger.info(
            "fitter started every_updates=%d interval_s=%.0f min_users=%d",
            self.settings.every_updates,
            self.settings.interval_s,
            self.settings.min_users,
        )
        while not stop_event.wait(self.poll_s):
            self.metrics.fit_histories.set(len(self.log))
            if self.due():
                self.fit_once()
