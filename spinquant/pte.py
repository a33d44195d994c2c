"""Driving executorch: its own ``export_llama`` (unmodified, as a subprocess) and its runtime.

The ``.pte`` is produced exactly as a user would produce it by hand from our checkpoint:
``python -m executorch.examples.models.llama.export_llama --preq_mode ... --use_spin_quant native`` (``--use_qat``
instead for a checkpoint without the online R4).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from spinquant.errors import SpinQuantError

DEFAULT_MAX_SEQ_LEN = 2048
RUNTIME_FLAGS = {"xnnpack": ["-X", "--xnnpack-extended-ops"]}  # export_llama's flags for each ExecuTorch backend


def export_command(ckpt: Path, params: Path, out_pte: Path, mode: str, group_size: int, spin: bool, bos: int | None,
                   eos: list[int], max_seq_len: int, full_logits: bool, runtime: str = "xnnpack",
                   model: str = "llama3_2") -> list[str]:
    """export_llama's command line; ``model``: its --model (the family's, Architecture.executorch_model)."""
    cmd = [sys.executable, "-m", "executorch.examples.models.llama.export_llama", "--model", model,
           "--checkpoint", str(ckpt), "--params", str(params), "-d", "fp32", *RUNTIME_FLAGS[runtime], "-kv",
           "--use_sdpa_with_kv_cache", "--preq_mode", mode, "--preq_group_size", str(group_size),
           "--preq_embedding_quantize", "8,0", "--max_seq_length", str(max_seq_len), "--max_context_length",
           str(max_seq_len), "--output_name", str(out_pte)]
    # the loader converts its linears to the pre-quantized modules only under --use_spin_quant or --use_qat; without
    # either it tries to load int8 into float parameters and fails. --use_spin_quant native also inserts the online
    # R4 Hadamard; a checkpoint without R4 (rotations none, or --r4 off) takes the same pre-quantized path via --use_qat
    cmd += ["--use_spin_quant", "native"] if spin else ["--use_qat"]
    if full_logits:
        cmd += ["--generate_full_logits"]
    meta = {"get_eos_ids": eos}
    if bos is not None:
        meta["get_bos_id"] = bos
    cmd += ["--metadata", json.dumps(meta)]
    return cmd


def run_export_llama(ckpt_dir: Path, out_pte: Path, mode: str, group_size: int, spin: bool, bos: int | None,
                     eos: list[int], max_seq_len: int = DEFAULT_MAX_SEQ_LEN, full_logits: bool = False,
                     log_file: Path | None = None, runtime: str = "xnnpack", model: str = "llama3_2") -> dict[str, Any]:
    """Run executorch's export_llama on ``ckpt_dir``'s checkpoint; write the .pte to ``out_pte``.

    The checkpoint is first linked into a fresh temp folder whose path holds neither "int8" nor
    "8da4w" (either string switches executorch's loader to another, broken, branch).
    """
    try:
        import executorch  # noqa: F401
    except ImportError as exc:
        raise SpinQuantError("the .pte export needs executorch: pip install 'executorch==1.5.1' (or pass --no-pte)") from exc
    work = Path(tempfile.mkdtemp(prefix="spinquant-export-"))
    try:
        for name in ("consolidated.00.pth", "params.json"):
            os.symlink((ckpt_dir / name).resolve(), work / name)
        cmd = export_command(work / "consolidated.00.pth", work / "params.json", work / "model.pte", mode, group_size,
                             spin, bos, eos, max_seq_len, full_logits, runtime, model)
        t = time.perf_counter()
        print(f"[spinquant] running executorch's export_llama (minutes; log: {log_file or 'not kept'}) ...", file=sys.stderr, flush=True)
        with tqdm(desc="export_llama", bar_format="{desc}: {elapsed} elapsed", file=sys.stderr) as clock:
            proc = run_child(cmd, cwd=work, tick=clock.refresh)
        seconds = time.perf_counter() - t
        if log_file is not None:
            log_file.write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0 or not (work / "model.pte").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SpinQuantError(f"executorch's export_llama failed (exit {proc.returncode}): {tail[0]}"
                                 + (f"; full log in {log_file}" if log_file else ""))
        shutil.move(str(work / "model.pte"), out_pte)
        return {"seconds": seconds, "command": " ".join(cmd[1:])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec (Linux): the kernel sends it SIGKILL when its parent dies, even by SIGKILL or the OOM
    killer (a killed batch worker), which no exception handler of ours can see."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


TICK_SECONDS = 5.0


def run_child(cmd: list[str], cwd: Path, tick: Callable[[], Any] | None = None) -> subprocess.CompletedProcess:
    """Run a child in its own process group, output captured, calling ``tick()`` every TICK_SECONDS while it runs (the
    exporter is silent for minutes: the caller shows the elapsed time); if we are interrupted (SIGINT, or SIGTERM turned
    into the CLI's Terminated exception) the whole group is killed before the exception goes on, so no exporter keeps
    running behind us. (subprocess.run kills only the direct child, and only on SIGINT.) If we are killed outright, the
    kernel kills the child (:func:`_die_with_parent`)."""
    import signal

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=TICK_SECONDS if tick is not None else None)
                break
            except subprocess.TimeoutExpired:  # retrying communicate() loses no output (subprocess docs)
                tick()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while C++ libraries print to it (Python exceptions still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class PteModel:
    """A .pte as a LogitsFn: ids (1, T) -> logits (1, T, vocab), through executorch's runtime.

    Works for both export flavours: with full logits one call per window (T <= max_seq_len - 1), else
    one token per call through the KV cache (the on-device decode path), position by position.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama::fast_hadamard_transform, sdpa
            import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed::embedding_byte
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise SpinQuantError("running a .pte needs executorch: pip install 'executorch==1.5.1'") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise SpinQuantError(f"no such .pte file: {self.path}")
        try:
            with native_stderr_silenced():  # the runtime's cpuinfo notes ("# of cpus dont match") are not for users
                program = Runtime.get().load_program(self.path)
                self.method = program.load_method("forward")
        except Exception as exc:
            raise SpinQuantError(f"executorch cannot load {self.path}: {exc}") from exc
        probe = self._call(torch.zeros(1, 2, dtype=torch.long), 0)
        self.full_logits = probe.dim() == 3 and probe.shape[1] == 2
        self.vocab_size = probe.shape[-1]

    def _call(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self.method.execute([tokens, torch.tensor([pos], dtype=torch.long)])[0]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(1, -1).long()
        if self.full_logits:
            return self._call(ids, 0).reshape(1, ids.shape[1], -1).clone()
        steps = [self._call(ids[:, t : t + 1], t).reshape(1, 1, -1).clone() for t in range(ids.shape[1])]
        return torch.cat(steps, dim=1)
