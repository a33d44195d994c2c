"""Who may write where: every command's output directory is new, resumed, or refused.

The rule, the same for every command:
- ``--out`` may be a path that does not exist or an empty directory;
- a directory holding an output of the *same command with the same inputs and options* is reused
  (resumed, or replaced by the same thing);
- anything else (a user's folder, another command's or another model's output, other options) is
  refused with exit 2 unless ``--overwrite`` is given;
- no output may be, contain or lie inside an input (``--model``, ``--from``, ``--tokenizer``,
  calibration or evaluation data), with or without ``--overwrite``.

Each output directory records what made it in ``spinquant_output.json``: ``{command: identity}``, where
the identity holds the resolved inputs and every option that changes the result (not the device).
A directory can hold the outputs of several commands (a quantized run and its export).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from spinquant.atomic import write_text_atomic
from spinquant.errors import SpinQuantError

OWNER_FILE = "spinquant_output.json"
Claim = Literal["new", "same", "replace"]


def resolve_input(path: str | os.PathLike | None) -> str | None:
    """An input's identity: its resolved absolute path when it exists locally, else the string (hub id, name)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def read_owner(out: Path) -> dict[str, Any]:
    """The ``{command: identity}`` record of a directory ({} when it has none or it is unreadable)."""
    try:
        data = json.loads((out / OWNER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_owner(out: Path, command: str, identity: dict[str, Any]) -> None:
    """Add (or replace) ``command``'s identity in ``out``'s record."""

    owner = read_owner(out)
    owner[command] = identity
    write_text_atomic(out / OWNER_FILE, json.dumps(owner, indent=2, sort_keys=True))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_not_input(out: Path, inputs: dict[str, str | os.PathLike | None], may_equal: tuple[str, ...] = ()) -> None:
    """Refuse an output that is, contains or lies inside an existing local input.

    ``inputs``: flag -> path (hub ids and None are ignored). ``may_equal``: flags whose input may be the output
    directory itself (``export`` writes its files into the run it reads by default).
    """
    out_r = out.expanduser().resolve()
    for flag, src in inputs.items():
        if src is None:
            continue
        p = Path(src).expanduser()
        if not p.exists():
            continue
        p_r = p.resolve()
        if flag in may_equal and p_r == out_r:
            continue
        if _overlap(out_r, p_r):
            where = "is" if out_r == p_r else "contains" if p_r.is_relative_to(out_r) else "lies inside"
            raise SpinQuantError(f"--out {out} {where} the input {flag} {src}: spinquant never writes into its inputs; "
                                 f"choose an output directory outside them")


def check_writable(out: Path) -> None:
    """Fail early (before any work) when ``out`` cannot be created or written: a file in the way, a read-only
    file system, no permission."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise SpinQuantError(f"--out {out} is an existing file, not a directory: pass a directory path")
    probe_dir = out if out.is_dir() else out.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise SpinQuantError(f"--out {out}: {probe_dir} is a file, not a directory: pass another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".spinquant-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise SpinQuantError(f"cannot write to {probe_dir} ({exc.strerror}): pass an --out on a writable file system") from exc


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def claim_output(out: str | os.PathLike, command: str, identity: dict[str, Any], inputs: dict[str, Any],
                 overwrite: bool, may_equal: tuple[str, ...] = (), owned_files: tuple[str, ...] = ()) -> Claim:
    """Decide whether ``command`` may write ``out`` (module docstring); writes nothing.

    Returns "new" (missing or empty), "same" (holds this command's output for the same identity: resume or
    re-make) or "replace" (``overwrite`` given for a directory holding something else). ``owned_files``:
    for a command that writes a few files into a shared directory (export), only these decide whether the
    directory holds something of its own; other files are left alone.
    """
    out = Path(out).expanduser()
    check_writable(out)
    check_not_input(out, inputs, may_equal)
    if not out.exists():
        return "new"
    owner = read_owner(out)
    mine = owner.get(command)
    if mine is not None and not _differences(mine, identity):
        return "same"
    if owned_files:
        present = [f for f in owned_files if (out / f).exists()]
        if not present and mine is None:
            return "new"
    elif not any(out.iterdir()):
        return "new"
    if overwrite:
        return "replace"
    if mine is not None:
        changed = _differences(mine, identity)
        if "model" in changed:
            what = f"holds a run of a different model ({mine.get('model')})"
        else:
            what = f"holds a spinquant {command} output with other options ({', '.join(changed)})"
        hint = "use another --out, the same options to resume, or --overwrite to replace it"
    elif owner:
        what = f"holds the output of spinquant {', '.join(sorted(owner))}, not of {command}"
        hint = "use another --out, or --overwrite to replace it"
    elif owned_files:
        what = f"already holds {', '.join(f for f in owned_files if (out / f).exists())} that this export did not write"
        hint = "use another --out, or --overwrite to replace them"
    else:
        what = "is not empty and holds no spinquant output"
        hint = "use another --out (a new or empty directory), or --overwrite to replace its contents"
    raise SpinQuantError(f"{out} {what}: {hint}")


def clear_directory(out: Path) -> None:
    """Empty ``out`` for ``--overwrite`` (only after every check passed; never an input: see check_not_input)."""
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
