"""Reads for the Home pages: this machine's real figures from psutil, the appliance from disk."""

from __future__ import annotations

import math
import os
import platform
import socket
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Protocol

import psutil
from django.conf import settings
from django.db import connection
from django.urls import reverse

from appliance.config import configbackup
from appliance.firmware import updatelogs
from appliance.mail import retention
from appliance.system import paths
from appliance.system.errors import ApplianceError
from mailsecurity.planner import (
    FLOOR_DAYS,
    DiskAdvice,
    Lever,
    disk_advice,
    retention_levers,
    retention_sources,
)


def upgrade_free_percent() -> float:
    """The free space the upgrade needs on the disks of the console's database and of the
    message store: the guide's 50% unless LMI_UPGRADE_MIN_FREE_PERCENT sets another figure.

    Read on every call, never cached at import, so every text states the rule in force.
    """
    return float(settings.UPGRADE_MIN_FREE_PERCENT)


def __getattr__(name: str) -> float:
    """``UPGRADE_FREE_PERCENT`` for the callers that read it as a constant: the live figure."""
    if name == "UPGRADE_FREE_PERCENT":
        return upgrade_free_percent()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DiskUsage:
    """One disk that holds upgrade-relevant data, and whether it meets the free-space rule.

    ``reserved`` is what the file system keeps for root (statvfs ``f_bfree - f_bavail``
    blocks): the services cannot write there, so used + free falls short of the size by it.
    """

    role: str
    path: str
    mountpoint: str
    device: str
    total: int
    used: int
    free: int
    reserved: int = 0
    required_percent: float = field(default_factory=upgrade_free_percent)

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 0.0

    @property
    def used_percent(self) -> float:
        return 100.0 - self.free_percent

    @property
    def meets_upgrade_requirement(self) -> bool:
        return self.free_percent >= self.required_percent

    @property
    def required_free(self) -> int:
        return math.ceil(self.total * self.required_percent / 100.0)

    @property
    def needed(self) -> int:
        """Bytes to free before the disk meets the rule."""
        return max(0, self.required_free - self.free)

    @cached_property
    def advice(self) -> DiskAdvice:
        """What each lever on this disk frees, measured when a page first asks.

        Lazy because only a failing disk's page shows it, and the pages that show a disk (Home,
        Resources, the disk notice, the reclaim planner) then all get it without each view
        measuring it. A frozen dataclass still has a __dict__, so the result is kept per disk.
        """
        return disk_advice_for(self)


@dataclass(frozen=True)
class ReclaimLink:
    """Where space on a disk can be reclaimed (the guide's "Reclaiming disk space")."""

    label: str
    url: str | None


def _existing_ancestor(path: Path) -> Path:
    """psutil needs a path that exists; a database not created yet lives on its parent's disk."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mountpoint(path: Path) -> tuple[str, str]:
    """The mount point and device holding path: the longest mount point that contains it."""
    best = ("/", "")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(
            mount
        ) >= len(best[0]):
            best = (mount, part.device)
    return best


def console_database_path() -> Path:
    """Where the console's database keeps its data: the SQLite file or PostgreSQL's data dir."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return Path(str(connection.settings_dict["NAME"]))
    # PostgreSQL on this host: its data directory is the disk that fills. Readable only by a
    # superuser; fall back to the console's var/ when the server is remote or we may not ask.
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW data_directory")
            row = cursor.fetchone()
        if row and Path(row[0]).exists():
            return Path(row[0])
    except Exception:  # noqa: S110 - permission denied or remote server
        pass
    return Path(settings.VAR_DIR)


