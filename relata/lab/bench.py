"""`relata bench`: event→recommendation latency, throughput and resources of the full pipeline.

One run: (1) the encoder's ceiling, pure batched inference of the model on the catalog texts in
this process before anything else runs; (2) optionally the seed's naive pipeline on the same
events (`--baseline seed`, in-process, see `relata/seed_baseline.py`); (3) the full pipeline
(`relata/pipeline.py`) fed at a fixed offered rate for `--duration` seconds, sampling consumer
lag, CPU and RSS of every process each second; (4) with `--find-max`, phases at doubling and
then bisected rates to find the maximum sustainable rate.

A rate is *sustainable* when the replay achieved ≥ 95 % of it, the lag of the recommendation
path at the end of the phase (events before the profile agent, profile updates before the
recommender) is at most one second's worth of events (so it is bounded, not growing), and p99
latency stays under `--max-p99-ms`. The association agent's lag (inputs for related-items) is
reported beside it.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.latency import LatencySeries, summarize
from relata.runtime.pipeline import DEFAULT_DATA, Pipeline, PipelineOptions, pipeline_partitions
from relata.runtime.replay import ReplayProgress, iter_jsonl
from schemas.settings import EncoderSettings, KafkaSettings

logger = logging.getLogger(__name__)

SUSTAINED_SHARE = 0.95  # achieved/offered rate below this: the driver or broker is the limit
MAX_RATE = 200_000.0  # stop doubling here
BISECT_STEPS = 3


def say(text: str) -> None:
    click.echo(f"relata bench: {text}", err=True)


# ---------------------------------------------------------------------------------------------
# Events: an endless stream of the data set's events (later passes get fresh event ids)


def endless_events(path: Path, *, cycle_events: int | None = None) -> Iterator[tuple[int, bytes]]:
    """The data set's event lines (only the first `cycle_events` of them, if given), repeated;
    passes after the first rename event ids.

    The stream processor de-duplicates by event id, so a second pass must not reuse them. A
    short cycle replays a fixed population of users and items: after its first pass the state
    is complete, so memory that still grows is a leak (the soak test).
    """
    for cycle in itertools.count():
        for number, raw in itertools.islice(iter_jsonl(path), cycle_events):
            if cycle == 0:
                yield number, raw
                continue
            event = json.loads(raw)
            event["event_id"] = f"{event['event_id']}~{cycle}"
            yield number, json.dumps(event).encode()


# ---------------------------------------------------------------------------------------------
# Sampling


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


# ---------------------------------------------------------------------------------------------
# Phases


@dataclass
class PhaseResult:
    rate: float
    sent: int
    elapsed_s: float
    started: float
    ended: float
    end_lag: int | None
    association_lag: int | None
    latency_ms: dict[str, float]
    drained: bool
    max_p99_ms: float

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def sustainable(self) -> bool:
        p99 = self.latency_ms.get("p99", math.nan)
        lag_ok = self.end_lag is not None and self.end_lag <= max(50.0, self.rate)
        return (
            self.achieved_rate >= SUSTAINED_SHARE * self.rate
            and lag_ok
            and not math.isnan(p99)
            and p99 <= self.max_p99_ms
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "achieved_rate": round(self.achieved_rate, 1),
            "sent": self.sent,
            "end_lag": self.end_lag,
            "association_lag": self.association_lag,
            "latency_ms": _json_safe(self.latency_ms),
            "sustainable": self.sustainable,
            "drained": self.drained,
        }


def _json_safe(values: dict[str, float]) -> dict[str, float | None]:
    return {k: None if math.isnan(v) else v for k, v in values.items()}


@dataclass
class Bench:
    pipeline: Pipeline
    sampler: Sampler
    events: Iterator[tuple[int, bytes]]
    max_p99_ms: float
    phases: list[PhaseResult] = field(default_factory=list)

    def run_phase(self, rate: float, duration_s: float, *, label: str) -> PhaseResult:
        """Replay at `rate` for `duration_s`, then sample the lag and let the pipeline drain."""
        probe = self.pipeline.probe
        assert probe is not None
        started = time.time()
        deadline = time.monotonic() + duration_s
        last_note = [0.0]

        def progress(p: ReplayProgress) -> None:
            now = time.monotonic()
            if now - last_note[0] < 1.0:
                return
            last_note[0] = now
            recent = probe.measured.summary(since=time.time() - 5)
            say(
                f"[{label} {rate:.0f}/s] sent {p.sent} ({p.rate:.0f}/s) "
                f"recommendations {probe.stats.recommendations} "
                f"lag {self.sampler.latest_lag()} p99(5 s) {recent['p99']} ms"
            )

        limit = max(1, int(rate * duration_s)) if rate > 0 else None
        result = self.pipeline.replay(
            rate=rate,
            limit=limit,
            on_progress=progress,
            should_stop=lambda: time.monotonic() >= deadline,
            lines=self.events,
        )
        ended = time.time()
        lags = self.pipeline.lags()
        # The recommendation path: events before the profile agent, updates before the
        # recommender. Association inputs (related-items freshness) are reported apart.
        end_lag = sum(n for name, n in lags.items() if name != "associations")
        drained = self.pipeline.wait_drained(quiet_s=2.0, timeout_s=max(30.0, duration_s * 2))
        # Every recommendation triggered by this phase's events has arrived (or timed out).
        latencies = [v for t, v in probe.measured.samples if started <= t <= time.time()]
        phase = PhaseResult(
            rate=rate,
            sent=result.sent,
            elapsed_s=result.elapsed_s,
            started=started,
            ended=ended,
            end_lag=end_lag,
            association_lag=lags.get("associations"),
            latency_ms=summarize(latencies),
            drained=drained,
            max_p99_ms=self.max_p99_ms,
        )
        say(
            f"[{label} {rate:.0f}/s] achieved {phase.achieved_rate:.0f}/s, end lag {end_lag} "
            f"(association inputs {phase.association_lag}), "
            f"latency {phase.latency_ms} -> {'sustainable' if phase.sustainable else 'NOT sustainable'}"
        )
        self.phases.append(phase)
        return phase

    def find_max(self, start_rate: float, duration_s: float) -> float | None:
        """Doubling from `start_rate` until a rate is not sustainable, then bisection."""
        good: float | None = None
        bad: float | None = None
        rate = start_rate
        while rate <= MAX_RATE:
            if self.run_phase(rate, duration_s, label="find-max").sustainable:
                good = rate
                rate *= 2
            else:
                bad = rate
                break
        if good is None:
            # Even the start rate fails: bisect below it.
            good, bad = 0.0, start_rate
        if bad is None:
            return good
        for _ in range(BISECT_STEPS):
            mid = round((good + bad) / 2)
            if mid <= good or mid >= bad:
                break
            if self.run_phase(mid, duration_s, label="find-max").sustainable:
                good = mid
            else:
                bad = mid
        return good or None


# ---------------------------------------------------------------------------------------------
# Encoder ceiling and the seed baseline (in this process, before the pipeline starts)


def catalog_texts(data_dir: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Item ids, encoded texts (workers.item_text) and titles of the data set's catalog."""
    from schemas.decoding import Rejection, decode
    from schemas.messages import CatalogItem
    from workers.item_text import item_text

    ids, texts, titles = [], [], {}
    for _, raw in iter_jsonl(data_dir / "items.jsonl.gz"):
        item = decode(raw, CatalogItem)
        if isinstance(item, Rejection):
            continue
        ids.append(item.item_id)
        texts.append(item_text(item))
        titles[item.item_id] = item.title or item.item_id
    return ids, texts, titles


