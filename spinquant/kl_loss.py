"""Losses of a model against the text or a float teacher, a chunk of positions at a time.

At vocabulary 128256 one float32 copy of a 2048-token window's logits is 1 GiB, and a log-softmax with its gradient
takes several, so the callers (rotation learning, scale tuning) run the output layer and the loss on a few hundred
positions at a time under activation checkpointing: full-vocabulary logits then exist for one chunk only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_POSITIONS = 256  # positions whose full-vocabulary logits exist at once while the loss is computed


def chunk_logits(head: torch.nn.Module, h: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """float32 logits of hidden states ``h`` (batch, t, dim); the head runs in bf16 autocast with ``amp`` (CUDA)."""
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=amp):
        return head(h).float()


def chunk_kl(head: torch.nn.Module, teacher_head: torch.nn.Module, h: torch.Tensor, teacher_h: torch.Tensor,
             amp: bool = False) -> torch.Tensor:
    """Summed KL(teacher || model) over the positions of one chunk: hidden states (batch, t, dim) of both models,
    each through its own output layer. No gradient reaches the teacher."""
    with torch.no_grad():
        target = F.log_softmax(chunk_logits(teacher_head, teacher_h, amp), dim=-1)
    logp = F.log_softmax(chunk_logits(head, h, amp), dim=-1)
    return (target.exp() * (target - logp)).sum()


def chunk_ce(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Summed cross-entropy of one chunk of positions: h (batch, t, dim), targets (batch, t)."""
    logits = chunk_logits(head, h, amp)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def chunked_kl(head: torch.nn.Module, teacher_head: torch.nn.Module, hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               amp: bool = False, chunk: int = LOSS_CHUNK_POSITIONS) -> torch.Tensor:
    """Summed KL(teacher || model) over all positions of ``hidden`` / ``teacher_hidden`` (batch, T, dim), ``chunk``
    positions at a time under activation checkpointing (module docstring)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, hidden.shape[1], chunk):
        part = slice(a, a + chunk)
        total = total + checkpoint(chunk_kl, head, teacher_head, hidden[:, part], teacher_hidden[:, part], amp,
                                   use_reentrant=False)
    return total


def layer_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing per decoder layer on (and the model in train mode, which activates it in transformers;
    the supported families have no dropout) or off: a backward through the model then holds one layer's activations
    and weights at a time (the learner's rotated weights, the scale tuning's dequantized ones), not every layer's."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
