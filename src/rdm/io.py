"""The one place files are written: atomically (temporary file, then rename), after a check that
the destination is writable, with checksums for what is read back.

Every artifact rdm writes goes through :func:`atomic_write` (or its text / JSON / numpy wrappers),
so a killed process leaves either the old file or the new one, never half of one. Long jobs call
:func:`require_writable` on their outputs *before* the work starts, so an unwritable ``--out`` is
reported in a second, not after an hour of encoding.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rdm.errors import RdmError


class OutputError(RdmError):
    """An output path that cannot be written; the message names it and what to do."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file is removed if ``write`` fails; ``path`` is untouched until the rename.
    OS errors become an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(_cannot_write(path, exc)) from None
    finally:
        with contextlib.suppress(OSError):  # e.g. a parent that is a file: no tmp exists
            tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def replace_dir(tmp: str | Path, out: str | Path) -> Path:
    """Move the finished directory ``tmp`` onto ``out`` with renames only: ``out`` is never
    half-written. An old ``out`` is renamed aside first, put back if the second rename fails, and
    deleted last (between the two renames, a moment, ``out`` does not exist)."""
    tmp, out = Path(tmp), Path(out)
    try:
        if not out.exists():
            os.replace(tmp, out)
            return out
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # the previous directory back in place
            raise
    except OSError as exc:
        raise OutputError(_cannot_write(out, exc)) from None
    shutil.rmtree(old, ignore_errors=True)
    return out


def require_writable(path: str | Path, *, is_dir: bool = False, what: str = "output") -> Path:
    """Check before any work starts that ``path`` can be created (or replaced).

    ``is_dir``: ``path`` is a directory to create or fill; otherwise a file whose parent must be a
    writable directory. Creates missing parent directories. Raises :class:`OutputError`.
    """
    path = Path(path)
    folder = path if is_dir else path.parent
    if not is_dir and path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".rdm-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(_cannot_write(path, exc, what)) from None
    return path


def _cannot_write(path: Path, exc: OSError, what: str = "output") -> str:
    reason = exc.strerror or str(exc)
    hint = "choose another path"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a directory you can write to"
    elif exc.errno == errno.ENOSPC:
        hint = "free some disk space or choose another disk"
    return f"cannot write {what} {path} ({reason}); {hint}"


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed; about 1-2 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
