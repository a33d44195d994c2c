"""The one exception type users see: a problem with their input, with the fix named."""


class SpinQuantError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    Messages say what is wrong and what to do about it, e.g.
    ``"no such path: /x/model (pass a local model directory or a hub id such as meta-llama/Llama-3.2-1B)"``.
    """
