"""The value projection's GPTQ statistics seen through the attention that reads it.

Plain GPTQ weighs every token's v_proj input equally: ``H = Σ_t x_t x_tᵀ``. But a value is never used on its own;
head h's output at query q is ``o_q = Σ_t A_h[q, t] v_t``, so an error ``ΔW x_t`` reaches the model as
``ΔW z_{h,q}`` with ``z_{h,q} = Σ_t A_h[q, t] x_t``, the attention-weighted input. The exact GPTQ objective for the
attention output is therefore ``||ΔW Z||²`` with the Hessian of the z's,

    H_j = Σ_{h reads KV head j} Σ_q z_{h,q} z_{h,q}ᵀ   (one per KV head j: its rows of v_proj, head_dim of them),

and with the float target (quant/apply.py) the cross term ``C_j = Σ z_{h,q} z̃_{h,q}ᵀ`` pairs the float model's
z (its attention on its inputs) with the quantized model's z̃. Why it looked worth it: attention sinks (a few
tokens most queries attend to) carry a large share of every query's output yet are one token in a thousand of
plain GPTQ's Hessian, and on SmolLM2-135M 8da4w with round to nearest the int4 weights of v_proj alone cost KL
0.266 nats/token, q_proj's and k_proj's 0.020 each (benchmarks/results/kl_breakdown_smollm2_qkv.md). Measured
with GPTQ it gains nothing (KL 0.0792 vs 0.0791 at 1.6x the GPTQ time; benchmarks/results/gptq_scale_refit.md):
after GPTQ v_proj is not where the KL is. Kept opt-in (``WeightQuantConfig.value_hessian``) so the row reproduces.

The attention probabilities are computed from the layer's own q/k weights on the captured input (still float
when the statistics are taken: q, k and v are quantized together after), with RoPE and the causal mask; the
online R3 Hadamard cancels in q·kᵀ, a quantized KV cache's rounding of K is not modelled. Idea as in BoA
(Kim et al., 2025, attention-aware Hessians); written here because no library computes them for GPTQ.

Shapes: x (batch, T, dim) the v_proj matmul input; A (heads, T, T) per window; H_j, C_j (dim, dim) float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@torch.no_grad()
def attention_probs(attn: nn.Module, x: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal softmax(q kᵀ · scaling) of the (Llama) attention module ``attn`` for one window ``x`` (T, dim), its
    q/k_proj matmul input: (heads, T, T) float32, row q the distribution over keys t <= q. ``pos_emb``: (cos, sin)
    of the model's rotary embedding, (1, T, head_dim)."""
    t = x.shape[0]
    hd = attn.head_dim
    q = F.linear(x, attn.q_proj.weight.float()).view(1, t, -1, hd).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight.float()).view(1, t, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pos_emb)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # GQA: query head h reads KV head h // groups
    scores = (q @ k.transpose(-1, -2))[0] * attn.scaling
    scores.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    return scores.softmax(-1)


def attention_weighted_inputs(attn: nn.Module, x: torch.Tensor, pos_emb) -> torch.Tensor:
    """z = A_h x for every query head h of one window ``x`` (T, dim): (kv_heads, groups * T, dim), the rows of
    KV head j being the z's of the query heads that read it."""
    z = attention_probs(attn, x, pos_emb) @ x.float()  # (heads, T, dim)
    heads, t, dim = z.shape
    return z.reshape(heads // attn.num_key_value_groups, attn.num_key_value_groups * t, dim)


class ValueAccumulator:
    """Running per-KV-head H̃_j = 2/n Σ z̃ z̃ᵀ and (with ``cross``) C_j = 2/n Σ z z̃ᵀ, (kv_heads, dim, dim) float32,
    over attention-weighted inputs (:func:`attention_weighted_inputs`) of the quantized stream (z̃) and, paired
    token by token, the float stream (z). n counts (query head, query position) pairs per KV head."""

    def __init__(self, kv_heads: int, n_features: int, cross: bool, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(kv_heads, n_features, n_features, dtype=torch.float32, device=device)
        self.c = torch.zeros_like(self.h) if cross else None
        self.n = 0

    @torch.no_grad()
    def add(self, z_quant: torch.Tensor, z_float: torch.Tensor | None = None) -> None:
        m = z_quant.shape[1]
        keep = self.n / (self.n + m)
        self.h.mul_(keep)
        self.n += m
        f = (2.0 / self.n) ** 0.5
        self.h.baddbmm_((z_quant * f).transpose(1, 2), z_quant * f)
        if self.c is not None:
            self.c.mul_(keep)
            self.c.baddbmm_((z_float * f).transpose(1, 2), z_quant * f)
