"""The benchmark's report: its status lines, the workers' figures from their metrics, and the
resources of each process from the samples."""

from __future__ import annotations

import math
from typing import Any

import click

from relata.lab.bench_sampler import Sample


def say(text: str) -> None:
    click.echo(f"relata bench: {text}", err=True)


def json_safe(values: dict[str, float]) -> dict[str, float | None]:
    """NaN (no samples) as null, which JSON can hold."""
    return {k: None if math.isnan(v) else v for k, v in values.items()}


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
