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
MAX_DETAIL = 4000


def main(conn: Any, threads: int, nice: int) -> None:
    """Receive a `FitJob` on `conn`, run it, send the outcome back."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if nice:
        os.nice(nice)
    try:
        job = conn.recv()
        conn.send(("ok", run_job(job)))
    except Exception:
        # The traceback's end: where the fit failed, for the parent's log line.
        conn.send(("error", traceback.format_exc()[-MAX_DETAIL:]))
    finally:
        conn.close()


def run_job(job: Any) -> Any:
    """Run one `workers.fitting.refit.FitJob` (in whichever process the runner chose)."""
    from workers.fitting.history_log import histories_of
    from workers.fitting.procedure import fit

    return fit(
        histories_of(job.histories),
        job.items,
        evidence=job.evidence,
        current=job.current,
        k=job.k,
        candidates=job.candidates,
        mmr_lambda=job.mmr_lambda,
        user_encoder_step=job.user_encoder_step,
        learned_ranker=job.learned_ranker,
    )
