"""Restoring a configuration backup: the plan, and applying it all or nothing.

Every new file is first written next to its target and synced; a journal (synced) then records
the plan and is marked committed; only then are files renamed into place, the store retention
set in one transaction and files the backup lacks removed. An error rolls everything back; a
crash is rolled forward from the journal by :func:`restore_recover`.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.backupfiles import check_target, plain_files, store_retention
from appliance.config.backupformat import BackupError, BackupRejected
from appliance.config.configbackup import LoadedBackup
from appliance.mail import msgstore
from appliance.system.atomic import atomic_write_text, exclusive_lock, fsync_dir
from appliance.system.journal import journal_recover
from appliance.system.paths import Layout, appliance_root, layout

_STAGED = ".lmirestore-new"
_OLD = ".lmirestore-old"


class ConfirmationRequired(BackupError):
    """An unverified backup: restored only once an administrator confirmed ``files``."""

    def __init__(self, message: str, files: list[str]) -> None:
        super().__init__(message)
        self.files = files


@dataclass(frozen=True)
class RestorePlan:
    """What a restore would do to the appliance as it is now (paths under the root)."""

    writes: list[str]
    removes: list[str]


@dataclass(frozen=True)
class RestoreResult:
    """What a restore changed."""

    files_written: int
    files_removed: int
    stores_updated: int
    converted_from: str | None


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sidecar(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}{suffix}")


def _rename_into_place(source: Path, target: Path) -> None:
    """One step of applying a restore (its own function so tests can interrupt between steps)."""
    os.replace(source, target)


def _apply_retention(root: Path, stores: dict[str, int]) -> int:
    """Set every named store's retention in one transaction; missing stores are created."""
    if not stores or not layout(root).msgstore_db.is_file():
        return 0
    conn = msgstore.connect(root)
    try:
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            changed = 0
            for name, days in stores.items():
                row = conn.execute(
                    "SELECT retention_days FROM message_store WHERE name = ?", (name,)
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO message_store (name, retention_days) VALUES (?, ?)",
                        (name, days),
                    )
                    changed += 1
                elif int(row[0]) != days:
                    conn.execute(
                        "UPDATE message_store SET retention_days = ? WHERE name = ?", (days, name)
                    )
                    changed += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise BackupError(f"The message stores' retention could not be restored: {exc}") from exc
    finally:
        conn.close()
    return changed


def _journal_write(the_layout: Layout, journal: dict[str, Any]) -> None:
    the_layout.config_restore_journal.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        the_layout.config_restore_journal, json.dumps(journal, indent=2) + "\n", 0o600
    )


def _roll_forward(root: Path, journal: dict[str, Any]) -> None:
    """Finish a committed restore; every step is idempotent, so a second crash is harmless."""
    directories: set[Path] = set()
    for op in journal["write"]:
        target, staged = root / op["target"], root / op["staged"]
        if staged.exists():
            _rename_into_place(staged, target)
        directories.add(target.parent)
    for op in journal["remove"]:
        target, old = root / op["target"], root / op["old"]
        if target.exists() and not old.exists():
            _rename_into_place(target, old)
        directories.add(target.parent)
    for directory in directories:
        fsync_dir(directory)
    _apply_retention(root, journal["store_retention"])
    _discard(root, journal)


def _roll_back(root: Path, journal: dict[str, Any]) -> None:
    """Undo a restore that failed with an error (not a crash): put every old file back."""
    for op in journal["remove"]:
        target, old = root / op["target"], root / op["old"]
        if old.exists() and not target.exists():
            os.replace(old, target)
    for op in journal["write"]:
        target, staged = root / op["target"], root / op["staged"]
        old = root / op["old"] if op["old"] else None
        if old is not None and old.exists():
            os.replace(old, target)
        elif old is None and not staged.exists():
            target.unlink(missing_ok=True)  # it did not exist before the restore
        staged.unlink(missing_ok=True)
    _discard(root, journal)


def _discard(root: Path, journal: dict[str, Any]) -> None:
    """Remove the leftovers (staged files, old copies) and then the journal itself."""
    for op in journal["write"]:
        (root / op["staged"]).unlink(missing_ok=True)
        if op["old"]:
            (root / op["old"]).unlink(missing_ok=True)
    for op in journal["remove"]:
        (root / op["old"]).unlink(missing_ok=True)
    the_layout = layout(root)
    the_layout.config_restore_journal.unlink(missing_ok=True)
    fsync_dir(the_layout.config_restore_journal.parent)


def _recover_locked(root: Path) -> bool:
    return journal_recover(
        layout(root).config_restore_journal,
        committed="committed",
        finish=functools.partial(_roll_forward, root),
        # Interrupted while staging: nothing was replaced yet.
        undo=functools.partial(_roll_back, root),
        damaged=BackupError,
    )


def restore_recover(root: Path | None = None) -> bool:
    """Finish a restore that a crash interrupted; True when one was rolled forward.

    A restore interrupted before its journal said "committed" had not replaced anything, so its
    staged files are removed instead. Safe to call at any time (workers call it on start).
    """
    base = appliance_root(root)
    the_layout = layout(base)
    if not the_layout.config_restore_journal.exists():
        return False
    with exclusive_lock(the_layout.config_restore_lock):
        return _recover_locked(base)


