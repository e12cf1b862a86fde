"""`relata bench`: event→recommendation latency, throughput and resources of the full pipeline.

One run: (1) the encoder's ceiling, pure batched inference of the model on the catalog texts in
this process before anything else runs (`bench_encoder`); (2) optionally the seed's naive
pipeline on the same events (`--baseline seed`, in-process, see `relata/lab/seed_baseline.py`);
(3) the full pipeline (`relata/runtime/pipeline.py`) fed at a fixed offered rate for
`--duration` seconds (`bench_phases`), sampling consumer lag, CPU and RSS of every process each
second (`bench_sampler`); (4) with `--find-max`, phases at doubling and then bisected rates to
find the maximum sustainable rate. This module is the command; `bench_report` and `bench_plot`
turn the run into JSON and a chart.

A rate is *sustainable* when the replay achieved ≥ 95 % of it, the lag of the recommendation
path at the end of the phase (events before the profile agent, profile updates before the
recommender) is at most one second's worth of events (so it is bounded, not growing), and p99
latency stays under `--max-p99-ms`. The association agent's lag (inputs for related-items) is
reported beside it.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import click

from relata.cli.settings_cli import build_settings, settings_options
from relata.lab.bench_encoder import measure_encoder
from relata.lab.bench_phases import SUSTAINED_SHARE, Bench, endless_events
from relata.lab.bench_plot import plot
from relata.lab.bench_report import (
    cpu_report,
    json_safe,
    rss_over_time,
    rss_report,
    say,
    worker_figures,
)
from relata.lab.bench_sampler import Sampler
from relata.runtime.latency import summarize
from relata.runtime.pipeline import DEFAULT_DATA, Pipeline, PipelineOptions, pipeline_partitions
from schemas.settings import KafkaSettings


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
        PipelineOptions(
            data_dir=data_dir,
            kafka=kafka,
            partitions=pipeline_partitions(kafka),
            # The serving path is measured: a background refit (its own low-priority process,
            # minutes of CPU) would take a share of the cores at a moment the run cannot choose.
            process_env={"workers": {"RELATA_FIT_ENABLED": "false"}},
        )
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
                "latency_ms": json_safe(main.latency_ms),
                "sustainable": main.sustainable,
                "sustainable_rule": (
                    f"achieved >= {SUSTAINED_SHARE:.0%} of offered, recommendation-path lag at "
                    f"phase end <= 1 s of events, p99 <= {max_p99_ms:g} ms"
                ),
                "reported_latency_ms": json_safe(
                    summarize(v for t, v in probe.reported.samples if main.started <= t)
                ),
                # event -> profile update consumed: the stream processor's share of the latency
                "profile_stage_latency_ms": json_safe(
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
