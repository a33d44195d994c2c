"""Closed-form channel scales from calibration statistics (SmoothQuant's migration, in fusion.ChannelScales form).

For each scaled activation (the two norm outputs, the attention output per kv channel, the down_proj input) and
the weight columns that read it, channel j gets

    s_j = (max|W[:, j]|)^(1 - alpha) / (max|x_j|)^alpha        (normalised to geometric mean 1)

so that the activation ``x_j s_j`` and the columns ``W[:, j] / s_j`` share the channel's range (alpha 0.5: evenly).
SmoothQuant (Xiao et al., 2023) divides the activation by its s; ours multiplies (fusion.ChannelScales' convention),
hence the reciprocal. A constant factor does not change per-token or per-group quantization, so the normalisation
only keeps the norm weights near 1.

Measured on the model *after* norm fusion and R1/R2 (the basis the scales live in), so the statistics are those the
quantizer meets. Used as the learner's starting point (``LearnConfig.scale_init``) or on its own. Written by hand:
the libraries that ship SmoothQuant (llm-compressor, torchao) apply it to their own module layouts, not to a scale
set that must survive rotation fusion and the ExecuTorch checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from spinquant.architectures import architecture_of, head_dim
from spinquant.fusion import SCALE_KINDS, ChannelScales, Rotations, apply_rotations, fuse_and_rotate


@torch.no_grad()
def activation_absmax(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per kind of fusion.SCALE_KINDS, (layers, channels): max |x| of the activation each scale multiplies, over
    ``windows`` (n, seqlen): the input of q_proj (attn_in), of gate_proj (mlp_in), of o_proj folded onto kv channels
    (v_out: max over the heads sharing a kv head) and of down_proj before any online Hadamard (up_out)."""
    cfg = model.config
    hd, n_kv = head_dim(cfg), cfg.num_key_value_heads
    out = {k: torch.zeros(cfg.num_hidden_layers, n) for k, n in ChannelScales.channels(cfg).items()}

    def observe(kind: str, i: int, fold_heads: bool = False):
        def hook(_mod, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            if fold_heads:  # o_proj input (n_heads * hd) -> the kv channel each head reads
                x = x.view(n_kv, -1, hd).amax(1).reshape(-1)
            out[kind][i] = torch.maximum(out[kind][i], x)
        return hook

    hooks = []
    arch = architecture_of(cfg)
    for i, layer in enumerate(arch.decoder_layers(model)):
        for pair in arch.scales:  # the first reader's input (down_proj: before HadamardInputLinear's own rotation)
            reader = layer.get_submodule(pair.consumers[0])
            hooks.append(reader.register_forward_pre_hook(observe(pair.kind, i, fold_heads=pair.per_head)))
    forward_windows(model, windows, hooks)
    return out


def weight_column_absmax(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per kind, (layers, channels): max |W[:, j]| over the linears that read the scaled activation (q/k/v; gate/up;
    o_proj folded onto kv channels; down_proj, before R4's fold if the model has one: the model passed must not
    have R4 folded)."""
    cfg = model.config
    hd, n_kv = head_dim(cfg), cfg.num_key_value_heads
    out: dict[str, list[torch.Tensor]] = {k: [] for k in SCALE_KINDS}
    arch = architecture_of(cfg)
    for layer in arch.decoder_layers(model):
        for pair in arch.scales:
            m = torch.stack([layer.get_submodule(name).weight.detach().abs().amax(0).float().cpu()
                             for name in pair.consumers]).amax(0)
            out[pair.kind].append(m.view(n_kv, -1, hd).amax(1).reshape(-1) if pair.per_head else m)
    return {k: torch.stack(v) for k, v in out.items()}


def smooth_scales(model: nn.Module, rot: Rotations, windows: torch.Tensor, alpha: float = 0.5,
                  kinds: tuple[str, ...] = SCALE_KINDS) -> ChannelScales:
    """SmoothQuant scales for ``model`` (the original float model, untouched) rotated by ``rot`` (its R1/R2; R4 and
    any scales of ``rot`` are ignored), from ``windows`` (n, seqlen). Kinds not in ``kinds`` stay 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} must be in [0, 1]")
    work = copy.deepcopy(model)
    fuse_and_rotate(work, Rotations(r1=rot.r1, r2=rot.r2, r4=False))
    acts = activation_absmax(work, windows)  # unchanged by any scales (they preserve every layer's function)

    def migrate(kind_set: tuple[str, ...], cols: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out = {}
        for kind in kind_set:
            a, w = acts[kind].double().clamp(min=1e-8), cols[kind].double().clamp(min=1e-8)
            s = w.pow(1.0 - alpha) / a.pow(alpha) if kind in kinds else torch.ones_like(a)
            out[kind] = list(s / s.log().mean(-1, keepdim=True).exp())  # geometric mean 1 per layer
        return out

    # v_proj and up_proj also read attn_in / mlp_in: their rows take v_out / up_out first, then the columns of
    # q/k/v and gate/up are measured as they will be
    producers = migrate(("v_out", "up_out"), weight_column_absmax(work))
    ones = {k: [torch.ones(a.shape[-1], dtype=torch.float64) for a in acts[k]] for k in ("attn_in", "mlp_in")}
    apply_rotations(work, Rotations(scales=ChannelScales(**producers, **ones)))
    readers = migrate(("attn_in", "mlp_in"), weight_column_absmax(work))
    del work
    return ChannelScales(**producers, **readers)


@torch.no_grad()
def forward_windows(model: nn.Module, windows: torch.Tensor, hooks: list) -> None:
    """Run ``model`` on each of ``windows`` (n, seqlen) alone, then remove ``hooks`` (the handles of the observers
    that watched those passes), also when a pass fails."""
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(w[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
