"""The firmware logs in var/spool/updates/XPU, where the original writes its update logs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.paths import layout


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
