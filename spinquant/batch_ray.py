"""``spinquant batch --ray``: the batch's jobs as Ray tasks, one GPU per CUDA job, N CPUs per CPU job.

Ray decides only *where* a job runs; what runs is :func:`spinquant.batch.execute_job`, the local runner's
function, so a job's run directory is the same wherever it ran, and a job that failed on the cluster resumes
from its last finished stage on the next run (here or there). Needs the optional extra
``pip install "spinquant[ray]"`` on the machine that submits and on every node (same spinquant version).

Each Ray task writes its stage log to ``<out>.log`` beside its run directory (appended, so a rerun keeps the
earlier log); the terminal shows one line per job state change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from spinquant.batch_jobs import Progress, error_line, execute_job, job_row
from spinquant.errors import SpinQuantError

# environment a worker needs to behave like this machine (hub access/offline mode, our cache)
FORWARDED_ENV = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "SPINQUANT_", "TOKENIZERS_PARALLELISM")


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise SpinQuantError('--ray needs Ray: pip install "spinquant[ray]" (on this machine and every node)') from exc
    return ray


def check_ray(address: str, timeout_s: float = 5.0) -> None:
    """Ray is installed, and something listens at ``host:port``: fail in seconds, with the fix, when not (Ray itself
    retries for minutes)."""
    _import_ray()
    if address in ("local", "auto"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpinQuantError(f"--ray {address!r} is not an address: use auto, host:port or ray://host:port (or --ray alone "
                             f"for a local instance)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SpinQuantError(f"no Ray cluster answers at {hostport} ({exc.strerror or exc}): start one there with "
                             f"`ray start --head --port {port}`, check the address, or pass --ray alone for a local "
                             f"instance") from exc


def connect(address: str):
    """Start a local Ray instance (``local``) or join an existing cluster (``auto``, ``host:port``,
    ``ray://host:port``); returns the ray module."""
    ray = _import_ray()  # check_ray(address) ran before any job line (run_batch)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # Ray's C++ retry warnings are not our users' output
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR, "runtime_env": {"env_vars": env}}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, grpc errors: all mean "no cluster there"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        auth = ("; if the cluster uses token authentication (Ray's default for `ray start` since 2.59), set "
                "RAY_AUTH_MODE=token here, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                if address != "local" and os.environ.get("RAY_AUTH_MODE") != "token" else "")
        raise SpinQuantError(f"cannot start or reach Ray at {address!r}: {first} (start a cluster with `ray start --head`, "
                             f"or pass --ray without an address for a local instance{auth})") from exc
    return ray


def _node_capacity(ray) -> tuple[float, float]:
    """The most CPUs and the most GPUs that any one alive node offers."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    gpus = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    return cpus, gpus


def wants_gpu(job: dict[str, Any], cluster_has_gpu: bool) -> bool:
    """A job runs on a GPU when its device says cuda, or says auto and the cluster has GPUs."""
    device = str(job.get("device", "auto"))
    return device.startswith("cuda") or (device == "auto" and cluster_has_gpu)


def _job_task(job: dict[str, Any], index: int, events, use_gpu: bool, n_cpus: int) -> dict[str, Any]:
    """Body of a job's Ray task: announce where it runs, then run it with the local runner's function."""
    import ray
    import torch

    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    if use_gpu:  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU: it is cuda:0 here
        job = {**job, "device": "cuda"}
        where = f"{node} GPU {','.join(str(g) for g in ray.get_gpu_ids())}"
    else:
        job = {**job, "device": "cpu"}
        torch.set_num_threads(n_cpus)
        where = f"{node}, {n_cpus} CPU" + ("s" if n_cpus > 1 else "")
    events.put((index, node, where, os.getpid()))
    log = Path(f"{job['out']}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stderr(f):
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} spinquant batch job on {where}, pid {os.getpid()}\n")
        f.flush()
        return execute_job(job, node)


def _crash_reason(ray, exc: BaseException) -> str:
    """One line for a task that did not return: its worker died, was killed for memory, or was cancelled."""
    ex = ray.exceptions
    if isinstance(exc, getattr(ex, "OutOfMemoryError", ())):
        what = "killed by Ray's memory monitor (out of memory)"
    elif isinstance(exc, ex.WorkerCrashedError):
        what = "its worker died (killed, or out of memory)"
    elif isinstance(exc, ex.TaskCancelledError):
        what = "cancelled"
    elif isinstance(exc, getattr(ex, "NodeDiedError", ())):
        what = "its node died"
    else:
        what = error_line(exc)
    return f"{what}; re-run the batch to resume it from its last finished stage"


def run_on_ray(jobs: list[dict[str, Any]], pending: list[int], rows: list, progress: Progress, address: str,
               cpus_per_job: int) -> None:
    """Submit the pending jobs as Ray tasks and fill ``rows`` as they end. Tasks are not retried by Ray: a killed
    job is reported failed and resumes on the next run. On ^C/SIGTERM the tasks are cancelled (their workers
    killed) before the interrupt goes on; what each job finished is kept."""
    if cpus_per_job < 1:
        raise SpinQuantError(f"--cpus-per-job must be at least 1 (got {cpus_per_job})")
    ray = connect(address)
    try:
        from ray.util.queue import Empty, Queue

        max_cpus, max_gpus = _node_capacity(ray)
        use_gpu = {i: wants_gpu(jobs[i], max_gpus >= 1) for i in pending}
        for i in pending:
            if use_gpu[i] and max_gpus < 1:
                raise SpinQuantError(f"job {i + 1} ({jobs[i]['model']}) asks for device {jobs[i].get('device')} and no node of "
                                     f"the Ray cluster has a GPU: set device: cpu or auto")
        if any(not g for g in use_gpu.values()) and max_cpus < cpus_per_job:
            raise SpinQuantError(f"--cpus-per-job {cpus_per_job} but no node of the Ray cluster has more than {max_cpus:g} "
                                 f"CPUs: lower --cpus-per-job")
        events = Queue()
        task = ray.remote(_job_task)
        refs: dict[Any, int] = {}
        started: dict[int, tuple[str, float]] = {}
        for i in pending:
            opts = {"num_gpus": 1, "num_cpus": 1} if use_gpu[i] else {"num_cpus": cpus_per_job}
            refs[task.options(max_retries=0, **opts).remote(jobs[i], i, events, use_gpu[i], cpus_per_job)] = i
            progress.say(i, "queued")

        def drain() -> None:
            while True:
                try:
                    i, node, where, pid = events.get_nowait()
                except Empty:
                    return
                started[i] = (node, time.perf_counter())
                progress.say(i, f"running on {where}, pid {pid}")

        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                drain()
                for ref in ready:
                    i = refs.pop(ref)
                    try:
                        rows[i] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        node, t0 = started.get(i, (None, time.perf_counter()))
                        rows[i] = job_row(jobs[i], "failed", _crash_reason(ray, exc), time.perf_counter() - t0, node)
                    progress.result(i, rows[i])
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()
