"""Handing freed memory back to the operating system (1B/3B models on a small machine).

glibc keeps the pages of freed allocations under its mmap threshold (which grows up to 32 MiB: a 1B model's q_proj
is 16 MiB) in the process's heap, and a heap fragmented by a stage's many same-sized temporaries keeps growing: the
scale tuning's live tensors stay at the same size through a step while the resident set grows with every layer
(benchmarks/RESULTS.md, table 16). ``malloc_trim(0)`` returns every free page, from the heap's middle too.
Written by hand because neither torch nor the standard library exposes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache

from torch import nn


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is no glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def trim_heap() -> None:
    """Return glibc's free heap pages to the system (a no-op without glibc). Cheap: no garbage collection."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_memory() -> None:
    """Collect garbage, then :func:`trim_heap`: between stages, once a stage has freed a whole model (whose pages
    would otherwise stay resident, and the next stage, or executorch's exporter in a child process, pay twice)."""
    gc.collect()
    trim_heap()


# trimming during a forward pays from this many bytes of weights: between a float SmolLM2-135M (0.5 GiB, where it
# only costs time) and a 1B model quantized to 4 bits (1.06 GiB, integers packed two a byte)
TRIM_FROM_BYTES = 768 << 20


def trimming_pays(model: nn.Module) -> bool:
    """Whether to trim during ``model``'s forwards: on the CPU, from :data:`TRIM_FROM_BYTES` of parameters and buffers.
    Each trim makes the next temporaries fault their pages in again; at real sizes that costs little against the
    GiBs it keeps, on a small model it is time for nothing (measured: benchmarks/RESULTS.md, table 16)."""
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and tensors[0].device.type == "cpu" and sum(t.nbytes for t in tensors) >= TRIM_FROM_BYTES


def _trim_before_forward(module: nn.Module, args: tuple) -> None:
    trim_heap()  # returns None: the forward's inputs stay as they are


@contextmanager
def heap_trimmed_before(modules: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`trim_heap` before every forward of each of ``modules`` (pre-hooks, removed on exit).

    Given each decoder layer's linears, a training step's resident set then holds its live tensors and one part of
    a layer's temporaries, not a heap grown by every layer's. The hooks also fire when activation checkpointing
    recomputes a layer in the backward (they sit inside the checkpointed layer). ``enabled=False`` (a GPU run,
    whose temporaries are not on this heap, or a small model: :func:`trimming_pays`): nothing is installed."""
    handles = [m.register_forward_pre_hook(_trim_before_forward) for m in modules] if enabled else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()
