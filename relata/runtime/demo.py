"""`relata demo`: the whole pipeline on embedded Kafka and Qdrant, on a shipped data set.

Loads the catalog, replays N real events (plus a few deliberately invalid ones that must end
in `dead-letter`), shows throughput, latency, the live hit rate of the live recommender and of
a shadow one (another configuration, `--shadow`, on the same traffic) and the latest explained
recommendations while it runs, and stops once the pipeline has drained. With `--json` the last
stdout line is one JSON object with the totals; everything else goes to stderr.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.pipeline import DEFAULT_DATA, Pipeline, PipelineOptions, pipeline_partitions
from relata.runtime.replay import ReplayProgress, iter_jsonl
from schemas.quality_settings import ShadowSettings
from schemas.settings import KafkaSettings

DISPLAY_EVERY_S = 1.0
SHOW_RECOMMENDATIONS_EVERY_S = 5.0
# The shadow the demo judges beside the live recommender: similarity alone, without the
# behaviour evidence the live one blends in (learnt from the replay itself, so it starts cold).
DEFAULT_SHADOW = '{"strategy": "vector"}'


def invalid_events(count: int) -> list[tuple[str, bytes]]:
    """`count` invalid event lines cycling through the dead-letter error types they cause."""
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    templates: list[tuple[str, bytes]] = [
        ("malformed_json", b'{"event_id": "bad-json-%d", "user_id": "demo-bad"'),
        (
            "unknown_event_type",
            b'{"event_id": "bad-type-%d", "user_id": "demo-bad", "item_id": "22752", '
            b'"event_type": "teleport", "ts": "2011-01-01T00:00:00Z"}',
        ),
        (
            "invalid_fields",
            b'{"event_id": "bad-fields-%d", "user_id": "demo-bad", "event_type": "view", '
            b'"ts": "2011-01-01T00:00:00Z"}',
        ),
        (
            "implausible_timestamp",
            b'{"event_id": "bad-ts-%d", "user_id": "demo-bad", "item_id": "22752", '
            b'"event_type": "view", "ts": "' + future.encode() + b'"}',
        ),
    ]
    out = []
    for n in range(count):
        error_type, template = templates[n % len(templates)]
        out.append((error_type, template % n if b"%d" in template else template))
    return out


def mixed_lines(
    path: Path, *, events: int, invalid: list[tuple[str, bytes]]
) -> Iterator[tuple[int, bytes]]:
    """The first `events` lines of `path`, with the `invalid` lines spread evenly among them."""
    every = max(1, events // (len(invalid) + 1)) if invalid else 0
    pending = [raw for _, raw in invalid]
    for n, (number, raw) in enumerate(itertools.islice(iter_jsonl(path), events), start=1):
        yield number, raw
        if pending and every and n % every == 0:
            yield -1, pending.pop(0)
    for raw in pending:
        yield -1, raw


def load_titles(data_dir: Path) -> dict[str, str]:
    titles = {}
    with gzip.open(data_dir / "items.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            item = json.loads(line)
            titles[item["item_id"]] = item.get("title") or item["item_id"]
    return titles


class Display:
    """Human-readable progress on stderr: rates, dead letters, latency, sample recommendations."""

    def __init__(self, pipeline: Pipeline, titles: dict[str, str]) -> None:
        self.pipeline = pipeline
        self.titles = titles
        self.started = time.monotonic()
        self._last = 0.0
        self._last_recs_shown = time.monotonic()
        self._prev: tuple[float, int, int] = (time.monotonic(), 0, 0)
        self.sent = 0

    def on_progress(self, progress: ReplayProgress) -> None:
        self.sent = progress.sent
        self.tick()

    def tick(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < DISPLAY_EVERY_S:
            return
        self._last = now
        probe = self.pipeline.probe
        assert probe is not None
        then, sent_then, recs_then = self._prev
        span = max(now - then, 1e-6)
        recs = probe.stats.recommendations
        events_rate = (self.sent - sent_then) / span
        recs_rate = (recs - recs_then) / span
        self._prev = (now, self.sent, recs)
        latency = probe.measured.summary(since=time.time() - 10)
        dead = sum(probe.stats.dead_letters.values())
        try:
            lag = sum(self.pipeline.lags().values())
        except Exception:  # the display must not end the demo over a metadata timeout
            lag = -1
        click.echo(
            f"[{now - self.started:6.1f}s] events {self.sent:>7} ({events_rate:6.0f}/s)  "
            f"recommendations {recs:>7} ({recs_rate:6.0f}/s)  dead letters {dead:>4}  lag {lag:>5}  "
            f"latency p50 {latency['p50']:7.1f} ms  p99 {latency['p99']:7.1f} ms (last 10 s)"
            + hit_rates(self.pipeline.live_quality()),
            err=True,
        )
        if force or now - self._last_recs_shown >= SHOW_RECOMMENDATIONS_EVERY_S:
            self._last_recs_shown = now
            self.show_recommendations()

    def show_recommendations(self, users: int = 3, items: int = 3) -> None:
        probe = self.pipeline.probe
        assert probe is not None
        shown: list[str] = []
        for user in reversed(list(probe.recent_users)):
            if user not in shown:
                shown.append(user)
            if len(shown) == users:
                break
        for user in shown:
            rec = probe.latest.get(user)
            if not rec:
                continue
            click.echo(
                f"  user {user} ({rec.get('strategy', '?')}, {rec.get('latency_ms', 0):.0f} ms):",
                err=True,
            )
            for entry in rec.get("items", [])[:items]:
                title = self.titles.get(entry["item_id"], entry["item_id"])
                reasons = "; ".join(self._reason(r) for r in entry.get("reasons", [])[:2])
                click.echo(f"    {title} [{entry['score']:.2f}] because {reasons}", err=True)

    def _reason(self, reason: dict[str, Any]) -> str:
        # The text names its source item already; repeating it here read twice.
        return str(reason.get("text") or reason.get("kind"))


def hit_rates(quality: dict[str, dict[str, float | None]]) -> str:
    """`  hit rate live 23.1% (412) shadow 14.2% (412)`: each variant's hit rate so far and
    the actions it was judged on; "" without live quality."""
    parts = []
    for variant, figures in quality.items():
        rate, judged = figures["hit_rate"], figures["judged"] or 0
        parts.append(f"{variant} {'-' if rate is None else f'{rate:.1%}'} ({judged:.0f})")
    return f"  hit rate {' '.join(parts)}" if parts else ""


def json_safe(summary: dict[str, float]) -> dict[str, float | None]:
    """NaN (no samples) as null, so that the output stays strict JSON."""
    return {k: None if math.isnan(v) else v for k, v in summary.items()}


def summary(pipeline: Pipeline, sent: int) -> dict[str, Any]:
    """The totals: events sent, recommendations, dead letters, latency percentiles, and per
    variant (live, shadow) the actions judged, hits, hit rate and mean NDCG."""
    probe = pipeline.probe
    assert probe is not None
    measured = probe.measured.summary()
    return {
        "events": sent,
        "recommendations": probe.stats.recommendations,
        "dead_letter": sum(probe.stats.dead_letters.values()),
        "dead_letter_by_type": dict(sorted(probe.stats.dead_letters.items())),
        "latency_ms": json_safe(measured),
        "reported_latency_ms": json_safe(probe.reported.summary()),
        "live_quality": pipeline.live_quality(),
        "shadow_overrides": pipeline.options.shadow_overrides,
    }


@click.command(name="demo")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=DEFAULT_DATA,
    show_default=True,
    envvar="RELATA_DEMO_DATA",
    show_envvar=True,
    help="Data set directory (items.jsonl.gz, events.jsonl.gz).",
)
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    envvar="RELATA_DEMO_EVENTS",
    show_envvar=True,
    help="Real events to replay.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=80.0,
    show_default=True,
    envvar="RELATA_DEMO_RATE",
    show_envvar=True,
    help="Offered rate in events/s (0 = as fast as possible).",
)
@click.option(
    "--inject-invalid",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    envvar="RELATA_DEMO_INJECT_INVALID",
    show_envvar=True,
    help="Invalid events mixed into the replay, to show the dead-letter path.",
)
@click.option(
    "--shadow",
    default=DEFAULT_SHADOW,
    show_default=True,
    envvar="RELATA_DEMO_SHADOW",
    show_envvar=True,
    help=(
        "The shadow recommender's settings (RELATA_SHADOW_OVERRIDES, JSON), judged beside the "
        "live one; an empty string runs none."
    ),
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of totals on stdout.")
@settings_options(KafkaSettings, group="kafka")
def command(
    data_dir: Path,
    events: int,
    rate: float,
    inject_invalid: int,
    shadow: str,
    as_json: bool,
    **params: Any,
) -> None:
    """Run the whole pipeline on embedded Kafka and Qdrant, on real data, and show it working.

    Uses an external Kafka when RELATA_KAFKA_BOOTSTRAP_SERVERS (or --kafka-bootstrap-servers)
    is given; topics and groups get a run-unique prefix.
    """
    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    try:
        overrides = ShadowSettings(overrides=shadow).overrides if shadow.strip() else None
    except ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="--shadow") from exc
    options = PipelineOptions(
        data_dir=data_dir,
        kafka=kafka,
        partitions=pipeline_partitions(kafka),
        shadow_overrides=overrides,
        quality=True,
    )
    titles = load_titles(data_dir)
    sent = 0
    interrupted = failed = False
    pipeline = Pipeline(options)
    try:
        pipeline.start(status=lambda text: click.echo(f"relata demo: {text}", err=True))
        display = Display(pipeline, titles)
        lines = mixed_lines(
            pipeline.events_path, events=events, invalid=invalid_events(inject_invalid)
        )
        click.echo(
            f"relata demo: replaying {events} events (+{inject_invalid} invalid) at "
            f"{rate:.0f}/s from {pipeline.events_path}",
            err=True,
        )
        try:
            progress = pipeline.replay(
                rate=rate, limit=None, on_progress=display.on_progress, lines=lines
            )
            sent = progress.sent
            display.sent = sent
            click.echo("relata demo: replay done; waiting for the pipeline to drain", err=True)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if pipeline.wait_drained(timeout_s=DISPLAY_EVERY_S * 2):
                    break
                display.tick()
            else:
                click.echo("relata demo: pipeline did not drain within 180 s", err=True)
        except KeyboardInterrupt:
            interrupted = True
            sent = display.sent
            click.echo("relata demo: interrupted; stopping", err=True)
        display.tick(force=True)
        totals = summary(pipeline, sent)
    except Exception:
        failed = True
        raise
    finally:
        pipeline.close(keep_logs=failed)
    latency = totals["latency_ms"]
    click.echo(
        f"relata demo: {totals['events']} events -> {totals['recommendations']} recommendations, "
        f"{totals['dead_letter']} dead letters {totals['dead_letter_by_type']}; "
        f"latency p50 {latency['p50']} ms, p99 {latency['p99']} ms;"
        + (hit_rates(totals["live_quality"]) or " no live quality")
        + (f" (shadow: {json.dumps(overrides)})" if overrides is not None else ""),
        err=True,
    )
    if as_json:
        sys.stdout.write(json.dumps(totals) + "\n")
        sys.stdout.flush()
    if interrupted:
        sys.exit(130)
