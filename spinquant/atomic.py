"""Atomic outputs: a result appears complete or not at all, and a failure never destroys an earlier one.

Temp files and folders (``.NAME.partial-*``) are made by :mod:`tempfile`, which creates them private
(0600 / 0700); when they are renamed into place they get the permissions any other tool would give
them under the user's umask (0644 / 0755 with the usual 022).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_MARK = ".partial-"


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a finished temp file/folder (and everything in a folder) the umask's default permissions."""
    mask = _umask()
    paths = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``out``; on success it replaces ``out`` by rename.

    On any exception the temp directory is removed and ``out`` (if it existed) is left untouched.
    Callers decide beforehand whether ``out`` may be replaced (:mod:`spinquant.outputs`).
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}", dir=out.parent))
    try:
        yield tmp
        publish_mode(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same folder; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            publish_mode(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (JSON, Markdown) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def remove_stale_partials(folder: Path) -> None:
    """Remove ``.*.partial-*`` leftovers of a run killed by SIGKILL (only names spinquant itself makes)."""
    for p in folder.glob(f".*{PARTIAL_MARK}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
