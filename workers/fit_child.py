"""The background fit's process (`workers.fitting.refit.ProcessRunner`): it lowers its CPU
priority and bounds its BLAS/OpenMP thread pools before anything numeric is imported (the
pools size themselves when their library loads), then runs the one job it is sent and answers
`("ok", FitResult)` or `("error", reason)`.

Only the standard library is imported at module level: the spawned interpreter imports this
module to find `main`, before the job (numpy arrays) is received.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main(conn: Any, threads: int, nice: int) -> None:
    """Receive a `FitJob` on `conn`, run it, send the outcome back."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if nice:
        os.nice(nice)
    try:
        job = conn.recv()
        from workers.fitting.refit import run_job

        conn.send(("ok", run_job(job)))
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        conn.send(("error", detail))
    finally:
        conn.close()