def disk_usage(role: str, path: Path) -> DiskUsage:
    """Usage of the disk holding path, measured now."""
    existing = _existing_ancestor(path)
    usage = psutil.disk_usage(str(existing))
    mount, device = _mountpoint(existing)
    return DiskUsage(
        role=role,
        path=str(path),
        mountpoint=mount,
        device=device,
        total=usage.total,
        used=usage.used,
        free=usage.free,
        # psutil's used and free come from the same statvfs fields (used = blocks - bfree,
        # free = bavail), so used + free + reserved is the size; a second reading a moment
        # later may differ, and is held to that sum so the figures always add up.
        reserved=min(
            reserved_for_root(os.statvfs(existing)),
            max(0, usage.total - usage.used - usage.free),
        ),
    )


def reserved_for_root(stats: os.statvfs_result) -> int:
    """Blocks free to root only (ext4 keeps 5% by default): free for df's root, not for us."""
    return max(0, stats.f_bfree - stats.f_bavail) * stats.f_frsize


def upgrade_disks() -> list[DiskUsage]:
    """The two disks the upgrade's free-space rule is about."""
    return [
        disk_usage("Console database", console_database_path()),
        disk_usage("Message store", paths.layout().msgstore_dir),
    ]


def reclaim_links() -> list[ReclaimLink]:
    """The guide's three places to reduce retention, and the planner that picks the values,
    linked where the page exists."""
    return [
        ReclaimLink(label, _url(name))
        for label, name in (
            ("Mail Security > Policy Objects > Message Stores", "mailsecurity:message_stores"),
            ("SMTP > Configuration > Maintenance", "smtp:maintenance"),
            (
                "Mail Security > Policy > Message Tracking / Reporting",
                "mailsecurity:message_tracking",
            ),
            (
                f"Reclaim planner: which retentions bring the disk to "
                f"{upgrade_free_percent():.0f}% free",
                "mailsecurity:reclaim",
            ),
        )
    ]


# --- The levers on a disk (issue 16) -------------------------------------------------------------

# The age distribution is a GROUP BY over the whole store: the Resources page polls every few
# seconds, so what it says is kept while the store's files are unchanged, for at most this long.
_RETENTION_CACHE_SECONDS = 30.0
_retention_cache: dict[tuple[object, ...], tuple[float, tuple[Lever, ...]]] = {}
_retention_lock = threading.Lock()


def _url(name: str) -> str | None:
    from django.urls import NoReverseMatch

    try:
        return reverse(name)
    except NoReverseMatch:
        return None


def _device(path: Path) -> int:
    return os.stat(_existing_ancestor(path)).st_dev


def _retention_levers() -> tuple[Lever, ...]:
    """Each store and log at the floor, and the store's free pages, from the real store."""
    the_layout = paths.layout()
    db = the_layout.msgstore_db
    stamp: list[object] = [str(db)]
    # The store and its log, and the SMTP settings that hold the logs' retentions.
    for part in (db, db.with_name(db.name + "-wal"), the_layout.smtp_xml):
        try:
            stat = part.stat()
            stamp += [stat.st_size, stat.st_mtime_ns]
        except FileNotFoundError:
            stamp += [None, None]
    key = tuple(stamp)
    now = time.monotonic()
    with _retention_lock:
        hit = _retention_cache.get(key)
        if hit is not None and now - hit[0] < _RETENTION_CACHE_SECONDS:
            return hit[1]
    distribution = retention.age_distribution()
    sources = retention_sources(retention.retention_settings(), distribution)
    urls = {
        "store": _url("mailsecurity:message_stores"),
        "smtp_log": _url("smtp:maintenance"),
        "tracking_log": _url("mailsecurity:message_tracking"),
        "free_pages": _url("mailsecurity:reclaim"),
    }
    levers = tuple(
        retention_levers(
            sources,
            free_pages=distribution.free_pages_bytes,
            floor_days=FLOOR_DAYS,
            urls={k: v for k, v in urls.items() if v},
        )
    )
    with _retention_lock:
        _retention_cache.clear()
        _retention_cache[key] = (now, levers)
    return levers


class _File(Protocol):
    @property
    def size(self) -> int: ...


