"""The firmware logs in var/spool/updates/XPU, where the original writes its update logs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.system.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from appliance.system.errors import MalformedApplianceFile
from appliance.system.paths import layout


@dataclass(frozen=True)
class UpdateLog:
    """One log file of an update run."""

    name: str
    size: int
    modified: datetime


def list_logs(root: Path | None = None) -> list[UpdateLog]:
    """The logs, newest first; an absent directory means no update has run yet."""
    xpu = layout(root).xpu_dir
    if not xpu.is_dir():
        return []
    logs = []
    for entry in xpu.iterdir():
        if entry.is_file() and not entry.is_symlink():
            stat = entry.stat()
            logs.append(
                UpdateLog(entry.name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, tz=UTC))
            )
    return sorted(logs, key=lambda log: log.modified, reverse=True)


# The most of one log the console shows: its end, where an install's outcome is.
LOG_SHOWN_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LogText:
    """One log's text for the log page: the whole file, or its last LOG_SHOWN_BYTES."""

    log: UpdateLog
    text: str
    truncated: bool


def log_read(name: str, root: Path | None = None) -> LogText | None:
    """The log ``name`` if it is one of :func:`list_logs`' files, else None.

    The name comes from a URL, so it is only ever compared with the names listed: nothing a
    request sends becomes a path unless the directory listing produced that very name, and the
    file is opened without following a symbolic link put there since.
    """
    listed = {log.name: log for log in list_logs(root)}
    log = listed.get(name)
    if log is None:
        return None
    path = layout(root).xpu_dir / log.name  # a directory entry's name: no "/" in it
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - LOG_SHOWN_BYTES))
        data = handle.read(LOG_SHOWN_BYTES)
    truncated = size > LOG_SHOWN_BYTES
    text = data.decode("utf-8", errors="replace")
    if truncated:
        text = text.partition("\n")[2]  # start at a whole line
    return LogText(log=log, text=text, truncated=truncated)


# --- Writing an install run's log, and the run's work directory (issue 6) -----------------------

_SAFE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _log_path(name: str, root: Path | None) -> Path:
    if not name or name.startswith(".") or not set(name) <= _SAFE_NAME_CHARS:
        raise ValueError(f"invalid update log name: {name!r}")
    return layout(root).xpu_dir / name


def log_append(name: str, line: str, root: Path | None = None) -> None:
    """Append one timestamped line to the log ``name`` in XPU (created on first use).

    Flushed and fsynced per line: the log is what an administrator reads after a crash, so the
    last line before a kill must be there.
    """
    path = _log_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    text = "".join(f"{stamp} {part}\n" for part in (line.splitlines() or [""]))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def log_tail(name: str, lines: int = 200, root: Path | None = None) -> list[str]:
    """The last ``lines`` lines of the log ``name`` (empty when it does not exist yet)."""
    path = _log_path(name, root)
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def install_workdir(run_id: int, root: Path | None = None) -> Path:
    """Where one install run keeps its message-store copy (phase 4), under var/spool/updates."""
    return layout(root).root / "var" / "spool" / "updates" / f"install-{int(run_id)}"


def _folder_remove(path: Path) -> int:
    """Remove a folder of ours under var/spool/updates (never through a symlink); bytes freed."""
    if not path.is_dir() or path.is_symlink():
        return 0
    freed = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(path)
    fsync_dir(path.parent)
    return freed


def install_workdir_remove(run_id: int, root: Path | None = None) -> int:
    """Remove the run's work directory after commit or rollback; bytes freed."""
    return _folder_remove(install_workdir(run_id, root))


def install_files_save(run_id: int, files: dict[str, bytes], root: Path | None = None) -> str:
    """Keep exact copies of configuration files in the run's work directory (phase 5).

    One JSON document (content in base64 with each file's SHA-256), written atomically and
    fsynced, so a rollback can put back the very bytes even after the configuration format
    changed. Returns the SHA-256 of the document.
    """
    document = json.dumps(
        {
            name: {
                "sha256": hashlib.sha256(data).hexdigest(),
                "data": base64.b64encode(data).decode("ascii"),
            }
            for name, data in sorted(files.items())
        },
        sort_keys=True,
    )
    path = install_workdir(run_id, root) / CONFIG_FILES
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, document)
    return hashlib.sha256(document.encode()).hexdigest()


def install_files_load(run_id: int, root: Path | None = None) -> dict[str, bytes]:
    """The files :func:`install_files_save` kept, each checked against its SHA-256."""
    return _files_read(install_workdir(run_id, root) / CONFIG_FILES)


CONFIG_FILES = "config-files.json"


def _files_read(path: Path) -> dict[str, bytes]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = {str(name): entry for name, entry in raw.items()}
        files: dict[str, bytes] = {}
        for name, entry in entries.items():
            data = base64.b64decode(entry["data"], validate=True)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise MalformedApplianceFile(f"{path}: the saved copy of {name} is damaged")
            files[name] = data
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise MalformedApplianceFile(f"{path} is not a readable set of saved files: {exc}") from exc
    return files


# --- What a successful upgrade keeps for Return to the previous firmware (issue 18) -----------


def return_dir(run_id: int, root: Path | None = None) -> Path:
    """Where an upgrade run keeps its way back until it is released: the previous firmware's
    configuration files, exactly as phase 5 saved them (the slot stays in system/)."""
    return layout(root).root / "var" / "spool" / "updates" / f"return-{int(run_id)}"


def return_files_keep(run_id: int, root: Path | None = None) -> str:
    """Phase 10 of an upgrade, before its work directory goes: keep phase 5's saved
    configuration files for the way back; the SHA-256 of the kept document.

    Checked before it is written (every file against its SHA-256), written atomically and
    fsynced; run again after the work directory is gone, it finds the kept copy and returns
    its digest.
    """
    kept = return_dir(run_id, root) / CONFIG_FILES
    source = install_workdir(run_id, root) / CONFIG_FILES
    if source.is_file() and not source.is_symlink():
        _files_read(source)
        data = source.read_bytes()
        if not kept.is_file() or kept.read_bytes() != data:
            kept.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(kept, data)
    elif not kept.is_file():
        raise FileNotFoundError(f"{source}: phase 5 saved no configuration files")
    return hashlib.sha256(kept.read_bytes()).hexdigest()


def return_files_load(run_id: int, root: Path | None = None) -> tuple[dict[str, bytes], str]:
    """The configuration files kept for the way back, each checked, and the document's
    SHA-256 (compared with the one the upgrade recorded)."""
    path = return_dir(run_id, root) / CONFIG_FILES
    files = _files_read(path)
    return files, hashlib.sha256(path.read_bytes()).hexdigest()


def return_files_remove(run_id: int, root: Path | None = None) -> int:
    """The way back released (or used): its kept files removed; bytes freed."""
    return _folder_remove(return_dir(run_id, root))