def measure_encoder(
    data_dir: Path, *, baseline: bool, baseline_events: int, baseline_seconds: float
) -> dict[str, Any]:
    """The encoder ceiling (texts/s) and, when asked, the seed baseline's rate and latency."""
    import numpy as np

    from relata.lab.seed_baseline import SeedRecommender, run_baseline
    from workers.encoder import TransformerEncoder, throughput_ceiling

    ids, texts, titles = catalog_texts(data_dir)
    settings = EncoderSettings()
    encoder = TransformerEncoder.from_settings(settings)
    say(f"encoder ceiling: encoding {len(texts)} catalog texts ({encoder.device}, {encoder.dtype})")
    ceiling = throughput_ceiling(encoder, texts)
    say(f"encoder ceiling: {ceiling:.0f} texts/s")
    out: dict[str, Any] = {
        "encoder_ceiling_texts_per_s": round(ceiling, 1),
        "encoder": {
            "device": str(encoder.device),
            "dtype": str(encoder.dtype),
            "batch_size": settings.batch_size,
            "texts": len(texts),
        },
    }
    if baseline:
        matrix = np.asarray(encoder.encode(texts), dtype=np.float32)
        seed = SeedRecommender(encoder.encode, item_ids=ids, item_matrix=matrix, titles=titles)
        say(f"seed baseline: up to {baseline_events} events or {baseline_seconds:.0f} s")
        lines = (raw for _, raw in iter_jsonl(data_dir / "events.jsonl.gz"))
        result = run_baseline(
            seed,
            lines,
            max_events=baseline_events,
            max_seconds=baseline_seconds,
            on_progress=lambda n, s: say(f"[seed] {n} events in {s:.0f} s ({n / s:.1f}/s)"),
        )
        out["baseline"] = {
            "kind": "seed (in-process, no Kafka, one user at a time)",
            "events": result.events,
            "achieved_rate": round(result.achieved_rate, 2),
            "latency_ms": _json_safe(result.latency.summary()),
        }
        say(f"seed baseline: {result.achieved_rate:.1f} events/s")
    encoder.close()
    return out


