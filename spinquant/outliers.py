"""Massive activations: the few residual-stream channels of a pretrained model that reach |h| ~ 10³-10⁴.

Real pretrained Llamas carry them on a few tokens; models trained briefly have none. SmoothQuant's scales
(spinquant.smoothing) read the activations' channel maxima through :func:`forward_windows`.
"""

from __future__ import annotations

import torch

from spinquant.architectures import architecture_of

MASSIVE_RATIO = 50.0  # a channel is massive when its max |h| is this many times the median channel's


@torch.no_grad()
def channel_absmax(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(layers, dim): max |h| per channel of each decoder layer's residual-stream input over ``windows`` (n, seqlen)."""
    layers = architecture_of(model.config).decoder_layers(model)
    out = torch.zeros(len(layers), model.config.hidden_size)
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_mod, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            out[i] = torch.maximum(out[i], x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu())
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    forward_windows(model, windows, hooks)
    return out


@torch.no_grad()
def forward_windows(model: torch.nn.Module, windows: torch.Tensor, hooks: list) -> None:
    """Run ``model`` on each of ``windows`` (n, seqlen) alone, then remove ``hooks`` (the handles of the observers
    that watched those passes), also when a pass fails."""
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(w[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def relative_channel_absmax(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(dim,): each residual channel's max |h| over all layers and ``windows``, over the median channel's."""
    absmax = channel_absmax(model, windows).amax(0)
    return absmax / absmax.median()


def channels_above(rel: torch.Tensor, ratio: float = MASSIVE_RATIO) -> list[int]:
    """The channels whose ``rel`` (relative_channel_absmax) is >= ``ratio``, largest first."""
    return [int(j) for j in torch.argsort(rel, descending=True) if rel[j] >= ratio]


def massive_channels(model: torch.nn.Module, windows: torch.Tensor, ratio: float = MASSIVE_RATIO) -> list[int]:
    """Residual channels whose max |h| over all layers and ``windows`` is >= ``ratio`` x the median channel's,
    largest first (the original model, before rotation)."""
    return channels_above(relative_channel_absmax(model, windows), ratio)
