"""A Hugging Face model read one decoder layer at a time, for the stages that can work layer by layer (rotation,
GPTQ, RTN): the whole model is never in memory in float32.

:meth:`LayeredCheckpoint.skeleton` builds the family's transformers class with every decoder layer and the output
layer on the meta device (no memory) and only the embedding, the final norm and the rotary embedding read (float32,
untied, eval mode: the form :func:`spinquant.formats.hf.load_hf` gives, without the weights of the layers).
:meth:`~LayeredCheckpoint.load_layer` then reads layer ``i``'s tensors from the safetensors shards into it (float32,
as ``load_hf`` upcasts them, so a layer read here is bit-identical to the same layer of the whole model), and
:meth:`~LayeredCheckpoint.load_head` the output layer (the embedding's copy for a tied model). A stage that has
quantized a layer keeps its integers only, so the memory a streamed run holds is the quantized model plus one float
layer.

Only safetensors shards can be read this way (safetensors maps a tensor without reading the others): a local
directory, or a hub id's snapshot in the Hugging Face cache; ``pytorch_model.bin`` or a Meta checkpoint loads whole
(:func:`LayeredCheckpoint.open` gives None).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig

from spinquant.architectures import Architecture, architecture_of
from spinquant.errors import SpinQuantError
from spinquant.formats import HUB_ID
from spinquant.formats.hf import (check_finite, check_llama_config, check_weight_shapes, meta_model, untie_embeddings,
                                  weight_shapes)
from spinquant.fusion import restore_online_rotations


READ_ROWS_ELEMENTS = 1 << 24  # rows of a tensor read and converted at a time (32 MiB of bf16)


class LayeredCheckpoint:
    """A local HF directory's safetensors shards, read tensor by tensor (see the module docstring)."""

    def __init__(self, folder: Path, shard_of: dict[str, Path]) -> None:
        self.folder = folder
        self.shard_of = shard_of  # tensor name -> the shard file holding it
        self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        check_llama_config(self.config, str(folder))
        self.arch: Architecture = architecture_of(self.config, str(folder))

    @staticmethod
    def open(source: str | os.PathLike) -> "LayeredCheckpoint | None":
        """The checkpoint of a local HF directory with safetensors shards, checked (config, shard headers, shapes), or
        of a hub id's snapshot (downloaded to the Hugging Face cache, as ``from_pretrained`` would); None for any other
        source (it loads whole, and says what is wrong when it cannot)."""
        folder = Path(source).expanduser()
        if not folder.exists() and HUB_ID.match(str(source)):
            try:
                folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))
            except Exception:  # offline, unknown, gated: the whole-model loader reports it
                return None
        if not (folder / "config.json").is_file() or (folder / "quant_config.json").is_file():
            return None
        index = folder / "model.safetensors.index.json"
        shapes = weight_shapes(folder)  # SpinQuantError naming a missing, truncated or corrupt shard
        if not shapes:
            return None
        if index.is_file():
            shard_of = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            shard_of = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as st:
                    shard_of.update({name: f for name in st.keys()})
        checkpoint = LayeredCheckpoint(folder, shard_of)
        check_weight_shapes(shapes, checkpoint.config, str(folder))
        return checkpoint

    def read(self, names: list[str], keep_dtype: bool = False) -> dict[str, torch.Tensor]:
        """The tensors ``names`` in float32 (floating ones; others as stored; all as stored with ``keep_dtype``), each
        checked finite. A tensor is read and converted READ_ROWS_ELEMENTS at a time into its result, so reading a
        128256-row bf16 embedding holds no whole-size bf16 copy (or NaN mask) beside it."""
        missing = [n for n in names if n not in self.shard_of]
        if missing:
            raise SpinQuantError(f"{self.folder}: the weights lack {', '.join(missing[:3])}: the model is incomplete "
                                 f"(re-save or re-download it)")
        out: dict[str, torch.Tensor] = {}
        for shard in sorted({self.shard_of[n] for n in names}):
            with safe_open(str(shard), framework="pt") as st:
                for name in (n for n in names if self.shard_of[n] == shard):
                    part = st.get_slice(name)
                    shape = part.get_shape()
                    rows = max(1, READ_ROWS_ELEMENTS // max(1, math.prod(shape[1:]))) if shape else 1
                    if not shape or shape[0] <= rows:
                        t = st.get_tensor(name)
                        out[name] = t.float() if t.is_floating_point() and not keep_dtype else t
                        check_finite([(name, out[name])], str(self.folder))
                        continue
                    first = part[0:rows]
                    dtype = torch.float32 if first.is_floating_point() and not keep_dtype else first.dtype
                    t = torch.empty(shape, dtype=dtype)
                    for a in range(0, shape[0], rows):
                        chunk = first if a == 0 else part[a : a + rows]
                        check_finite([(name, chunk)], str(self.folder))
                        t[a : a + rows] = chunk
                    out[name] = t
        return out

    def skeleton(self) -> torch.nn.Module:
        """The model with its decoder layers and output layer on the meta device; embedding, final norm and rotary
        embedding read (float32). Untied: the output layer is its own meta tensor, read by :meth:`load_head`."""
        arch, config = self.arch, self.config
        model = meta_model(config)
        tied = getattr(config, "tie_word_embeddings", False)
        missing = [n for n, _ in model.named_parameters() if n not in self.shard_of and not (tied and n.startswith(f"{arch.head}."))]
        if missing:  # said now, not when GPTQ reaches the layer (from_pretrained would fill them at random)
            raise SpinQuantError(f"{self.folder}: the weights lack {', '.join(missing[:3])}"
                                 f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}: the model is incomplete "
                                 f"(re-save or re-download it)")
        for name in (arch.embedding, arch.final_norm):
            module = model.get_submodule(name)
            state = self.read([f"{name}.{key}" for key, _ in module.named_parameters()])
            module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items()}, assign=True)
        untie_embeddings(model)  # the output layer stays on meta (the embedding read above is a new tensor)
        model.config.dtype = torch.float32  # as load_hf records it
        return restore_online_rotations(model.eval())

    def load_layer(self, model: torch.nn.Module, i: int) -> torch.nn.Module:
        """Read decoder layer ``i``'s tensors into ``model`` (a :meth:`skeleton`, whatever wrappers it has since
        gained: parameter names are unchanged by them); returns the layer."""
        layer = self.arch.decoder_layers(model)[i]
        prefix = f"{self.arch.layers}.{i}."
        names = [n for n, _ in layer.named_parameters()]
        state = self.read([prefix + n for n in names])
        _assign(layer, {n: state[prefix + n] for n in names}, f"{self.folder} layer {i}")
        return layer

    def load_head(self, model: torch.nn.Module, keep_dtype: bool = False) -> torch.nn.Module:
        """Read the output layer into ``model`` (a tied model's: a copy of the embedding as stored); returns it, in
        float32 or, with ``keep_dtype``, in the dtype the checkpoint stores (bf16: half the memory)."""
        arch = self.arch
        head = model.get_submodule(arch.head)
        names = [n for n, _ in head.named_parameters()]
        stored = f"{arch.head}.weight" in self.shard_of and not getattr(self.config, "tie_word_embeddings", False)
        source = arch.head if stored else arch.embedding
        state = self.read([f"{source}.{n}" for n in names], keep_dtype)
        _assign(head, {n: state[f"{source}.{n}"] for n in names}, f"{self.folder} {arch.head}")
        return head


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Replace ``module``'s (meta) parameters by ``state``'s tensors, shapes checked, as frozen parameters."""
    for name, tensor in state.items():
        owner_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
        owner = module.get_submodule(owner_name)
        old = getattr(owner, attr)
        if tuple(old.shape) != tuple(tensor.shape):
            raise SpinQuantError(f"{where}: {name} has shape {list(tensor.shape)}, the config needs {list(old.shape)}: "
                                 f"config.json and the weights disagree")
        setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=False))