# ---------------------------------------------------------------------------------------------
# Metrics of the workers


def histogram(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Cumulative bucket counts of a Prometheus histogram (summed over label sets)."""
    buckets: dict[str, float] = {}
    prefix = f"{name}_bucket{{"
    for key, value in metrics.items():
        if key.startswith(prefix):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = buckets.get(le, 0.0) + value
    return dict(sorted(buckets.items(), key=lambda kv: float(kv[0])))


def metric_sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(f"{name}{{"))


def worker_figures(metrics: dict[str, float]) -> dict[str, Any]:
    texts = metric_sum(metrics, "relata_encoded_texts_total")
    seconds = metric_sum(metrics, "relata_encode_seconds_sum")
    return {
        "encoder_texts_per_s": round(texts / seconds, 1) if seconds > 0 else None,
        "encoded_texts": texts,
        "encode_batch_size_buckets": histogram(metrics, "relata_encode_batch_size"),
        "recommender_batch_size_buckets": histogram(metrics, "relata_recommender_batch_size"),
        "recommendations_published": metric_sum(metrics, "relata_recommendations_published_total"),
        "pipeline_reported_latency_s_buckets": histogram(
            metrics, "relata_event_to_recommendation_seconds"
        ),
    }


# ---------------------------------------------------------------------------------------------
# Report


def rss_report(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """RSS per process at the start, halfway, the end, and its maximum: flat means the second
    half (mid -> end) adds nothing once the state a data set needs is built."""
    names = sorted({n for s in samples for n in s.rss_mb})
    out = {}
    for name in names:
        values = [s.rss_mb[name] for s in samples if name in s.rss_mb]
        if values:
            out[name] = {
                "start": values[0],
                "mid": values[len(values) // 2],
                "end": values[-1],
                "max": max(values),
            }
    return out


def rss_over_time(
    samples: list[Sample], *, origin: float, every_s: float = 10.0
) -> list[list[Any]]:
    """[[seconds, {process: RSS MB}], ...], one sample per `every_s`."""
    out: list[list[Any]] = []
    next_t = origin
    for sample in samples:
        if sample.t >= next_t:
            out.append([round(sample.t - origin, 1), dict(sample.rss_mb)])
            next_t = sample.t + every_s
    return out


def cpu_report(samples: list[Sample]) -> dict[str, float]:
    names = sorted({n for s in samples for n in s.cpu_percent})
    return {
        name: round(sum(s.cpu_percent.get(name, 0.0) for s in samples) / max(1, len(samples)), 1)
        for name in names
    }


def plot(
    path: Path,
    *,
    series: LatencySeries,
    samples: list[Sample],
    origin: float,
    phases: list[PhaseResult],
) -> None:
    """Latency (p50/p99 per second) and total lag over time, phases shaded; below it each
    process's RSS over time (what the memory soak is read from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = series.windows(1.0, origin=origin)
    fig, (ax, rss_ax) = plt.subplots(
        2, 1, figsize=(10, 7.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    if windows:
        xs = [w for w, _ in windows]
        ax.plot(xs, [s["p50"] for _, s in windows], label="p50 latency (ms)")
        ax.plot(xs, [s["p99"] for _, s in windows], label="p99 latency (ms)")
    ax.set_ylabel("event → recommendation latency (ms)")
    ax.set_yscale("log")
    lag_ax = ax.twinx()
    lag_ax.plot(
        [s.t - origin for s in samples],
        [sum(s.lag.values()) for s in samples],
        color="grey",
        linestyle=":",
        label="consumer lag (records)",
    )
    lag_ax.set_ylabel("consumer lag (records)")
    for phase in phases:
        ax.axvspan(phase.started - origin, phase.ended - origin, alpha=0.06, color="green")
        ax.text(
            phase.started - origin, ax.get_ylim()[1], f"{phase.rate:.0f}/s", fontsize=7, va="top"
        )
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = lag_ax.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, loc="upper left")
    ax.set_title("relata: event → recommendation latency and lag")
    for name in sorted({name for sample in samples for name in sample.rss_mb}):
        rss_ax.plot(
            [sample.t - origin for sample in samples if name in sample.rss_mb],
            [sample.rss_mb[name] for sample in samples if name in sample.rss_mb],
            label=name,
        )
    rss_ax.set_ylabel("RSS (MB)")
    rss_ax.set_xlabel("seconds since the first phase")
    if samples:
        rss_ax.legend(loc="upper left", fontsize=8, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


@click.command(name="bench")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=DEFAULT_DATA,
    show_default=True,
    envvar="RELATA_BENCH_DATA",
    show_envvar=True,
    help="Data set directory (items.jsonl.gz, events.jsonl.gz).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=500.0,
    show_default=True,
    envvar="RELATA_BENCH_RATE",
    show_envvar=True,
    help="Offered rate, events/s.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    envvar="RELATA_BENCH_DURATION",
    show_envvar=True,
    help="Seconds of the measured phase at --rate.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the results here (and a PNG of latency beside it).",
)
@click.option("--find-max", is_flag=True, help="Also search the maximum sustainable rate.")
@click.option(
    "--find-max-duration",
    type=click.FloatRange(min=1),
    default=15.0,
    show_default=True,
    help="Seconds of each --find-max phase.",
)
@click.option(
    "--max-p99-ms",
    type=click.FloatRange(min=1),
    default=250.0,
    show_default=True,
    envvar="RELATA_BENCH_MAX_P99_MS",
    show_envvar=True,
    help="p99 bound of a sustainable rate.",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds at --rate before the measured phase (excluded).",
)
@click.option(
    "--baseline",
    type=click.Choice(["none", "seed"]),
    default="none",
    show_default=True,
    help="Also measure the seed's naive pipeline on the same events.",
)
@click.option(
    "--baseline-seconds",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Longest run of the baseline.",
)
@click.option(
    "--skip-ceiling",
    is_flag=True,
    help="Do not measure the encoder ceiling (faster; the field is null).",
)
@click.option(
    "--cycle-events",
    type=click.IntRange(min=1),
    default=None,
    help="Replay only the first N events, repeated (a fixed population: the memory soak).",
)
@settings_options(KafkaSettings, group="kafka")
def command(
    data_dir: Path,
    rate: float,
    duration: float,
    json_out: Path | None,
    find_max: bool,
    find_max_duration: float,
    max_p99_ms: float,
    warmup: float,
    baseline: str,
    baseline_seconds: float,
    skip_ceiling: bool,
    cycle_events: int | None,
    **params: Any,
) -> None:
    """Measure event→recommendation latency, throughput, lag and resources of the pipeline."""
    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    report: dict[str, Any] = {
        "data": str(data_dir),
        "rate": rate,
        "duration_s": duration,
        "cycle_events": cycle_events,
    }
    if skip_ceiling and baseline == "none":
        report["encoder_ceiling_texts_per_s"] = None
    else:
        report.update(
            measure_encoder(
                data_dir,
                baseline=baseline == "seed",
                baseline_events=100_000,
                baseline_seconds=baseline_seconds,
            )
        )
        if skip_ceiling:
            report["encoder_ceiling_texts_per_s"] = None
        gc.collect()

    pipeline = Pipeline(
        PipelineOptions(data_dir=data_dir, kafka=kafka, partitions=pipeline_partitions(kafka))
    )
    sampler: Sampler | None = None
    failed = False
    try:
        ready_started = time.monotonic()
        pipeline.start(status=say)
        report["startup_s"] = round(time.monotonic() - ready_started, 1)
        report.update(worker_figures(pipeline.metrics()))
        sampler = Sampler(pipeline)
        sampler.start()
        bench = Bench(
            pipeline,
            sampler,
            endless_events(pipeline.events_path, cycle_events=cycle_events),
            max_p99_ms,
        )
        if warmup > 0:
            bench.run_phase(rate, warmup, label="warmup")
        main = bench.run_phase(rate, duration, label="measure")
        origin = bench.phases[0].started
        probe = pipeline.probe
        assert probe is not None
        report.update(
            {
                "achieved_rate": round(main.achieved_rate, 1),
                "latency_ms": _json_safe(main.latency_ms),
                "sustainable": main.sustainable,
                "sustainable_rule": (
                    f"achieved >= {SUSTAINED_SHARE:.0%} of offered, recommendation-path lag at "
                    f"phase end <= 1 s of events, p99 <= {max_p99_ms:g} ms"
                ),
                "reported_latency_ms": _json_safe(
                    summarize(v for t, v in probe.reported.samples if main.started <= t)
                ),
                # event -> profile update consumed: the stream processor's share of the latency
                "profile_stage_latency_ms": _json_safe(
                    summarize(
                        v for t, v in probe.profile_stage.samples if main.started <= t <= main.ended
                    )
                ),
            }
        )
        if find_max:
            report["max_sustainable_rate"] = bench.find_max(rate, find_max_duration)
        else:
            report["max_sustainable_rate"] = rate if main.sustainable else None
        report["max_sustainable_rate_searched"] = find_max
        sampler.stop()
        report.update(worker_figures(pipeline.metrics()))
        report["phases"] = [p.as_json() for p in bench.phases]
        report["rss_mb"] = rss_report(sampler.samples)
        report["rss_over_time"] = rss_over_time(sampler.samples, origin=origin)
        report["cpu_percent_avg"] = cpu_report(sampler.samples)
        report["lag_over_time"] = [
            [round(s.t - origin, 1), sum(s.lag.values())] for s in sampler.samples
        ]
        report["dead_letter"] = sum(probe.stats.dead_letters.values())
        report["recommendations"] = probe.stats.recommendations
        if json_out is not None:
            png = json_out.with_suffix(".png")
            plot(
                png,
                series=probe.measured,
                samples=sampler.samples,
                origin=origin,
                phases=bench.phases,
            )
            report["plot"] = str(png)
    except Exception:
        failed = True
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        pipeline.close(keep_logs=failed)

    base = report.get("baseline")
    relata_rate = report.get("max_sustainable_rate") or report.get("achieved_rate")
    if base and base.get("achieved_rate") and relata_rate:
        report["speedup"] = round(float(relata_rate) / base["achieved_rate"], 1)
    text = json.dumps(report, indent=2)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
        say(f"wrote {json_out} and {report.get('plot')}")
    lat = report["latency_ms"]
    say(
        f"offered {rate:.0f}/s achieved {report['achieved_rate']}/s; latency p50 {lat['p50']} "
        f"p95 {lat['p95']} p99 {lat['p99']} max {lat['max']} ms; max sustainable "
        f"{report['max_sustainable_rate']}; encoder {report.get('encoder_texts_per_s')} texts/s "
        f"(ceiling {report.get('encoder_ceiling_texts_per_s')}); speedup {report.get('speedup')}"
    )
