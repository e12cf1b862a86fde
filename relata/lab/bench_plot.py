"""The benchmark's chart: latency and lag over time, phases shaded, and each process's RSS."""

from __future__ import annotations

from pathlib import Path

from relata.lab.bench_phases import PhaseResult
from relata.lab.bench_sampler import Sample
from relata.runtime.latency import LatencySeries


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
