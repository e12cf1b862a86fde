"""Data sets of the offline evaluation: a directory with `items.jsonl[.gz]` and
`events.jsonl[.gz]`, read into the live message models."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from schemas.messages import BehaviorEvent, CatalogItem, EventType

logger = logging.getLogger(__name__)

POSITIVE_ORDER: tuple[EventType, ...] = ("purchase", "add_to_cart", "click")


class EvaluationError(click.ClickException):
    """A data set or artifact cannot be evaluated (missing files, no usable users)."""


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise EvaluationError(f"{data_dir} has no {stem}.jsonl[.gz]")


def load_items(data_dir: Path) -> list[CatalogItem]:
    return [CatalogItem.model_validate(row) for row in read_jsonl(_find(data_dir, "items"))]


def load_events(data_dir: Path) -> list[BehaviorEvent]:
    """All events, sorted by time (stable), invalid lines skipped with a count."""
    events: list[BehaviorEvent] = []
    bad = 0
    for row in read_jsonl(_find(data_dir, "events")):
        try:
            events.append(BehaviorEvent.model_validate(row))
        except ValueError:
            bad += 1
    if bad:
        logger.warning("skipped invalid events count=%d", bad)
    events.sort(key=lambda e: e.ts)
    return events


def positive_type(events: Sequence[BehaviorEvent]) -> EventType:
    """The strongest positive event type present: purchase, else add_to_cart, else click."""
    present = {e.event_type for e in events}
    for t in POSITIVE_ORDER:
        if t in present:
            return t
    raise EvaluationError(f"no positive events ({', '.join(POSITIVE_ORDER)}) in the data set")
