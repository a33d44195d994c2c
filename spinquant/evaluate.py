"""Perplexity, KL divergence to a reference and top-1 agreement on WikiText-2-style windows.

Protocol (GPTQ, QuaRot, SpinQuant): rows = the test split's rows; text = "\\n\\n".join(rows);
ids = tokenizer(text) with default special tokens (one BOS at the start); windows = consecutive
non-overlapping ``seqlen`` slices, remainder dropped; ppl = exp(mean cross-entropy of predicting
tokens 1..seqlen-1 of each window).

A model here is anything mapping ids (1, T) int64 to logits (1, T, vocab): see :data:`LogitsFn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spinquant.architectures import architecture_of
from spinquant.data import load_rows, rows_to_texts, tokenize_stream
from spinquant.errors import SpinQuantError
from spinquant.memory import heap_trimmed_before, trimming_pays

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def evaluation_ids(tokenizer: Any, data: str = "wikitext2", text_field: str = "text") -> torch.Tensor:
    """The 1-D token stream of the evaluation text (``wikitext2`` = the hub's test split, or a local file)."""
    rows = load_rows(data, split="test", flag="--data")
    return tokenize_stream(tokenizer, rows_to_texts(rows, text_field, tokenizer, template="none"), add_special_tokens=True)


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(n, seqlen) consecutive non-overlapping windows, remainder dropped; the first ``max_windows`` if given."""
    n = ids.numel() // seqlen
    if n == 0:
        raise SpinQuantError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def check_seqlen(seqlen: int, max_positions: int | None) -> None:
    if max_positions is not None and seqlen > max_positions:
        raise SpinQuantError(f"seqlen {seqlen} is longer than the model's max positions ({max_positions}): pass --seqlen {max_positions} or less")


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a transformers causal LM as a LogitsFn (no KV cache, its own device). A large model on the CPU has the
    heap trimmed where each decoder layer's attention and MLP start (spinquant.memory): a quantized model's forward
    dequantizes its weights a linear at a time, and glibc would otherwise keep those pages."""
    device = next(model.parameters()).device
    trim = trimming_pays(model)
    starts = architecture_of(model.config).sublayer_start_modules(model) if trim else []

    def run(ids: torch.Tensor) -> torch.Tensor:
        with heap_trimmed_before(starts, enabled=trim):
            return model(ids.to(device), use_cache=False).logits

    return run


class CachedLogits:
    """A (reference) model's logits memoised by input ids, on CPU: evaluate many models against one reference
    while running it once per window (memory: windows x seqlen x vocab floats). :meth:`release` drops the model
    (so that it can be freed) once every window it will be asked for is cached."""

    def __init__(self, fn: LogitsFn) -> None:
        self._fn: LogitsFn | None = fn
        self._cache: dict[bytes, torch.Tensor] = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        key = ids.cpu().numpy().tobytes()
        if key not in self._cache:
            if self._fn is None:
                raise RuntimeError("CachedLogits: a window that was not cached before release()")
            self._cache[key] = self._fn(ids).float().cpu()
        return self._cache[key]

    def release(self) -> None:
        self._fn = None


def cached_logits_fn(fn: LogitsFn) -> CachedLogits:
    """See :class:`CachedLogits`."""
    return CachedLogits(fn)


CHUNK = 256  # positions per log-softmax in evaluate()


@dataclass
class EvalResult:
    """ppl over ``tokens`` predicted tokens; kl (nats/token, KL(reference || model)) and top1 when a reference was given."""

    ppl: float
    nll: float
    tokens: int
    seqlen: int
    windows: int
    kl: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(model: LogitsFn, windows: torch.Tensor, reference: LogitsFn | None = None, progress: bool = True) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` (n, seqlen); with ``reference``, also KL and top-1 agreement."""
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for w in tqdm(windows, desc="eval", unit="window", disable=not progress, leave=False):
        ids = w[None]
        logits = model(ids)[0, :-1]
        ref_logits = reference(ids)[0, :-1] if reference is not None else None
        targets = w[1:]
        count += targets.numel()
        # log-softmax, KL and argmax over CHUNK positions at a time: at vocab 128256 one float32 copy of a 2048-token
        # window's logits is 1 GiB, and the unchunked formula held five
        for a in range(0, targets.numel(), CHUNK):
            logp = F.log_softmax(logits[a:a + CHUNK].float().cpu(), dim=-1)
            nll_sum += -logp.gather(1, targets[a:a + CHUNK, None]).sum().item()
            if ref_logits is not None:
                ref_logp = F.log_softmax(ref_logits[a:a + CHUNK].float().cpu(), dim=-1)
                kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        del logits, ref_logits
    nll = nll_sum / count
    return EvalResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=count,
        seqlen=windows.shape[1],
        windows=windows.shape[0],
        kl=kl_sum / count if reference is not None else None,
        top1=agree / count if reference is not None else None,
    )
