"""Handing freed memory back to the operating system between stages (1B/3B models on a small machine)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_memory() -> None:
    """Collect garbage, then ask glibc to return its free heap pages (``malloc_trim(0)``).

    Tensors under glibc's mmap threshold (up to 32 MiB: a 1B model's q_proj is 16 MiB) live on the heap; once a
    stage frees a whole model those pages stay in the process's resident set until trimmed, and the next stage
    (or executorch's exporter, a child process) pays for them twice. A no-op where there is no glibc.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
