"""A copy-on-write snapshot of the appliance root in a scratch folder, for the upgrade rehearsal.

The rehearsal runs the install's conversion against this snapshot while the live appliance keeps
serving mail, so the snapshot must cost little and must never let a write reach the live files:

- every directory is a real directory of its own (a phase may add, rename or remove entries);
- a file no phase writes in place is a hard link to the live file (no bytes copied). Every
  writer of the appliance replaces such files by rename (appliance.system.atomic), which gives
  the scratch name a new file and leaves the live one as it was;
- a file a phase *does* open for writing (:data:`COPIED`: the message store and its log, the
  configuration XML, the firmware level files, the firmware slots and their bookkeeping) is a
  real copy: a hard link to it would write the live file. Copies are reflinks where the file
  system can (``cp --reflink=auto``: shared blocks, copied on write), else plain copies;
- the message store is copied through SQLite's online backup, one read transaction: a plain
  copy of a database the mail service is writing could mix pages of two moments;
- symbolic links are made again with the same target, except an absolute one into the live
  root, which is pointed at the same place in the scratch root instead.

Where hard links cannot be made (another file system, a protected link policy) everything is
copied, after a free-space check that says what is missing. The scratch folder sits beside the
root (``.<name>.rehearsal``), never inside it, so the live tree stays byte-identical.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.system.errors import ApplianceError
from appliance.system.paths import appliance_root

# Paths (relative to the root) that a phase opens for writing, copied rather than linked.
COPIED = (
    "var/lib/mailsec/msgstore",  # phases 2, 4, 7, 9: the store, its -wal/-shm, the 2.8.1 file
    "etc/mailsec/cpe",  # phase 8: the configuration XML (and its directory lock)
    "etc/firmware-release",  # phase 6: the firmware level
    "etc/SuSE-release",
    "system",  # phases 2, 6, 9: the slots, the active link, the firmware bookkeeping
)
STORE = "var/lib/mailsec/msgstore/msgstore.db"
# Room the conversion itself needs beside the copies: the 2.8.1 store file and a new slot.
HEADROOM = 1.1
FICLONE = 0x40049409  # linux/fs.h: share the blocks of one file with another (a reflink)

DiskUsage = Callable[[str], Any]  # returns an object with .free (bytes): shutil.disk_usage


class SnapshotError(ApplianceError):
    """The snapshot cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class Snapshot:
    """What the snapshot made, for the rehearsal's report."""

    root: Path
    method: str  # "hardlink" or "copy" (hard links impossible here)
    linked: int  # files shared with the live root by a hard link
    copied: int  # files copied (reflinked where the file system can)
    bytes_copied: int
    seconds: float


def scratch_path(root: Path | None = None) -> Path:
    """Where the rehearsal's snapshot of ``root`` lives: beside it, on the same file system."""
    base = appliance_root(root).resolve()
    return base.parent / f".{base.name}.rehearsal"


def snapshot_remove(scratch: Path) -> bool:
    """Remove a scratch folder (read-only directories of a slot image included); True if
    there was one."""
    if not scratch.exists() and not scratch.is_symlink():
        return False
    if scratch.is_symlink() or not scratch.is_dir():
        scratch.unlink()
        return True
    for dirpath, _, _ in os.walk(scratch):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(scratch)
    return True


def _is_copied(relative: str) -> bool:
    return any(relative == path or relative.startswith(path + "/") for path in COPIED)


def _clone(source: Path, target: Path) -> None:
    """A reflink of ``source`` where the file system allows, else a plain copy; mode kept."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:
            shutil.copyfileobj(src, dst, 1024 * 1024)
    shutil.copymode(source, target)


def _copy_store(source: Path, target: Path) -> None:
    """The message store as one consistent moment, whatever the mail service writes meanwhile
    (SQLite's online backup in a single step holds one read transaction)."""
    src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    shutil.copymode(source, target)


def _plan(live: Path) -> tuple[list[tuple[str, os.stat_result]], int, int]:
    """Every entry under ``live`` with its lstat, and the bytes of the copied and the linked
    regular files."""
    entries: list[tuple[str, os.stat_result]] = []
    copied = linked = 0
    for dirpath, dirnames, filenames in os.walk(live):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath, name)
            st = os.lstat(path)
            relative = path.relative_to(live).as_posix()
            entries.append((relative, st))
            if stat.S_ISREG(st.st_mode):
                if _is_copied(relative):
                    copied += st.st_size
                else:
                    linked += st.st_size
    return entries, copied, linked


