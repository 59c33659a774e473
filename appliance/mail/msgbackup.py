"""Phase 4 of the 2.8.1 upgrade: the message store kept as it is for the rollback, and the
rollback that puts it back.

The conversion never writes the 2.8.0 file: phase 7 renames a new file over the store's name.
So the rollback copy is the old file itself, kept by a second name (a hard link) made in a
moment with mail stopped, instead of a byte copy whose time grows with the store: phase 4 costs
the same for 1,000 messages or 1,000,000. The link records the file's identity (device, inode,
size, modification time); the rollback puts it back only if it is still that very file,
unwritten since, and in the old format. Where the link cannot be made (the work folder on
another filesystem) the copy is made as before, with its SHA-256 checked before it is used.

Both run under the conversion's lock (:func:`appliance.mail.msgmigrate.conversion_lock`), so
neither races a conversion step.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.mail import msgstore
from appliance.mail.msgcounts import StoreCounts, store_counts
from appliance.mail.msgmigrate import (
    BUSY_TIMEOUT_MS,
    MigrateProgress,
    ProgressCallback,
    checkpoint,
    conversion_lock,
)
from appliance.system.atomic import atomic_write_text, fsync_dir
from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.paths import layout

_COPY_BUFFER = 8 * 2**20


@dataclass(frozen=True)
class BackupResult:
    """Phase 4's copy of the store; a manifest with the same fields sits at ``path.json``.

    ``linked``: the store file itself under a second name, identified by ``identity`` (device,
    inode, size, modification time in ns); ``sha256`` and ``counts`` are empty then (reading
    the whole file is what the link avoids). Otherwise a byte copy with its SHA-256 and counts.
    """

    path: Path
    size: int
    sha256: str
    format_version: str
    counts: StoreCounts | None
    seconds: float
    linked: bool = False
    identity: tuple[int, int, int, int] | None = None
    # Where phase 4's seconds go: the log it found, the checkpoint (and how often a reader kept
    # it busy), the fsync of the file before its second name.
    wal_bytes: int = 0
    checkpoint_s: float = 0.0
    busy_retries: int = 0
    sync_s: float = 0.0

    @property
    def manifest(self) -> Path:
        return manifest_path(self.path)


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + ".json")


def _copy_hashed(
    source: Path, dest_dir: Path, prefix: str, progress: ProgressCallback | None, step: str
) -> tuple[Path, int, str]:
    """Copy to a fsynced temporary file in dest_dir; (temp path, size, sha256 hex)."""
    total = source.stat().st_size
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest_dir)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(_COPY_BUFFER)
    view = memoryview(buffer)
    try:
        with source.open("rb", buffering=0) as src, os.fdopen(fd, "wb", buffering=0) as out:
            while True:
                read = src.readinto(buffer)
                if not read:
                    break
                digest.update(view[:read])
                out.write(view[:read])
                size += read
                if progress is not None:
                    progress(MigrateProgress(step, size, total))
            os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest.hexdigest()


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, modification time in ns): the same file, not written since."""
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _link_kept(db: Path, dest: Path) -> tuple[int, int, int, int] | None:
    """The store under a second name at ``dest`` (replacing an earlier one), fsynced; its
    identity, or None where no hard link can be made there (another filesystem, no links)."""
    tmp = dest.with_name(f".{dest.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(db, tmp)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return None
        raise
    fd = os.open(db, os.O_RDONLY)
    try:
        os.fsync(fd)  # the checkpointed pages, on disk before the name that keeps them
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return file_identity(dest)


def msgstore_backup(
    dest: Path, root: Path | None = None, *, progress: ProgressCallback | None = None
) -> BackupResult:
    """Phase 4, mail stopped: the store kept as it is at ``dest``, for the rollback.

    The log is checkpointed into the file and, while this process holds the store's write lock
    (nobody can change it meanwhile), the file gets a second name at ``dest``: a hard link,
    whatever the store's size. Where no link can be made, a checksummed, fsynced byte copy. The
    manifest (``dest.json``: size, identity or SHA-256 and counts, format) appears by rename; a
    rerun replaces both.
    """
    started = time.monotonic()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    db = layout(root).msgstore_db
    wal_bytes = msgstore.wal_bytes(db)
    checkpoint_s, busy_retries, sync_s = 0.0, 0, 0.0
    with conversion_lock(root):
        version = msgstore.format_version(root)
        for _ in range(20):
            began = time.monotonic()
            busy_retries += checkpoint(db)
            checkpoint_s += time.monotonic() - began
            conn = msgstore.connect(root)
            conn.isolation_level = None
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                if msgstore.wal_bytes(db):
                    continue  # a write slipped in between checkpoint and lock: again
                began = time.monotonic()
                identity = _link_kept(db, dest)
                sync_s = time.monotonic() - began
                if identity is None:
                    counts: StoreCounts | None = store_counts(root)
                    tmp, size, sha = _copy_hashed(
                        db, dest.parent, f".{dest.name}.", progress, "backup"
                    )
                else:
                    counts, size, sha = None, identity[2], ""
                    if progress is not None:
                        progress(MigrateProgress("backup", size, size))
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
            break
        else:
            raise ApplianceError("the message store kept changing; no consistent backup")
        if identity is None:
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        result = BackupResult(
            path=dest,
            size=size,
            sha256=sha,
            format_version=version,
            counts=counts,
            seconds=round(time.monotonic() - started, 3),
            linked=identity is not None,
            identity=identity,
            wal_bytes=wal_bytes,
            checkpoint_s=round(checkpoint_s, 3),
            busy_retries=busy_retries,
            sync_s=round(sync_s, 3),
        )
        data = asdict(result)
        data["path"] = str(dest)
        atomic_write_text(manifest_path(dest), json.dumps(data, indent=2, sort_keys=True))
    return result


def read_backup(backup: Path) -> BackupResult:
    """The manifest of a backup made by :func:`msgstore_backup`."""
    manifest = manifest_path(Path(backup))
    try:
        data = json.loads(manifest.read_text())
        data["path"] = Path(backup)
        data["counts"] = StoreCounts.from_json(data["counts"]) if data["counts"] else None
        if data.get("identity") is not None:
            data["identity"] = tuple(data["identity"])
        return BackupResult(**data)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MalformedApplianceFile(f"no readable backup manifest at {manifest}: {exc}") from exc


def _hash_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in place."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(_COPY_BUFFER)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
            size += read
    return size, digest.hexdigest()


def msgstore_restore(backup: BackupResult | Path, root: Path | None = None) -> None:
    """Roll back: put the phase-4 copy back as the store, after checking it is that copy.

    A kept link must still be the very file phase 4 named (device, inode, size, modification
    time) and in the old format; a byte copy must match its SHA-256. It is renamed over the
    store, so a rollback needs no new space on a disk that may be full (a copy, checked while
    it is written, only when the copy is on another filesystem). Run again after a rename that
    was not recorded (its process died), it finds the copy gone and the store being it, and
    does nothing.
    """
    info = backup if isinstance(backup, BackupResult) else read_backup(backup)
    db = layout(root).msgstore_db
    db.parent.mkdir(parents=True, exist_ok=True)
    with conversion_lock(root):
        if not info.path.exists():
            if db.is_file() and _is_backup(db, info):
                return  # renamed into place by an earlier pass
            raise MalformedApplianceFile(f"message store backup {info.path} is gone")
        if not _is_backup(info.path, info):
            raise MalformedApplianceFile(
                f"message store backup {info.path} does not match its manifest"
            )
        with contextlib.suppress(sqlite3.Error, ApplianceError):
            checkpoint(db)
        wal, shm = msgstore.wal_files(db)
        wal.unlink(missing_ok=True)
        shm.unlink(missing_ok=True)
        try:
            os.chmod(info.path, 0o644)
            os.replace(info.path, db)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _restore_by_copy(info, db)
        fsync_dir(info.path.parent)
        fsync_dir(db.parent)


def _is_backup(path: Path, info: BackupResult) -> bool:
    """``path`` holds what phase 4 kept: the same unwritten file, or a copy with its digest."""
    if not info.linked:
        return _hash_file(path) == (info.size, info.sha256)
    if info.identity is None or file_identity(path) != tuple(info.identity):
        return False
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            version = msgstore.connection_format(conn)
        finally:
            conn.close()
    except (sqlite3.Error, ApplianceError):
        return False
    return version == info.format_version


def _restore_by_copy(info: BackupResult, db: Path) -> None:
    """The copy on another filesystem: copied next to the store, checked, renamed."""
    tmp, size, sha = _copy_hashed(info.path, db.parent, ".msgstore-restore-", None, "restore")
    try:
        if (size, sha) != (info.size, info.sha256):
            raise MalformedApplianceFile(f"message store backup {info.path} changed while read")
        os.chmod(tmp, 0o644)
        os.replace(tmp, db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
