"""The one exception type users see: a problem with their input, with the fix named."""

from __future__ import annotations

import os


class SpinQuantError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    Messages say what is wrong and what to do about it, e.g.
    ``"no such path: /x/model (pass a local model directory or a hub id such as meta-llama/Llama-3.2-1B)"``.
    """


def unreadable_torch_file(what: str, path: str | os.PathLike) -> str:
    """The one message for a torch file that ``torch.load(weights_only=True)`` refused."""
    return (f"cannot read {what} {path}: corrupt, not a torch file, or holding more than tensors "
            f"(spinquant never runs code from a file: weights_only=True)")
