"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the whole new one, never a
truncated one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["atomic_copy", "atomic_write", "atomic_write_text", "make_temp_dir_beside"]


def _create_temp_sibling(path: str) -> tuple[str, BinaryIO]:
    """A new hidden file next to ``path``, opened for writing (binary).

    Created with ``open(..., "xb")`` (mode 0o666 less the umask, like any new file) rather than ``tempfile.mkstemp``
    (always 0600): after the rename the file must be as readable as one written directly. It keeps ``path``'s
    extension, so writers that pick a format from the file name (PIL) pick the right one.
    """
    folder, name = os.path.split(path)
    extension = os.path.splitext(name)[1]
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp{extension}")
        try:
            return tmp, open(tmp, "xb")  # noqa: SIM115 (closed by the caller)
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write_fn(file)`` (a binary file object) atomically.

    The data goes to a temporary file in the same folder (created if missing), is flushed and fsynced, then renamed
    over ``path`` (atomic on POSIX). If ``write_fn`` raises, the temporary file is removed and ``path`` is untouched.
    The file gets the mode the process umask gives any new file (e.g. 0644 under umask 022).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, f = _create_temp_sibling(path)
    try:
        with f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def make_temp_dir_beside(path: str | os.PathLike) -> str:
    """A new empty hidden folder next to ``path``, to build a tree in and then rename into place.

    Made with ``os.mkdir`` (mode 0o777 less the umask, like any new folder) rather than ``tempfile.mkdtemp`` (always
    0700, which the renamed tree would keep).
    """
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    os.makedirs(parent, exist_ok=True)
    while True:
        tmp = os.path.join(parent, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write`` of a string."""
    atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the bytes of ``src`` to ``dst`` atomically."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))
