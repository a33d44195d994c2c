"""One batch job wherever it runs: executing it (``spinquant calibrate`` with its options), its summary row, and the
one-line progress of a batch. Shared by the local runner (spinquant.batch) and the Ray runner (spinquant.batch_ray)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from spinquant.errors import SpinQuantError
from spinquant.workflow import STAGES, STAGES_FILE, CalibrateOptions, _json, calibrate

PREFIX = "[spinquant batch]"


def job_name(job: dict[str, Any]) -> str:
    return Path(str(job["out"])).name


def is_finished(job: dict[str, Any]) -> bool:
    """Every stage of the job's run directory is recorded as finished and its report exists."""
    out = Path(job["out"])
    return all(s in _json(out / STAGES_FILE) for s in STAGES) and (out / "report.json").is_file()


def job_row(job: dict[str, Any], status: str, error: str | None, seconds: float, node: str | None) -> dict[str, Any]:
    """The summary row of a job: its status, one-line error, time, node, and the quality numbers of its report."""
    out = Path(job["out"])
    rep = _json(out / "report.json")
    ev = rep.get("evaluation") or {}
    size = next((b for f, b in (rep.get("sizes") or {}).items() if f in ("model.pte", "consolidated.00.pth")), None)
    return {"model": job["model"], "out": str(out), "status": status, "error": error, "node": node,
            "ppl_float": (ev.get("float") or {}).get("ppl"), "ppl_quantized": (ev.get("quantized") or {}).get("ppl"),
            "kl": (ev.get("quantized") or {}).get("kl"), "size_mib": size / 2**20 if size else None, "seconds": seconds}


def error_line(exc: BaseException) -> str:
    """One line for a failed job: our own errors as they are, anything else with its type."""
    msg = str(exc) if isinstance(exc, SpinQuantError) else f"{type(exc).__name__}: {exc}"
    return (msg.strip().splitlines() or [type(exc).__name__])[0]


def execute_job(job: dict[str, Any], node: str | None = None) -> dict[str, Any]:
    """Run one job: ``spinquant calibrate`` with its options, resuming whatever its run directory already holds.

    The one job-execution function of every runner (this process, a GPU-pinned process, a Ray worker). A job's
    own failure does not raise: it comes back as the row's ``status: failed`` with a one-line ``error``.
    Interrupts (^C, SIGTERM) do raise, so that the runner stops.
    """
    node = node or socket.gethostname()
    t = time.perf_counter()
    try:
        calibrate(CalibrateOptions.build(**job))
    except Exception as exc:  # a failed job must not stop the others
        return job_row(job, "failed", error_line(exc), time.perf_counter() - t, node)
    return job_row(job, "ok", None, time.perf_counter() - t, node)


class Progress:
    """One line on stderr per job state change: queued, running on NODE, finished in T, failed: reason."""

    def __init__(self, jobs: list[dict[str, Any]], echo: Callable[[str], None] | None = None) -> None:
        self.jobs = jobs
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()

    def say(self, i: int, state: str) -> None:
        with self._lock:
            self._echo(f"{PREFIX} job {i + 1}/{len(self.jobs)} {job_name(self.jobs[i])}: {state}")

    def result(self, i: int, row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            self.say(i, f"finished in {row['seconds']:.0f} s")
        else:
            self.say(i, f"{row['status']}: {row['error']}")
