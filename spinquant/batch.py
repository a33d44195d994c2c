"""``spinquant batch``: many calibrate jobs from one YAML file, run on this machine or spread over a Ray cluster.

A job is a dict of :class:`spinquant.workflow.CalibrateOptions` fields with its paths resolved. One function runs
a job wherever it runs (:func:`execute_job`): in this process, in a process pinned to one of this machine's GPUs,
or in a Ray worker (spinquant.batch_ray, which only decides *where*). The run directory's stage record
(``stages.json``) is the only state: a finished job is skipped, an interrupted or killed one resumes from its last
finished stage on the next run, whichever runner ran it before.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from spinquant.atomic import write_text_atomic
from spinquant.batch_jobs import Progress, execute_job, is_finished, job_row
from spinquant.batch_ray import check_ray, run_on_ray
from spinquant.errors import SpinQuantError
from spinquant.recipes import RENAMED
from spinquant.workflow import RETIRED_VALUES, CalibrateOptions, yaml_value

PATH_OPTIONS = ("model", "out", "calib_data", "eval_data", "tokenizer", "calib", "recipe")
ROOT_KEYS = ("out_root", "shared_root")  # batch-level keys of ``defaults:``, not calibrate options


# --- the YAML file -----------------------------------------------------------------------------------


def _is_local_path(value: str, key: str, base: Path) -> bool:
    """Whether a relative YAML value names a local path (resolved against ``base``) rather than a hub id or a
    bundled set: ``out`` always; ``model``/data values only if they exist there or start with ./ or ../."""
    if Path(value).expanduser().is_absolute() or value == "wikitext2" or value.startswith("hub:"):
        return False
    if key in ("calib", "recipe") and not value.endswith((".yaml", ".yml")):  # a bundled set or shipped recipe
        return False
    return key == "out" or (base / value).exists() or value.startswith(("./", "../"))


class _Roots:
    """``defaults: {out_root: ..., shared_root: ...}``: where outputs go, and the storage every Ray worker sees."""

    def __init__(self, path: str, defaults: dict[str, Any], base: Path) -> None:
        self.base = base
        found: dict[str, Path | None] = {}
        for key in ROOT_KEYS:
            value = defaults.pop(key, None)
            if value is not None and not isinstance(value, str):
                raise SpinQuantError(f"{path}: {key} must be a string (a folder), got {value!r}")
            found[key] = (base / Path(value).expanduser()).resolve() if value else None
        self.out_root = found["out_root"]
        self.shared_root = found["shared_root"] or self.out_root

    def out_base(self) -> Path:
        """Folder that relative ``out`` values resolve against."""
        return self.out_root or self.base

    def default_out(self, name: str) -> Path:
        return (self.out_root or self.base / "runs") / name


def _check_shared(where: str, key: str, written: str, resolved: Path, roots: _Roots) -> None:
    """With --ray, a path written relative must resolve inside the declared shared storage."""
    fix = ("write an absolute path on storage every node mounts, or declare that storage in the YAML with "
           "defaults: {out_root: /shared/runs} (and shared_root: /shared for inputs outside out_root)")
    if roots.shared_root is None:
        raise SpinQuantError(f"{where}: {key} {written!r} is a relative path, and with --ray every worker must see it: {fix}")
    if not resolved.resolve().is_relative_to(roots.shared_root):
        raise SpinQuantError(f"{where}: {key} {written!r} resolves to {resolved}, outside the shared root "
                             f"{roots.shared_root}: {fix}")


def load_jobs(path: str, shared: bool = False) -> list[dict[str, Any]]:
    """Jobs of a batch YAML: ``defaults:`` (calibrate options, underscores, plus ``out_root``/``shared_root``)
    merged into each of ``jobs:`` (``{model, out, ...}``, or ``{models_glob, out}`` with ``{name}`` in ``out``
    standing for each match).

    Every value is checked against the option's type. Relative paths resolve against the YAML file's folder,
    except ``out``, which resolves against ``out_root`` when it is set (a job without ``out`` writes
    ``out_root/<model name>``, else ``runs/<model name>`` beside the YAML). With ``shared=True`` (``--ray``) a
    path written relative must resolve inside ``shared_root`` (default: ``out_root``), storage every worker sees.
    Two jobs may not write the same run directory.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpinQuantError(f"no such batch file: {path}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpinQuantError(f"invalid YAML in {path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SpinQuantError(f"{path} must be a mapping with a 'jobs:' list (and optional 'defaults:')")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SpinQuantError(f"{path}: 'defaults:' must be a mapping of calibrate options")
    defaults = dict(defaults)
    base = p.parent.absolute()
    roots = _Roots(path, defaults, base)
    valid = set(CalibrateOptions.names()) | {"models_glob"} | set(RENAMED) | set(RETIRED_VALUES)
    jobs: list[dict[str, Any]] = []
    for i, entry in enumerate(doc["jobs"]):
        where = f"{path}: job {i + 1}"
        if not isinstance(entry, dict):
            raise SpinQuantError(f"{where} is not a mapping")
        merged = {**defaults, **entry}
        unknown = sorted(set(merged) - valid)
        if unknown:
            hint = " (out_root and shared_root belong in defaults:)" if set(unknown) & set(ROOT_KEYS) else ""
            raise SpinQuantError(f"{path}: unknown option(s) {', '.join(unknown)} in job {i + 1}{hint}; options are calibrate's "
                                 f"flags with underscores: {', '.join(CalibrateOptions.names())}")
        relative: dict[str, str] = {}  # option -> the relative path as written (checked against shared storage)
        for key, value in merged.items():
            if key == "models_glob":
                if not isinstance(value, str):
                    raise SpinQuantError(f"{where}: models_glob must be a string (got {value!r})")
                continue
            merged[key] = value = yaml_value(key, value)
            CalibrateOptions.check_value(where, RENAMED.get(key, key), value)
            if key in PATH_OPTIONS and isinstance(value, str) and _is_local_path(value, key, base):
                relative[key] = value
                merged[key] = str((roots.out_base() if key == "out" else base) / Path(value).expanduser())
            elif key in PATH_OPTIONS and isinstance(value, list):  # eval_data: several texts, each resolved alike
                merged[key] = [str(base / Path(v).expanduser()) if isinstance(v, str) and _is_local_path(v, key, base)
                               else v for v in value]
                for v in value:
                    if isinstance(v, str) and _is_local_path(v, key, base) and shared:
                        _check_shared(where, key, v, (base / Path(v).expanduser()).resolve(), roots)
        expanded: list[dict[str, Any]] = []
        if "models_glob" in merged:
            pattern = merged.pop("models_glob")
            if not Path(pattern).is_absolute():
                relative["model"] = pattern
            full = pattern if Path(pattern).is_absolute() else str(base / pattern)
            matches = sorted(m for m in glob.glob(full) if Path(m).is_dir())
            if not matches:
                raise SpinQuantError(f"{where}: models_glob {pattern} matches no directory")
            template = str(merged.get("out", roots.default_out("{name}")))
            expanded = [{**merged, "model": m, "out": template.replace("{name}", Path(m).name)} for m in matches]
        elif "model" in merged:
            expanded = [{"out": str(roots.default_out(Path(str(merged["model"]).rstrip("/")).name)), **merged}]
        else:
            raise SpinQuantError(f"{where} names neither model nor models_glob")
        if shared and "out" not in merged and roots.out_root is None:
            raise SpinQuantError(f"{where} has no out: and the YAML sets no out_root, so it would write beside the YAML "
                                 f"file, which Ray workers may not see: give out: an absolute path on shared storage, or "
                                 f"set defaults: {{out_root: /shared/runs}}")
        for job in expanded:
            for key, written in relative.items() if shared else ():
                _check_shared(where, key, written, Path(job[key]), roots)
        jobs += expanded
    seen: dict[str, int] = {}
    for n, job in enumerate(jobs):
        out = str(Path(job["out"]).resolve())
        if out in seen:
            raise SpinQuantError(f"{path}: two jobs write the same run directory {job['out']} ({seen[out]} and {n + 1} in "
                                 f"the expanded job list): give each its own out:")
        seen[out] = n + 1
    return jobs


# --- runners ---------------------------------------------------------------------------------------------


def _run_here(jobs: list[dict[str, Any]], pending: list[int], rows: list, progress: Progress) -> None:
    """One job after another in this process (the stage logs go to the terminal)."""
    node = socket.gethostname()
    for i in pending:
        progress.say(i, f"running on {node}, pid {os.getpid()}")
        rows[i] = execute_job(jobs[i], node)
        progress.result(i, rows[i])


def _job_process(job: dict[str, Any], slot: str | None, conn) -> None:
    """Entry point of a spawned process: pin it to its GPU (before torch sees CUDA), run the job, send the row."""
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot
        if str(job.get("device", "auto")).startswith("cuda"):
            job = {**job, "device": "cuda"}
    conn.send(execute_job(job))
    conn.close()


def run_in_processes(jobs: list[dict[str, Any]], pending: list[int], rows: list, progress: Progress,
                     slots: list[str | None]) -> None:
    """Jobs in parallel, one spawned process per job and at most one job per slot (a GPU index, or None for no
    pinning). A process that dies (killed, out of memory) fails its job only."""
    ctx = multiprocessing.get_context("spawn")
    free: queue.Queue = queue.Queue()
    for s in slots:
        free.put(s)
    node = socket.gethostname()

    def one(i: int) -> None:
        slot = free.get()
        try:
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_job_process, args=(jobs[i], slot, send))
            t = time.perf_counter()
            proc.start()
            send.close()
            progress.say(i, f"running on {node}" + (f" GPU {slot}" if slot is not None else "") + f", pid {proc.pid}")
            try:
                rows[i] = receive.recv()
            except EOFError:  # died without a word
                rows[i] = None
            proc.join()
            if rows[i] is None:
                how = f"killed by signal {-proc.exitcode}" if (proc.exitcode or 0) < 0 else f"exit status {proc.exitcode}"
                rows[i] = job_row(jobs[i], "failed", f"the job's process died ({how}): re-run the batch to resume it",
                                  time.perf_counter() - t, node)
            progress.result(i, rows[i])
        finally:
            free.put(slot)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in pending]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_batch(path: str, ray_address: str | None = None, cpus_per_job: int = 2,
              echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every job of a batch file, skipping finished ones and continuing past failures; one row per job.

    ``ray_address`` (``local``, ``auto``, ``host:port``, ``ray://host:port``) runs the jobs as Ray tasks
    (spinquant.batch_ray); otherwise here: one after another, or with several CUDA devices one job per GPU.
    """
    jobs = load_jobs(path, shared=ray_address is not None)
    if ray_address is not None:
        check_ray(ray_address)  # Ray installed, the address answers: before any job line
    progress = Progress(jobs, echo)
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    pending = []
    for i, job in enumerate(jobs):
        if is_finished(job):
            rows[i] = job_row(job, "skipped (finished)", None, 0.0, None)
            progress.say(i, "skipped (finished)")
        else:
            pending.append(i)
    if ray_address is not None:
        run_on_ray(jobs, pending, rows, progress, ray_address, cpus_per_job)
    else:
        for i in pending:
            progress.say(i, "queued")
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus > 1 and len(pending) > 1:
            run_in_processes(jobs, pending, rows, progress, [str(g) for g in range(n_gpus)])
        else:
            _run_here(jobs, pending, rows, progress)
    return [r for r in rows if r is not None]


# --- summary -----------------------------------------------------------------------------------------------


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown summary of a batch (JOBS.summary.md)."""

    def f(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| model | status | error | node | PPL float | PPL quantized | KL | size (MiB) | time (s) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['status']} | {r['error'] or ''} | {r.get('node') or ''} | {f(r['ppl_float'], '.3f')} | "
                     f"{f(r['ppl_quantized'], '.3f')} | {f(r['kl'], '.4f')} | {f(r['size_mib'], '.1f')} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_summary(path: str, rows: list[dict[str, Any]]) -> str:
    """Write JOBS.summary.md and JOBS.summary.json beside the batch file; returns the table."""

    table = summary_table(rows)
    base = Path(path).with_suffix("")
    write_text_atomic(base.parent / f"{base.name}.summary.md", table + "\n")
    write_text_atomic(base.parent / f"{base.name}.summary.json", json.dumps(rows, indent=2))
    return table
