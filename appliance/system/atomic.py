"""Durable, all-or-nothing file writes.

The appliance's configuration is read by daemons at any moment and must survive a power cut in
the middle of a save, so no file is ever rewritten in place: the new content goes to a temporary
file in the same directory, is fsynced, renamed over the old name (atomic on POSIX), and then the
directory is fsynced so the rename itself is on disk. A reader sees the old file or the new one,
never half of either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DEFAULT_MODE = 0o644


def fsync_dir(path: Path) -> None:
    """Flush a directory entry table, making a completed rename or create durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without error.

    For large outputs (a system backup tar) that are streamed rather than held in memory. The
    file keeps the permissions of the file it replaces, or gets ``mode`` (default 0644): the
    temporary file is created 0600, which would otherwise leak into the final file.
    """
    path = Path(path)
    directory = path.parent
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = DEFAULT_MODE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` durably (temp file, fsync, rename, fsync directory)."""
    with atomic_open(path, mode) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with UTF-8 ``text`` durably; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


@contextlib.contextmanager
def exclusive_lock(path: Path, mode: int = 0o600) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block.

    One writer at a time across processes (two publishes of a feed, two system backups): the
    lock file itself holds no data, and the kernel releases the lock if the holder dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_symlink(target: str, path: Path) -> None:
    """Point the symbolic link ``path`` at ``target`` durably, never leaving it missing.

    A new link is made under a temporary name beside it (``.<name>.<random>.tmp``, the pattern
    of :func:`atomic_open`'s files, so one sweep finds what a kill left of either), renamed over
    ``path`` (atomic on POSIX) and the directory fsynced.
    """
    path = Path(path)
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.symlink(target, temporary)
            break
        except FileExistsError:
            continue
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
