"""GPTQ's finished decoder layers on disk, so that a quantize run killed half way resumes after its last finished
layer instead of starting over (hours at 3B on a CPU).

A progress folder (made, used and removed by spinquant only; :func:`default_folder` names it beside the output)::

    progress.json              {"spinquant_layer_progress": 1, "identity": {...}, "layers_done": k,
                                "output_error": {linear name: {...}}}
    layer_000.safetensors      decoder layer 0's quantized linears: "<name>.qweight" int8 (out, in) and
    ...                        "<name>.scales" float32 (out, in/g), names relative to the layer (self_attn.q_proj)

Every file is written under a temp name and renamed, and ``progress.json`` is rewritten only after the layer's file
is in place, so a kill at any moment leaves k or k + 1 layers announced, each complete. The folder is made when the
first layer is finished (a run refused before that leaves nothing). It belongs to one run identity
(pipeline.quantize_identity: model, rotations, scheme, calibration, every option, plus :func:`source_fingerprint`:
the model files' sizes and modification times, so a model rewritten in place is not resumed from its old layers): a
folder left by a run with another identity is cleared and started again; a folder that is not spinquant's is
refused, never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spinquant.atomic import PARTIAL_MARK, atomic_file, write_text_atomic
from spinquant.errors import SpinQuantError

MARK = "spinquant_layer_progress"
STATE = "progress.json"


def default_folder(out_dir: str | Path) -> Path:
    """The progress folder of a run written to ``out_dir``: a hidden sibling, ``.NAME.gptq-layers``."""
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f".{out.name}.gptq-layers"


def source_fingerprint(folder: str | Path | None) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of the files directly in a model folder (or of one model file); {} for None."""
    if folder is None:
        return {}
    path = Path(folder)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _canonical(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


class LayerProgress:
    """The layers of one run identity already quantized (``layers_done``), their integers and output errors.

    Used by quant/apply.gptq_quantize_model through :meth:`load` / :meth:`save` (the ``LayerStore`` it expects)."""

    def __init__(self, folder: Path, identity: dict[str, Any], layers_done: int, output_error: dict[str, Any]) -> None:
        self.folder, self.identity = folder, identity
        self.layers_done, self.output_error = layers_done, output_error

    @classmethod
    def open(cls, folder: str | Path, identity: dict[str, Any]) -> LayerProgress:
        """The progress of ``identity`` in ``folder``: resumed when the folder holds this identity's layers, started
        empty otherwise (a spinquant progress folder of another identity is cleared first)."""
        folder = Path(folder)
        if folder.exists():
            state = cls._read_state(folder)
            if _canonical(state["identity"]) == _canonical(json.loads(_canonical(identity))):
                done = int(state["layers_done"])
                missing = [i for i in range(done) if not (folder / f"layer_{i:03d}.safetensors").is_file()]
                if not missing:
                    return cls(folder, identity, done, dict(state.get("output_error") or {}))
            shutil.rmtree(folder)  # spinquant's own progress, of another identity (or incomplete): start again
        return cls(folder, identity, 0, {})

    def _create(self) -> None:
        """Make the folder with its progress.json in one rename (it never exists without it)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}{PARTIAL_MARK}", dir=self.folder.parent))
        try:
            LayerProgress(tmp, self.identity, 0, {})._write_state()
            os.replace(tmp, self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _read_state(folder: Path) -> dict[str, Any]:
        try:
            state = json.loads((folder / STATE).read_text())
        except (OSError, ValueError):
            state = None
        if not isinstance(state, dict) or state.get(MARK) != 1 or "identity" not in state:
            raise SpinQuantError(f"{folder} exists and is not a spinquant progress folder (no valid {STATE}): spinquant "
                                 f"keeps a killed run's finished layers there; move it away, or write the run elsewhere")
        return state

    def _write_state(self) -> None:
        write_text_atomic(self.folder / STATE, json.dumps({MARK: 1, "identity": self.identity, "layers_done": self.layers_done,
                                                          "output_error": self.output_error}, indent=1, default=str))

    def load(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer ``i``'s quantized linears: {name relative to the layer: (qweight int8 (out, in), scales float32)}."""
        path = self.folder / f"layer_{i:03d}.safetensors"
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as e:
            raise SpinQuantError(f"{path} cannot be read ({e}): remove {self.folder} to quantize every layer again") from e
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        try:
            return {n: (tensors[f"{n}.qweight"], tensors[f"{n}.scales"]) for n in names}
        except KeyError as e:
            raise SpinQuantError(f"{path} lacks {e.args[0]}: remove {self.folder} to quantize every layer again") from e

    def save(self, i: int, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], output_error: dict[str, Any]) -> None:
        """Record decoder layer ``i`` (the next one: ``i == layers_done``) as finished, with its linears' integers and
        scales (names relative to the layer) and their output errors (full names, pipeline's record)."""
        if i != self.layers_done:
            raise ValueError(f"layer {i} saved after {self.layers_done} finished layers")
        if not self.folder.exists():
            self._create()
        tensors = {}
        for name, (q, s) in quantized.items():
            tensors[f"{name}.qweight"] = q.detach().to("cpu", torch.int8).contiguous()
            tensors[f"{name}.scales"] = s.detach().to("cpu", torch.float32).contiguous()
        with atomic_file(self.folder / f"layer_{i:03d}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        self.layers_done = i + 1
        self.output_error.update(output_error)
        self._write_state()

    def remove(self) -> None:
        """Delete the folder (the run it served is complete)."""
        shutil.rmtree(self.folder, ignore_errors=True)
