"""Blockwise scale tuning: each decoder layer's scales tuned, right after GPTQ quantized it, on that layer's output
error against the float model (issue 33 item 2), integers fixed.

The end-to-end tuning (spinquant.quant.scale_tuning) trains every scale at once on KL at the logits, so its backward
runs through the whole quantized network. This variant needs nothing beyond what GPTQ with the float objective
already holds: the layer (quantized), its float copy and the two calibration streams. For layer i it minimises

    Σ_windows ||layer_q(x̃) - layer_f(x)||² / ||layer_f(x)||²

over θ (``s = s_GPTQ * exp(θ)`` per group, as the end-to-end tuning parameterises), x̃ the quantized stream and x
the float stream at the layer's input, so the error the earlier layers left in x̃ is corrected where it can be (the
same target as GPTQ's float objective, but through the layer's attention and MLP non-linearities instead of linear by
linear). One window per step, cycling over the calibration windows, Adam with cosine decay; the tuned scales are baked
in before the streams advance, so the next layer sees them.

Used through quant/apply.gptq_quantize_model's ``after_layer`` seam (:class:`BlockTuner` is one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from spinquant.quant.fake_quant import QuantLinear
from spinquant.quant.scale_tuning import adam_cosine, descend, end_log_offsets, start_log_offsets


@dataclass
class BlockTuner:
    """``steps`` windows per layer (cycling over the calibration windows), Adam ``lr`` on the log-scale offsets.
    ``stats``: per layer, the relative output error over all calibration windows before and after, and the seconds."""

    steps: int = 32
    lr: float = 1e-3
    stats: dict = field(default_factory=dict)

    def __call__(self, i: int, layer: nn.Module, ref: nn.Module | None, inps: torch.Tensor, finps: torch.Tensor | None,
                 pos_emb) -> None:
        """Tune layer ``i``'s fixed linears in place; ``ref`` is its float copy, ``inps`` / ``finps`` (n, T, dim) the
        quantized and float streams at its input."""
        if ref is None or finps is None:
            raise ValueError("blockwise scale tuning needs the float stream: GPTQ with the float objective")
        linears = [m for m in layer.modules() if isinstance(m, QuantLinear) and m.weight_mode == "fixed"]
        if not linears or self.steps == 0:
            return
        t0 = time.perf_counter()

        def error() -> float:  # Σ ||layer_q(x̃) - layer_f(x)||² / Σ ||layer_f(x)||² over the windows
            num = den = 0.0
            with torch.no_grad():
                for j in range(inps.shape[0]):
                    target = ref(finps[j : j + 1], attention_mask=None, position_embeddings=pos_emb)
                    out = layer(inps[j : j + 1], attention_mask=None, position_embeddings=pos_emb)
                    num, den = num + (out - target).pow(2).sum().item(), den + target.pow(2).sum().item()
            return num / den

        before = error()
        opt, sched = adam_cosine(start_log_offsets(linears), self.lr, self.steps)
        finished = False
        try:
            with torch.enable_grad():
                for step in range(self.steps):
                    j = step % inps.shape[0]
                    with torch.no_grad():
                        target = ref(finps[j : j + 1], attention_mask=None, position_embeddings=pos_emb)
                    out = layer(inps[j : j + 1], attention_mask=None, position_embeddings=pos_emb)
                    descend(opt, sched, (out - target).pow(2).sum() / target.pow(2).sum())
            finished = True
        finally:  # a failed step leaves the scales as GPTQ set them
            end_log_offsets(linears, bake=finished)
        self.stats[i] = {"before": before, "after": error(), "seconds": time.perf_counter() - t0}