def _plan(loaded: LoadedBackup, root: Path) -> tuple[list[tuple[str, Path, bytes]], list[Path]]:
    """``(files to write, files to remove)``, checked against the appliance as it is now."""
    the_layout = layout(root)
    writes: list[tuple[str, Path, bytes]] = []
    for relative, data in sorted(loaded.files.items()):
        target = check_target(relative, root)
        for parent in target.parents:
            if parent == root:
                break
            if parent.exists() and not parent.is_dir():
                raise BackupRejected(
                    f'The backup\'s "{relative[:200]}" would be written beneath a file.'
                )
        if target.is_file() and target.read_bytes() == data:
            continue
        writes.append((relative, target, data))
    keep = {root / relative for relative in loaded.files}
    removes = [
        path
        for path in [
            *plain_files(the_layout.cpe_dir, "*.xml"),
            *plain_files(the_layout.network_dir, "*"),
        ]
        if path not in keep
    ]
    return writes, removes


def restore_plan(loaded: LoadedBackup, root: Path | None = None) -> RestorePlan:
    """The files a restore of ``loaded`` would write and remove now (nothing changes).

    This is the list an administrator confirms before an unverified backup is restored.
    """
    base = Path(os.path.realpath(appliance_root(root)))
    writes, removes = _plan(loaded, base)
    return RestorePlan(
        writes=[relative for relative, _, _ in writes],
        removes=[path.relative_to(base).as_posix() for path in removes],
    )


def _check_confirmed(
    loaded: LoadedBackup, writes: list[tuple[str, Path, bytes]], confirmed: Collection[str]
) -> None:
    """An unverified backup writes only files an administrator saw listed and confirmed."""
    if loaded.verified:
        return
    planned = [relative for relative, _, _ in writes]
    unconfirmed = [relative for relative in planned if relative not in confirmed]
    if unconfirmed or not confirmed:
        raise ConfirmationRequired(
            "This backup is unverified: it was not made by this appliance, or it was changed "
            "since. Check the files it will write and confirm them to restore it: "
            + (", ".join("/" + relative for relative in planned[:50]) or "(none)")
            + (f" and {len(planned) - 50} more" if len(planned) > 50 else "")
            + ".",
            planned,
        )


def backup_restore(
    loaded: LoadedBackup,
    root: Path | None = None,
    *,
    confirmed: Collection[str] = (),
    progress: Callable[[int, str], None] | None = None,
) -> RestoreResult:
    """Make the appliance's configuration the backup's, all or nothing.

    Every new file is first written next to its target and synced; a journal (synced) then
    records the plan and is marked committed; only then are files renamed into place, the store
    retention set in one transaction and files the backup lacks removed (in the configuration
    and network directories only). An error rolls everything back; a crash is rolled forward by
    :func:`restore_recover` from the journal. Restores are serialised with a lock.

    An unverified backup (see :mod:`appliance.config.backupmac`) is restored only when ``confirmed``
    holds every file the plan writes, as :func:`restore_plan` listed them
    (:class:`ConfirmationRequired` otherwise, nothing changed). ``progress(step, what)`` is
    told when staging (step 1) and putting in place (step 2) begin.
    """
    report = progress or (lambda step, what: None)
    base = Path(os.path.realpath(appliance_root(root)))
    the_layout = layout(base)
    the_layout.config_restore_lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(the_layout.config_restore_lock):
        _recover_locked(base)
        writes, removes = _plan(loaded, base)
        _check_confirmed(loaded, writes, confirmed)
        stores = dict(loaded.appliance_settings.get("store_retention", {}))
        current = store_retention(base)
        stores_updated = sum(1 for name, days in stores.items() if current.get(name) != days)
        journal: dict[str, Any] = {
            "state": "staging",
            "backup": loaded.header.name,
            "write": [
                {
                    "target": target.relative_to(base).as_posix(),
                    "staged": _sidecar(target, _STAGED).relative_to(base).as_posix(),
                    "old": _sidecar(target, _OLD).relative_to(base).as_posix()
                    if target.exists()
                    else None,
                }
                for _, target, _ in writes
            ],
            "remove": [
                {
                    "target": path.relative_to(base).as_posix(),
                    "old": _sidecar(path, _OLD).relative_to(base).as_posix(),
                }
                for path in removes
            ],
            "store_retention": stores,
        }
        resolved = base
        _journal_write(the_layout, journal)
        report(1, "Writing the new files beside the old ones")
        try:
            directories: set[Path] = set()
            for (_, target, data), op in zip(writes, journal["write"], strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
                _write_synced(resolved / op["staged"], data, mode)
                if op["old"]:
                    old = resolved / op["old"]
                    old.unlink(missing_ok=True)
                    os.link(target, old)
                directories.add(target.parent)
            for directory in directories:
                fsync_dir(directory)
        except BaseException:
            _roll_back(resolved, journal)
            raise
        journal["state"] = "committed"
        _journal_write(the_layout, journal)
        report(2, "Putting the new files in place")
        try:
            _roll_forward(resolved, journal)
        except Exception:
            _roll_back(resolved, journal)
            _apply_retention(base, {k: v for k, v in current.items() if k in stores})
            raise
    return RestoreResult(
        files_written=len(writes),
        files_removed=len(removes),
        stores_updated=stores_updated,
        converted_from=loaded.converted_from,
    )
