"""A float model quantized layer by layer: each decoder layer is read from the checkpoint, its norms fused and its
rotations applied just before GPTQ (or RTN) quantizes it, the output layer last (formats/streamed.py).

The transforms are the whole-model path's own functions (fusion.fuse_layer_norms, rotate_layer, rotate_ends) on
the same tensors in the same float64 arithmetic on CPU, so a streamed run writes the same integers and scales as a
run that loaded the whole model (tested); only the order in which layers are read differs.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from spinquant.architectures import architecture_of
from spinquant.formats import describe_source, load_model
from spinquant.formats.streamed import LayeredCheckpoint
from spinquant.fusion import (Rotations, check_rotations, fuse_final_norm, fuse_layer_norms, install_online_r4, rotate_ends,
                              rotate_layer)
from spinquant.memory import release_memory
from spinquant.quant.apply import LayerPreparer
from spinquant.quant.primitives import linear_by_rows


class StreamedModel(LayerPreparer):
    """``model``, a skeleton of ``checkpoint`` (:meth:`LayeredCheckpoint.skeleton`), with ``rot`` (None: no transform)
    fused as each part is read; the transforms run on CPU, then the part moves to ``device``. ``model`` is ready for
    ``quantize_model(model, ..., prepare=self)``; the embedding is read and rotated now, the layers and the output
    layer when quantize_model asks for them."""

    def __init__(self, checkpoint: LayeredCheckpoint, model: nn.Module, rot: Rotations | None, device: torch.device) -> None:
        self.checkpoint, self.model, self.rot, self.device = checkpoint, model, rot, device
        arch = checkpoint.arch
        if rot is not None:
            check_rotations(self.model.config, rot)
            rotate_ends(self.model, rot, head=False)
            if rot.r4:
                install_online_r4(self.model)
        for name in (arch.embedding, arch.final_norm, arch.rotary):
            self.model.get_submodule(name).to(device)

    def layer(self, i: int, layer: nn.Module) -> None:
        release_memory()  # the previous layer's float weights and GPTQ's transients: back to the system, not kept
        self.checkpoint.load_layer(self.model, i)
        if self.rot is not None:
            fuse_layer_norms(layer, self.checkpoint.arch)
            rotate_layer(layer, i, self.rot, self.model.config)
        layer.to(self.device)

    def head(self) -> None:
        head = self.checkpoint.load_head(self.model)
        if self.rot is not None:
            fuse_final_norm(self.model)
            rotate_ends(self.model, self.rot, embedding=False)
        head.to(self.device)
        self.model.get_submodule(self.checkpoint.arch.final_norm).to(self.device)


class StoredPrecisionLinear(nn.Module):
    """A float linear kept in its checkpoint's dtype (bf16: half of float32's memory, 0.7 GiB less for a 3B model's
    128256-row output layer) and computed in the input's dtype: ``F.linear(x, W.to(x.dtype), b)``, the weight
    converted a chunk of rows at a time (quant.primitives.linear_by_rows), so no whole float32 copy exists. The values are those of the
    float32 layer ``load_hf`` reads (bf16 -> float32 is exact); only the matmul is split by output rows, which leaves
    each element's reduction over the input as it is unless the kernel chosen for a chunk differs from the whole's
    (single-token inputs: the last bits). ``weight`` (out, in), ``bias`` (out,) or None; no gradient."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.requires_grad_(False)
        self.bias = None if linear.bias is None else linear.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_by_rows(x, self.weight.shape, lambda rows: self.weight[rows].to(x.dtype),
                              None if self.bias is None else self.bias.to(x.dtype))