def _links_work(live: Path, scratch: Path, entries: list[tuple[str, os.stat_result]]) -> bool:
    """Whether a hard link from the live root into the scratch folder can be made here."""
    probe = next((rel for rel, st in entries if stat.S_ISREG(st.st_mode)), None)
    if probe is None:
        return True
    target = scratch / ".link-probe"
    try:
        os.link(live / probe, target)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
            return False
        raise
    target.unlink()
    return True


def _check_space(scratch: Path, needed: int, usage: DiskUsage, why: str) -> None:
    free = int(usage(str(scratch.parent)).free)
    if needed > free:
        raise SnapshotError(
            f"The rehearsal needs {_mib(needed)} free beside the appliance root for its copy "
            f"({why}), and {_mib(free)} is free on that disk: free space there (Mail Security > "
            "Reclaim disk space) and rehearse again."
        )


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _symlink_target(live: Path, scratch: Path, target: str) -> str:
    """The same target, unless it is absolute and inside the live root: then the scratch's."""
    if not os.path.isabs(target):
        return target
    path = Path(target)
    if path == live or path.is_relative_to(live):
        return str(scratch / path.relative_to(live))
    return target


def snapshot_create(
    root: Path | None = None,
    scratch: Path | None = None,
    *,
    disk_usage: DiskUsage | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Snapshot:
    """Make the snapshot of ``root`` at ``scratch`` (default :func:`scratch_path`).

    A scratch folder left by an earlier rehearsal is removed first. Raises
    :class:`SnapshotError` when the disk cannot hold what must be copied. The live root is
    only read: nothing is written there, not even an access to its message store's log.
    """
    started = time.monotonic()
    live = appliance_root(root).resolve()
    scratch = scratch or scratch_path(live)
    usage = disk_usage or shutil.disk_usage
    snapshot_remove(scratch)
    entries, copied_bytes, linked_bytes = _plan(live)
    scratch.mkdir(mode=0o700)
    try:
        method = "hardlink" if _links_work(live, scratch, entries) else "copy"
        if method == "copy":
            _check_space(
                scratch,
                int((copied_bytes + linked_bytes) * HEADROOM) + copied_bytes,
                usage,
                "hard links to the live files cannot be made on this file system, so every "
                "file is copied",
            )
        else:
            _check_space(
                scratch,
                int(copied_bytes * HEADROOM) + copied_bytes,
                usage,
                "the message store, the configuration and the firmware slots are copied",
            )
        linked = copied = 0
        bytes_copied = 0
        directories: list[tuple[Path, int]] = []
        for relative, st in entries:
            if should_stop is not None and should_stop():
                raise SnapshotError("The rehearsal was stopped while its snapshot was made.")
            source, target = live / relative, scratch / relative
            if stat.S_ISDIR(st.st_mode):
                target.mkdir(mode=0o700)
                directories.append((target, stat.S_IMODE(st.st_mode)))
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(_symlink_target(live, scratch, os.readlink(source)), target)
            elif not stat.S_ISREG(st.st_mode):
                continue  # a socket or FIFO of a running service: no phase reads it
            elif relative == STORE:
                _copy_store(source, target)
                copied += 1
                bytes_copied += target.stat().st_size
            elif relative in (STORE + "-wal", STORE + "-shm"):
                continue  # the backup above holds what the log held; SQLite makes new ones
            elif method == "copy" or _is_copied(relative):
                _clone(source, target)
                copied += 1
                bytes_copied += st.st_size
            else:
                os.link(source, target)
                linked += 1
        for directory, mode in reversed(directories):
            os.chmod(directory, mode)
    except BaseException:
        snapshot_remove(scratch)
        raise
    return Snapshot(
        root=scratch,
        method=method,
        linked=linked,
        copied=copied,
        bytes_copied=bytes_copied,
        seconds=round(time.monotonic() - started, 3),
    )
