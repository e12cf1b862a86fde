"""Supervision of the pipeline's processes: each `relata` sub-command in its own process group,
its output in a log file, killed with its parent and stopped as a group."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT_S = 20.0


class PipelineError(RuntimeError):
    """The pipeline could not be started, or one of its processes died."""


# The child asks the kernel for SIGKILL when its parent dies (even by SIGKILL), then checks
# that the parent is still the one that started it (it may have died before the prctl). Done
# after exec, in the child's own interpreter: a preexec_fn in a process that runs librdkafka
# threads is not fork-safe. SIGKILL, not SIGTERM: without its parent the broker is going too,
# and a Faust worker told to stop gracefully then waits forever for a commit to a dead broker.
_CHILD_BOOT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl({pdeathsig}, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != {parent}: sys.exit(1)\n"
    "os.nice({nice})\n"
    "from relata.cli.main import main\n"
    "main(prog_name='relata')\n"
)


@dataclass
class ManagedProcess:
    """A relata sub-command running in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_handle: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    def first_errors(self, limit: int = 40) -> str:
        """The first traceback or ERROR/CRITICAL lines of the log (the cause, not the teardown)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for index, line in enumerate(lines):
            if line.startswith("Traceback") or " ERROR " in line or " CRITICAL " in line:
                return "\n".join(lines[index : index + limit])
        return ""

    def check(self) -> None:
        """Raise PipelineError (with the first errors and the log tail) when it has exited."""
        code = self.popen.poll()
        if code is not None:
            msg = (
                f"{self.name} exited with status {code}; log {self.log_path}\n"
                f"first errors:\n{self.first_errors()}\nlog tail:\n{self.log_tail(1500)}"
            )
            raise PipelineError(msg)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `timeout_s`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("process did not stop name=%s pid=%d; killing", self.name, self.pid)
        # The group may hold children of the leader even after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self.log_handle.close()


def start_relata(
    name: str, args: list[str], *, env: dict[str, str], log_dir: Path, nice: int = 0
) -> ManagedProcess:
    """Start `relata ARGS` with this interpreter, in a new session (process group); `nice`
    lowers its CPU priority by that much (off-latency-path work on a small machine)."""
    log_path = log_dir / f"{name}.log"
    handle = log_path.open("wb")
    boot = _CHILD_BOOT.format(pdeathsig=_PR_SET_PDEATHSIG, parent=os.getpid(), nice=int(nice))
    cmd = [sys.executable, "-c", boot, *args]
    popen = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
    )
    logger.info("started name=%s pid=%d log=%s", name, popen.pid, log_path)
    return ManagedProcess(name, popen, log_path, handle)