class FloatReference:
    """The float model on a fixed set of windows, computed layer by layer: its final hidden states (after the final
    norm) are kept, (n, T, dim) float32 on CPU, with the float output layer, instead of the model (or of the logits,
    T x vocab per window). Serves as the reference of an evaluation (:meth:`__call__`, a LogitsFn for those windows),
    the teacher of the scale tuning (:meth:`final_hidden`, :attr:`head`), and the residual stream on the first
    ``probe`` = (windows, tokens) of them (:attr:`residuals`: each decoder layer's input, (windows x tokens, dim), for
    the report's outlier statistics).

    From a checkpoint (:meth:`build` on a local safetensors directory) one float decoder layer is in memory at a time
    and the embedding only while the stream starts; from a model in memory (any other source) its own layers run.
    Each window runs alone (batch 1) through each layer, as the whole model runs it, so the logits equal the whole
    model's (tested).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, device: torch.device | str = "cpu",
                 probe: tuple[int, int] = (0, 0), checkpoint: LayeredCheckpoint | None = None, progress: bool = False) -> None:
        arch = architecture_of(model.config)
        if checkpoint is not None:
            for name in (arch.embedding, arch.final_norm, arch.rotary):
                model.get_submodule(name).to(device)
        self._rows = {w.numpy().tobytes(): k for k, w in enumerate(windows.cpu())}
        self.residuals: list[torch.Tensor] = []
        with torch.no_grad():
            embedding = model.get_submodule(arch.embedding)
            # (n, T, dim) float32 on CPU, GiBs at the scale tuning's default windows: filled in place, never copied
            for k, w in enumerate(windows):
                x = embedding(w[None].to(device))[0].cpu()
                if k == 0:
                    stream = x.new_empty(windows.shape[0], *x.shape)
                stream[k] = x
            if checkpoint is not None:
                embedding.to("meta")  # freed: the stream has started
            positions = torch.arange(windows.shape[1], device=device)[None]
            pos_emb = model.get_submodule(arch.rotary)(stream[:1].to(device), positions)
            for i in tqdm(range(len(arch.decoder_layers(model))), desc="float reference", unit="layer", disable=not progress):
                layer = arch.decoder_layers(model)[i] if checkpoint is None else checkpoint.load_layer(model, i).to(device)
                if probe[0]:
                    self.residuals.append(stream[: probe[0], : probe[1]].reshape(-1, stream.shape[-1]).clone())
                for k in range(stream.shape[0]):
                    stream[k : k + 1] = layer(stream[k : k + 1].to(device), attention_mask=None,
                                              position_embeddings=pos_emb).cpu()
                if checkpoint is not None:
                    layer.to("meta")
            norm = model.get_submodule(arch.final_norm)
            for k in range(stream.shape[0]):
                stream[k : k + 1] = norm(stream[k : k + 1].to(device)).cpu()
            self.hidden = stream
        # from a checkpoint: the output layer as stored (bf16 for a released Llama), computed in float32 (above)
        head = model.get_submodule(arch.head) if checkpoint is None else StoredPrecisionLinear(checkpoint.load_head(model, keep_dtype=True))
        self.head = head.to(device).requires_grad_(False)
        self.device = device

    @staticmethod
    def build(source: str, windows: torch.Tensor, device: torch.device | str = "cpu", probe: tuple[int, int] = (0, 0),
              progress: bool = False) -> "FloatReference":
        """The reference of the float model ``source``: streamed from safetensors shards (a local directory or a hub
        snapshot), else loaded whole (.bin weights, a Meta checkpoint) and freed once its hidden states are taken."""
        checkpoint = LayeredCheckpoint.open(source) if describe_source(source) in ("hf", "hub") else None
        model = checkpoint.skeleton() if checkpoint is not None else load_model(source, untie=False).to(device)
        return FloatReference(model, windows, device, probe, checkpoint, progress)

    def final_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states (1, T, dim) of a window (1, T) given at construction, on the reference's device."""
        key = ids.reshape(-1).cpu().numpy().tobytes()
        if key not in self._rows:
            raise RuntimeError("FloatReference: a window it was not built for")
        return self.hidden[self._rows[key]][None].to(self.device)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The float model's logits (1, T, vocab) for a window given at construction."""
        return self.head(self.final_hidden(ids))
