import gc
import logging
import os
import signal
import threading

import pytest

from relata.runtime.process import freeze_startup_heap, stop_on_signals


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_stop_event_and_is_logged(
    signum: signal.Signals, restore_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    log = logging.getLogger("relata.test_process")
    stop_on_signals(stop, log=log)
    with caplog.at_level(logging.INFO, logger=log.name):
        os.kill(os.getpid(), signum)  # handled in the main thread before kill() returns
    assert stop.is_set()
    assert f"stopping signal={signum.name}" in caplog.text


def test_without_a_logger_nothing_is_logged(
    restore_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    stop_on_signals(stop)
    with caplog.at_level(logging.DEBUG):
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.is_set()
    assert "stopping signal" not in caplog.text


def test_freeze_startup_heap_takes_live_objects_out_of_collections() -> None:
    startup_state = {"model": ["weights"]}
    try:
        frozen = freeze_startup_heap()
        # Frozen objects are still freed when their last reference goes (another thread may
        # drop some in between): the count can only have shrunk since.
        assert 0 < gc.get_freeze_count() <= frozen
        # Full collections no longer scan what was alive at startup...
        assert not any(obj is startup_state for obj in gc.get_objects())
        # ...but still scan (and free) what the process creates afterwards.
        later = {"profile": ["item"]}
        assert any(obj is later for obj in gc.get_objects())
    finally:
        gc.unfreeze()
