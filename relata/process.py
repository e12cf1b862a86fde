"""Process plumbing shared by the long-running commands."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType


def stop_on_signals(stop: threading.Event, *, log: logging.Logger | None = None) -> None:
    """Make SIGTERM and SIGINT set `stop` (a graceful stop) instead of killing the process.

    Call from the main thread. With `log`, each signal is logged as `stopping signal=NAME`.
    """

    def _request_stop(signum: int, _frame: FrameType | None) -> None:
        if log is not None:
            log.info("stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
