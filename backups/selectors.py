"""Reads of Backup & Restore > System: the backups, the schedule, the image and its jobs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from appliance.config import configbackup
from appliance.config.backupdiff import DiffItem
from appliance.config.backupformat import BackupHeader
from appliance.system import rescue
from appliance.system.errors import ApplianceError
from backups.models import SYSTEM_KINDS, BackupSettings
from jobs.models import ACTIVE_STATES, Job


@dataclass(frozen=True)
class SystemImageView:
    """What the page says about the rescue partition: the image, or why it cannot tell."""

    info: rescue.SystemBackupInfo | None
    error: str = ""


def backup_settings() -> BackupSettings:
    """The schedule (its defaults when it was never saved)."""
    return BackupSettings.objects.filter(pk=1).first() or BackupSettings(pk=1)


def config_backups() -> tuple[list[BackupHeader], str]:
    """The configuration backups, newest first, and an error to show when they cannot be read."""
    try:
        return configbackup.backup_list(), ""
    except (ApplianceError, OSError) as exc:
        return [], f"The configuration backups cannot be read: {exc}"


def config_backup(name: str) -> BackupHeader | None:
    """One backup's header (readable without the passphrase), or None when absent or invalid."""
    try:
        return configbackup.backup_header(name)
    except (KeyError, ValueError, ApplianceError, OSError):
        return None


def system_image() -> SystemImageView:
    try:
        return SystemImageView(rescue.system_backup_info())
    except (ApplianceError, OSError) as exc:
        return SystemImageView(None, f"The system backup image cannot be read: {exc}")


def active_system_job() -> Job | None:
    return Job.objects.filter(kind__in=SYSTEM_KINDS, state__in=ACTIVE_STATES).first()


def latest_system_job() -> Job | None:
    return Job.objects.filter(kind__in=SYSTEM_KINDS).first()


def system_job(job_id: int) -> Job | None:
    return Job.objects.filter(kind__in=SYSTEM_KINDS, pk=job_id).first()


def diff_sections(items: Iterable[DiffItem]) -> list[tuple[str, list[DiffItem]]]:
    """The differences grouped by section, sections in the order they first appear."""
    sections: dict[str, list[DiffItem]] = {}
    for item in items:
        sections.setdefault(item.section, []).append(item)
    return list(sections.items())
