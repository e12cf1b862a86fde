"""What the micro-benchmarks in scripts/ share: their command line and a timing wrapper."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def data_and_counts(*defaults: int) -> tuple[Path, list[int]]:
    """`[DATA_DIR] [N ...]` from the command line: the data set (online-retail by default) and
    one integer per default."""
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/online-retail")
    given = sys.argv[2:]
    return data_dir, [int(given[i]) if i < len(given) else d for i, d in enumerate(defaults)]


def timed(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[float]]:
    """`fn` wrapped to add the seconds of each call to the returned one-element list."""
    spent = [0.0]

    def wrapper(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent[0] += time.perf_counter() - started

    return wrapper, spent