def _files_lever(
    files: Sequence[_File], *, key: str, label: str, how: str, page: str
) -> Lever | None:
    """Files the administrator removes by hand, as one lever that frees their total size; no
    lever when there are none. ``label`` gets their number."""
    if not files:
        return None
    return Lever(
        key=key,
        label=label.format(count=len(files)),
        bytes=sum(file.size for file in files),
        how=how,
        url=_url(page),
    )


def _backup_lever() -> Lever | None:
    """Every configuration backup but the newest: a restore point stays."""
    return _files_lever(
        configbackup.backup_list()[1:],
        key="config_backups",
        label="Old configuration backups ({count}; the newest is kept)",
        how="delete them on Backup & Restore > System after downloading any you want to keep",
        page="backups:system",
    )


def _update_log_lever() -> Lever | None:
    return _files_lever(
        updatelogs.list_logs(),
        key="update_logs",
        label="Firmware logs in /var/spool/updates/XPU ({count})",
        how="read them on Updates & Licensing, then remove the old ones as root over SSH",
        page="upgrades:index",
    )


def disk_levers(disk: DiskUsage) -> list[Lever]:
    """The levers whose data lives on this disk, with what each frees at most.

    A lever elsewhere frees nothing here, so each is counted only on the disk (device) that
    holds it. A part that cannot be read is left out rather than guessed.
    """
    device = _device(Path(disk.path))
    the_layout = paths.layout()
    levers: list[Lever] = []
    try:
        if the_layout.msgstore_db.exists() and _device(the_layout.msgstore_db) == device:
            levers.extend(_retention_levers())
    except (ApplianceError, OSError, sqlite3.Error):
        pass
    for where, measure in (
        (the_layout.config_backups_dir, _backup_lever),
        (the_layout.xpu_dir, _update_log_lever),
    ):
        try:
            if _device(where) == device and (lever := measure()) is not None:
                levers.append(lever)
        except (ApplianceError, OSError):
            continue
    return levers


def _holds(disk: DiskUsage, path: Path) -> bool:
    try:
        return _device(path) == _device(Path(disk.path))
    except OSError:
        return False


def disk_advice_for(disk: DiskUsage) -> DiskAdvice:
    """The disk's figures against the rule in force, with every lever on it."""
    return disk_advice(
        total=disk.total,
        used=disk.used,
        free=disk.free,
        reserved=disk.reserved,
        required_percent=disk.required_percent,
        levers=disk_levers(disk),
        holds_message_store=_holds(disk, paths.layout().msgstore_dir),
        holds_console_database=_holds(disk, console_database_path()),
    )


@dataclass(frozen=True)
class HostFigures:
    """Memory, CPU and load of the machine the console runs on."""

    memory_total: int
    memory_used: int
    memory_available: int
    memory_percent: float
    swap_total: int
    swap_used: int
    cpu_count: int
    cpu_percent: float
    load_1: float
    load_5: float
    load_15: float
    boot_time: datetime
    uptime_seconds: int


def host_figures() -> HostFigures:
    """Measured now. cpu_percent samples over 0.2 s so the first call is not a meaningless 0."""
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load = os.getloadavg()
    boot = psutil.boot_time()
    return HostFigures(
        memory_total=mem.total,
        memory_used=mem.total - mem.available,
        memory_available=mem.available,
        memory_percent=mem.percent,
        swap_total=swap.total,
        swap_used=swap.used,
        cpu_count=psutil.cpu_count() or 1,
        cpu_percent=psutil.cpu_percent(interval=0.2),
        load_1=load[0],
        load_5=load[1],
        load_15=load[2],
        boot_time=datetime.fromtimestamp(boot, tz=UTC),
        uptime_seconds=int(time.time() - boot),
    )


def host_platform() -> dict[str, str]:
    """The host's own kernel and name, shown beside the appliance's recorded OS release."""
    return {
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "host": socket.gethostname(),
    }
