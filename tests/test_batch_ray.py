"""``spinquant batch`` runners: Ray (a local instance and an existing cluster), GPU-pinned processes, shared paths.

The Ray tests start real Ray instances on this machine (2 CPUs) and run tiny-model jobs as the CLI would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from spinquant.batch import load_jobs, run_in_processes
from spinquant.batch_jobs import Progress, is_finished
from spinquant.cli import cli
from spinquant.errors import SpinQuantError
from tests.helpers import wait_for

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = {"steps": 2, "batch_size": 2, "seqlen": 64, "gptq_nsamples": 4, "eval_windows": 2}
VENV_BIN = Path(sys.executable).parent


def batch(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinquant", "batch", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def progress_lines(stderr: str, job: str) -> list[str]:
    return [line.split(f" {job}: ", 1)[1] for line in stderr.splitlines() if line.startswith("[spinquant batch]") and f" {job}: " in line]


@pytest.fixture()
def shared(tmp_path, tiny_model_dir, corpus_file) -> Path:
    """Storage every worker sees: two fine-tunes (copies of the tiny model) and the corpus."""
    for name in ("ft-a", "ft-b"):
        shutil.copytree(tiny_model_dir, tmp_path / "models" / name)
    shutil.copy(corpus_file, tmp_path / "corpus.txt")
    return tmp_path


def write_jobs(root: Path, jobs: list, **defaults) -> Path:
    doc = {"defaults": {"calib_data": "corpus.txt", "eval_data": "corpus.txt", "out_root": "runs", "shared_root": ".",
                        **TINY, **defaults}, "jobs": jobs}
    path = root / "jobs.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_ray_batch_runs_jobs_reports_the_failure_and_a_rerun_skips_finished_ones(shared):
    jobs = write_jobs(shared, [{"models_glob": "models/*"}, {"model": "./models/missing", "out": "missing"}])
    r = batch(jobs, "--ray", "--cpus-per-job", "1")
    assert r.returncode == 1, r.stderr
    rows = json.loads((shared / "jobs.summary.json").read_text())
    assert [row["status"] for row in rows] == ["ok", "ok", "failed"]
    assert "no such path" in rows[2]["error"] and "missing" in (shared / "jobs.summary.md").read_text()
    host = socket.gethostname()
    for name, row in zip(("ft-a", "ft-b"), rows):
        run = shared / "runs" / name
        assert is_finished({"out": str(run)}) and (run / "model.pte").is_file()
        verification = json.loads((run / "verification.json").read_text())
        metrics = verification["verification"]
        assert verification["verified"] is True and metrics["kl_ours_to_pte"] <= metrics["kl_bound"]
        assert row["node"].startswith(host) and row["ppl_quantized"] > 1 and row["kl"] is not None
        states = progress_lines(r.stderr, name)
        assert states[0] == "queued" and states[1].startswith(f"running on {host}") and re.fullmatch(r"finished in \d+ s", states[2]), states
        assert "[spinquant] stage export" in (shared / "runs" / f"{name}.log").read_text()  # the job's log, not the terminal
    assert progress_lines(r.stderr, "missing")[-1].startswith("failed: no such path")
    assert "[spinquant] stage" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 jobs failed")

    # rerun on an existing cluster (ray start --head, as a user's would be): finished jobs are skipped, not re-run
    port = free_port()
    head = subprocess.Popen([VENV_BIN / "ray", "start", "--head", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--block"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: can_connect(port), 60, "the Ray head")
        before = (shared / "runs" / "ft-a" / "stages.json").read_text()
        r = batch(jobs, "--ray", f"127.0.0.1:{port}", env={**ENV, "RAY_AUTH_MODE": "token"})
    finally:
        stop_group(head)
    assert r.returncode == 1, r.stderr
    rows = json.loads((shared / "jobs.summary.json").read_text())
    assert [row["status"] for row in rows] == ["skipped (finished)", "skipped (finished)", "failed"], rows
    assert (shared / "runs" / "ft-a" / "stages.json").read_text() == before
    assert progress_lines(r.stderr, "missing")[1].startswith(f"running on {socket.gethostname()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session and everything it started (Ray's head keeps some on SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)


def test_ray_job_whose_worker_is_killed_fails_and_resumes_on_the_next_run(shared):
    jobs = write_jobs(shared, [{"model": "models/ft-a", "out": "ft-a"}], pte=False, steps=300, batch_size=1, seqlen=32)
    out = shared / "runs" / "ft-a"
    proc = subprocess.Popen([sys.executable, "-m", "spinquant", "batch", str(jobs), "--ray", "--cpus-per-job", "1"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    for line in proc.stderr:
        m = re.search(r"ft-a: running on .*, pid (\d+)$", line.strip())
        if m:
            pid = int(m.group(1))
            break
    assert pid is not None, proc.communicate(timeout=60)
    wait_for(lambda: (out / "learn_state.pt").is_file(), 300, "the first saved learning state")
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    row = json.loads((shared / "jobs.summary.json").read_text())[0]
    assert row["status"] == "failed" and "worker died" in row["error"] and "re-run the batch" in row["error"], row
    assert not (out / "R.bin").exists() and (out / "learn_state.pt").is_file()

    r = batch(jobs, "--ray", "--cpus-per-job", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((shared / "jobs.summary.json").read_text())[0]["status"] == "ok"
    log = (shared / "runs" / "ft-a.log").read_text()
    assert re.search(r"stage learn: resumed from step [1-9]\d*", log), log[-2000:]
    assert is_finished({"out": str(out)}) and (out / "R.bin").is_file()


def test_gpu_pinned_runner_runs_jobs_in_parallel_processes_and_survives_a_killed_one(shared):
    """The multi-GPU local runner (here with two unpinned slots): one spawned process per job, the shared job function."""
    jobs = load_jobs(str(write_jobs(shared, [{"model": "models/ft-a", "out": "a", "steps": 400, "batch_size": 1, "seqlen": 32},
                                             {"model": "models/ft-b", "out": "b"}], pte=False)))
    lines: list[str] = []
    rows: list = [None, None]
    import threading

    def kill_a_when_it_learns() -> None:
        wait_for(lambda: any("job 1/2 a: running" in l for l in lines) and (Path(jobs[0]["out"]) / "learn_state.pt").is_file(),
                 300, "job a to save a learning state")
        pid = int(next(l for l in lines if "job 1/2 a: running" in l).rsplit("pid ", 1)[1])
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_when_it_learns)
    killer.start()
    run_in_processes(jobs, [0, 1], rows, Progress(jobs, lines.append), [None, None])
    killer.join()
    assert rows[0]["status"] == "failed" and "killed by signal 9" in rows[0]["error"], rows[0]
    assert rows[1]["status"] == "ok" and is_finished(jobs[1]), rows[1]
    assert any(l.endswith("a: failed: " + rows[0]["error"]) for l in lines)


def test_ray_paths_must_be_on_shared_storage(tmp_path, tiny_model_dir, corpus_file):
    (tmp_path / "ft").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "ft" / "a")
    shutil.copy(corpus_file, tmp_path / "corpus.txt")

    def jobs_with(defaults: dict, job: dict, shared: bool = True):
        p = tmp_path / "jobs.yaml"
        p.write_text(yaml.safe_dump({"defaults": defaults, "jobs": [job]}))
        return load_jobs(str(p), shared=shared)

    # without --ray, as before: paths beside the YAML
    assert jobs_with({}, {"model": "ft/a"}, shared=False)[0]["out"] == str(tmp_path / "runs" / "a")
    with pytest.raises(SpinQuantError, match="no out: and the YAML sets no out_root"):
        jobs_with({}, {"model": str(tmp_path / "ft" / "a")})
    with pytest.raises(SpinQuantError, match="'runs/a' is a relative path, and with --ray every worker must see it"):
        jobs_with({}, {"model": str(tmp_path / "ft" / "a"), "out": "runs/a"})
    # out_root declares shared storage for outputs: relative outs go there; an input beside the YAML is outside it
    job = jobs_with({"out_root": "/mnt/nfs/runs"}, {"model": str(tmp_path / "ft" / "a")})[0]
    assert job["out"] == "/mnt/nfs/runs/a"
    assert jobs_with({"out_root": "/mnt/nfs/runs"}, {"model": "meta-llama/Llama-3.2-1B", "out": "x"})[0]["out"] == "/mnt/nfs/runs/x"
    with pytest.raises(SpinQuantError, match="calib_data 'corpus.txt' resolves to .* outside the shared root /mnt/nfs/runs"):
        jobs_with({"out_root": "/mnt/nfs/runs", "calib_data": "corpus.txt"}, {"model": str(tmp_path / "ft" / "a")})
    with pytest.raises(SpinQuantError, match="model 'ft/\\*' resolves to .* outside the shared root"):
        jobs_with({"out_root": "/mnt/nfs/runs"}, {"models_glob": "ft/*"})
    # shared_root covers inputs beside the YAML
    job = jobs_with({"out_root": "runs", "shared_root": ".", "calib_data": "corpus.txt"}, {"models_glob": "ft/*"})[0]
    assert job["model"] == str(tmp_path / "ft" / "a") and job["out"] == str(tmp_path / "runs" / "a")
    assert job["calib_data"] == str(tmp_path / "corpus.txt")
    with pytest.raises(SpinQuantError, match="out_root and shared_root belong in defaults"):
        jobs_with({}, {"model": "ft/a", "out_root": "x"}, shared=False)
    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump({"jobs": [{"model": "ft/a", "out": "same"}, {"model": "ft/a", "out": "same"}]}))
    with pytest.raises(SpinQuantError, match="two jobs write the same run directory"):
        load_jobs(str(p))


def test_ray_address_and_install_errors_are_one_line(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"defaults": {"out_root": "runs"}, "jobs": [{"model": "meta-llama/Llama-3.2-1B"}]}))
    t = time.monotonic()
    r = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", f"127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and time.monotonic() - t < 30, r.output
    assert [l for l in r.output.splitlines() if l.startswith("error:")][0].startswith("error: no Ray cluster answers at 127.0.0.1:")
    r = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", "not-an-address"])
    assert r.exit_code == 2 and "is not an address" in r.output, r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    r = CliRunner().invoke(cli, ["batch", "--ray", str(jobs)])  # the file after --ray is the file, not an address
    assert r.exit_code == 2 and 'pip install "spinquant[ray]"' in r.output, r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "jobs.summary.json").exists()
