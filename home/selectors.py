"""Reads for the Home pages: this machine's real figures from psutil, the appliance from disk."""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from django.conf import settings
from django.db import connection
from django.urls import reverse

from appliance.system import paths

# The upgrade needs this much free space on the disks of the console's database and of the
# message store (guide, "Disk space requirements": 50%; LMI_UPGRADE_MIN_FREE_PERCENT).
UPGRADE_FREE_PERCENT = float(settings.UPGRADE_MIN_FREE_PERCENT)


@dataclass(frozen=True)
class DiskUsage:
    """One disk that holds upgrade-relevant data, and whether it meets the 50% free rule."""

    role: str
    path: str
    mountpoint: str
    device: str
    total: int
    used: int
    free: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 0.0

    @property
    def used_percent(self) -> float:
        return 100.0 - self.free_percent

    @property
    def meets_upgrade_requirement(self) -> bool:
        return self.free_percent >= UPGRADE_FREE_PERCENT


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
    )


def upgrade_disks() -> list[DiskUsage]:
    """The two disks the guide's 50% rule is about."""
    return [
        disk_usage("Console database", console_database_path()),
        disk_usage("Message store", paths.layout().msgstore_dir),
    ]


def reclaim_links() -> list[ReclaimLink]:
    """The guide's three places to reduce retention, and the planner that picks the values,
    linked where the page exists."""
    from django.urls import NoReverseMatch

    links = []
    for label, name in (
        ("Mail Security > Policy Objects > Message Stores", "mailsecurity:message_stores"),
        ("SMTP > Configuration > Maintenance", "smtp:maintenance"),
        ("Mail Security > Policy > Message Tracking / Reporting", "mailsecurity:message_tracking"),
        ("Reclaim planner: which retentions bring the disk to 50% free", "mailsecurity:reclaim"),
    ):
        try:
            url: str | None = reverse(name)
        except NoReverseMatch:
            url = None
        links.append(ReclaimLink(label, url))
    return links


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
