"""Writes of Backup & Restore > System: configuration backups, their schedule, the system image.

Configuration backups are archives the appliance package writes and reads
(``appliance.config.configbackup``); this module adds what only the console knows: who asked, the
console's own settings carried inside every backup (update settings and this schedule), the
events, and the daily schedule. Every outcome, refused or not, is an event in Category.BACKUP.
A passphrase is passed through to the appliance package and nowhere else: never logged, never
in an event, never in a URL.

Every backup and restore is a job of the engine (jobs/). Configuration backups are made and
restored in the process that asks, as jobs held by it (jobs.engine.run_here): a restore whose
process died is finished (or undone) from its journal by a worker. The system backup image is
written or restored by a queued job in the worker, started again from scratch if its worker dies.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from django.db import transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from appliance.config import backupdiff, backuprestore, configbackup
from appliance.config.backupdiff import DiffItem
from appliance.config.backupformat import BackupError, BackupHeader, BackupRejected
from appliance.config.backuprestore import ConfirmationRequired, RestoreResult
from appliance.config.configbackup import LoadedBackup
from appliance.system.errors import ApplianceError
from backups.models import (
    CONFIG_BACKUP,
    CONFIG_RESTORE,
    KEEP_LAST_MAX,
    BackupSettings,
)
from events.models import Category, Severity
from events.services import User, event_write, username_of
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import APPLIANCE_GROUP, JobState

logger = logging.getLogger(__name__)


PASSPHRASE_MIN = 8
PASSPHRASE_MAX = 1024
COMMENT_MAX = 200
# Backups made before firmware installs are kept apart from the schedule's: the newest few.
PRE_INSTALL_KEPT = 5
CONSOLE_FORMAT = 1
MAX_LISTED_FILES = 200  # of an unverified restore, in its event

TRIGGER_LABELS = {
    "manual": "Manual",
    "scheduled": "Scheduled",
    "pre-install": "Before firmware install",
    "upload": "Uploaded",
}


# --- Errors a caller shows to a person (all are BackupError: str(exc) is the message) -------


class BackupNotFound(BackupError):
    """No configuration backup of that name."""


class BadPassphrase(BackupError):
    """A new passphrase that is too short or too long."""


class JobInProgress(BackupError):
    """Another job that changes the appliance runs (an install, a restore, a system backup)."""


class NoSystemBackup(BackupError):
    """Restore asked for with no image on the rescue partition."""


def _event(
    message: str, *, severity: int = Severity.INFO, user: User | None = None, **details: Any
) -> None:
    event_write(
        category=Category.BACKUP, message=message, severity=severity, user=user, details=details
    )


def refuse(
    exc: BaseException,
    event: str,
    *,
    user: User | None,
    error: type[BackupError] = BackupError,
    refusal: str,
    **details: Any,
) -> NoReturn:
    """Write the ERROR event of a refused or failed operation and raise the BackupError the
    caller shows: ``exc`` itself when it is one (its text says why), else ``error(refusal)``."""
    _event(event, severity=Severity.ERROR, user=user, **details)
    if isinstance(exc, BackupError):
        raise exc
    raise error(refusal) from exc


def _not_found(name: str) -> BackupNotFound:
    return BackupNotFound(f"There is no configuration backup named {name!r}.")


# --- The console's own settings inside a backup ---------------------------------------------


def backup_settings_row() -> BackupSettings:
    """The schedule's row, created with its defaults the first time."""
    row, _ = BackupSettings.objects.get_or_create(pk=1)
    return row


def console_settings_snapshot() -> dict[str, Any]:
    """The console settings a configuration backup carries: update settings and the schedule."""
    from upgrades.selectors import update_settings

    schedule = BackupSettings.objects.filter(pk=1).first() or BackupSettings(pk=1)
    return {
        "format": CONSOLE_FORMAT,
        "update_settings": {"automatic_downloads": update_settings().automatic_downloads},
        "backup_settings": {
            "scheduled_enabled": schedule.scheduled_enabled,
            "scheduled_hour": schedule.scheduled_hour,
            "keep_last": schedule.keep_last,
        },
    }


def _bool(section: Mapping[str, Any], key: str) -> bool | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise BackupRejected(f"The backup's console settings are invalid: {key} is not true/false.")
    return value


def _int(section: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BackupRejected(
            f"The backup's console settings are invalid: {key} must be a whole number "
            f"from {low} to {high}."
        )
    return value


def console_settings_parse(data: object) -> dict[str, Any]:
    """Check the console settings of a backup before anything is restored.

    Unknown keys are ignored (a newer console may add some) and absent ones are left as they
    are; a known key with a wrong type or range refuses the whole backup.
    """
    if data is None or data == {}:
        return {}
    if not isinstance(data, Mapping):
        raise BackupRejected("The backup's console settings are invalid: not a JSON object.")
    parsed: dict[str, Any] = {}
    updates = data.get("update_settings", {})
    schedule = data.get("backup_settings", {})
    if not isinstance(updates, Mapping) or not isinstance(schedule, Mapping):
        raise BackupRejected("The backup's console settings are invalid: not JSON objects.")
    values = {
        "automatic_downloads": _bool(updates, "automatic_downloads"),
        "scheduled_enabled": _bool(schedule, "scheduled_enabled"),
        "scheduled_hour": _int(schedule, "scheduled_hour", 0, 23),
        "keep_last": _int(schedule, "keep_last", 1, KEEP_LAST_MAX),
    }
    parsed.update({key: value for key, value in values.items() if value is not None})
    return parsed


def console_settings_apply(data: Mapping[str, Any], user: User | None) -> None:
    """Apply console settings from a backup (checked first; a bad value changes nothing).

    Automatic downloads go through the update service (its own event when it changes); the
    schedule is written here, its change covered by the caller's restore event.
    """
    from upgrades.services import automatic_downloads_set

    parsed = console_settings_parse(data)
    with transaction.atomic():
        if "automatic_downloads" in parsed:
            automatic_downloads_set(enabled=parsed["automatic_downloads"], user=user)
        schedule = {
            key: parsed[key]
            for key in ("scheduled_enabled", "scheduled_hour", "keep_last")
            if key in parsed
        }
        if schedule:
            backup_settings_row()
            BackupSettings.objects.filter(pk=1).update(
                **schedule, changed_at=timezone.now(), changed_by=username_of(user)
            )


def backup_settings_set(
    *, user: User | None, scheduled_enabled: bool, scheduled_hour: int, keep_last: int
) -> BackupSettings:
    """Change the schedule of configuration backups (an event when something changed)."""
    if not 0 <= scheduled_hour <= 23 or not 1 <= keep_last <= KEEP_LAST_MAX:
        raise BackupError(
            f"The hour must be 0-23 and the number of backups kept 1-{KEEP_LAST_MAX}."
        )
    row = backup_settings_row()
    wanted = (scheduled_enabled, scheduled_hour, keep_last)
    if (row.scheduled_enabled, row.scheduled_hour, row.keep_last) != wanted:
        BackupSettings.objects.filter(pk=1).update(
            scheduled_enabled=scheduled_enabled,
            scheduled_hour=scheduled_hour,
            keep_last=keep_last,
            changed_at=timezone.now(),
            changed_by=username_of(user),
        )
        state = (
            f"daily at {scheduled_hour:02d}:00, keeping the last {keep_last}"
            if scheduled_enabled
            else "off"
        )
        _event(
            f"Scheduled configuration backups: {state}",
            user=user,
            scheduled_enabled=scheduled_enabled,
            scheduled_hour=scheduled_hour,
            keep_last=keep_last,
        )
        row.refresh_from_db()
    return row


# --- Configuration backups ------------------------------------------------------------------


@sensitive_variables("passphrase")
def _check_new_passphrase(passphrase: str | None) -> str | None:
    if not passphrase:
        return None
    if len(passphrase) < PASSPHRASE_MIN:
        raise BadPassphrase(f"The passphrase must have at least {PASSPHRASE_MIN} characters.")
    if len(passphrase) > PASSPHRASE_MAX:
        raise BadPassphrase(f"The passphrase may have at most {PASSPHRASE_MAX} characters.")
    return passphrase


@sensitive_variables("passphrase")
def config_backup_create(
    *,
    user: User | None,
    comment: str = "",
    passphrase: str | None = None,
    trigger: str = "manual",
) -> BackupHeader:
    """Make a configuration backup of the running configuration and the console settings."""
    passphrase = _check_new_passphrase(passphrase)
    comment = " ".join(comment.split())[:COMMENT_MAX]
    created_by = username_of(user) or "system"

    def create(lease: jobs_engine.Lease) -> BackupHeader:
        lease.progress(step=1, steps=1, step_name="Writing the archive")
        return configbackup.backup_create(
            created_by=created_by,
            comment=comment,
            trigger=trigger,
            passphrase=passphrase,
            console=console_settings_snapshot(),
        )

    try:
        header = jobs_engine.run_here(
            CONFIG_BACKUP, create, title="Configuration backup", user=user, trigger=trigger
        )
    except (ApplianceError, OSError) as exc:
        refuse(
            exc,
            f"Configuration backup failed: {exc}",
            user=user,
            refusal=f"The configuration backup could not be made: {exc}",
            trigger=trigger,
        )
    _event(
        f"Configuration backup {header.name} created ({TRIGGER_LABELS.get(trigger, trigger)}"
        f"{', encrypted' if header.encrypted else ''})",
        user=user,
        name=header.name,
        trigger=trigger,
        comment=comment,
        encrypted=header.encrypted,
        size=header.size,
        firmware_version=header.firmware_version,
    )
    return header


def config_backup_before_install(*, user: User | None) -> BackupHeader:
    """The automatic backup before a firmware install; the install stops if this raises."""
    header = config_backup_create(
        user=user, comment="Automatic backup before a firmware install", trigger="pre-install"
    )
    _prune("pre-install", PRE_INSTALL_KEPT)
    return header


def _prune(trigger: str, keep: int) -> list[str]:
    try:
        removed = configbackup.backup_prune(trigger, keep)
    except (ApplianceError, OSError) as exc:
        _event(
            f"Old {TRIGGER_LABELS.get(trigger, trigger).lower()} configuration backups could "
            f"not be deleted: {exc}",
            severity=Severity.ERROR,
            trigger=trigger,
        )
        return []
    if removed:
        _event(
            f"Deleted {len(removed)} old {TRIGGER_LABELS.get(trigger, trigger).lower()} "
            f"configuration backup{'s' if len(removed) != 1 else ''} (keeping the last {keep})",
            names=removed,
            trigger=trigger,
        )
    return removed


def config_backup_upload(*, user: User | None, fileobj: IO[bytes], filename: str) -> BackupHeader:
    """Keep an uploaded configuration backup, or refuse it (nothing kept) with the reason."""
    shown = "".join(ch for ch in filename if ch.isprintable())[:200] or "(unnamed)"
    try:
        header = configbackup.backup_import(
            fileobj, filename=shown, uploaded_by=username_of(user) or "system"
        )
    except (ApplianceError, OSError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, BackupError) else f"it cannot be read: {exc}"
        refuse(
            exc,
            f"Uploaded configuration backup {shown} refused: {reason}",
            user=user,
            error=BackupRejected,
            refusal=f"The file was refused: {reason}",
            filename=shown,
            reason=reason,
        )
    _event(
        f"Configuration backup {header.name} uploaded (from {shown})",
        user=user,
        name=header.name,
        filename=shown,
        encrypted=header.encrypted,
        size=header.size,
        firmware_version=header.firmware_version,
    )
    return header


@sensitive_variables("passphrase")
def _load(name: str, passphrase: str | None) -> LoadedBackup:
    try:
        return configbackup.backup_load(name, passphrase=passphrase or None)
    except KeyError:
        raise _not_found(name) from None
    except BackupError:
        raise
    except (ApplianceError, OSError, ValueError) as exc:
        raise BackupRejected(f"The backup cannot be read: {exc}") from exc


def _console_diff(console: Mapping[str, Any]) -> list[DiffItem]:
    """What the backup's console settings would change, in the appliance layer's terms."""
    wanted = console_settings_parse(console)
    current = console_settings_parse(console_settings_snapshot())
    labels = {
        "automatic_downloads": "Automatic firmware downloads",
        "scheduled_enabled": "Scheduled configuration backups",
        "scheduled_hour": "Hour of the scheduled backup",
        "keep_last": "Scheduled backups kept",
    }
    return [
        DiffItem(
            section="Console settings",
            name=label,
            change="changed",
            before=str(current.get(key)),
            after=str(wanted[key]),
        )
        for key, label in labels.items()
        if key in wanted and wanted[key] != current.get(key)
    ]


@dataclass(frozen=True)
class RestorePreview:
    """What a restore would do: the differences, and for an unverified backup (one this
    appliance did not make, or that was changed) the files an administrator must confirm."""

    items: list[DiffItem]
    verified: bool
    writes: list[str]
    removes: list[str]


@sensitive_variables("passphrase")
def config_backup_preview(*, name: str, passphrase: str | None = None) -> RestorePreview:
    """Object by object, what restoring the backup would change, and the files it would write."""
    loaded = _load(name, passphrase)
    try:
        items = list(backupdiff.backup_diff(loaded))
        plan = backuprestore.restore_plan(loaded)
    except BackupError:
        raise
    except (ApplianceError, OSError) as exc:
        raise BackupError(f"The running configuration cannot be compared: {exc}") from exc
    return RestorePreview(
        items=items + _console_diff(loaded.console),
        verified=loaded.verified,
        writes=plan.writes,
        removes=plan.removes,
    )


@sensitive_variables("passphrase")
def config_backup_diff(*, name: str, passphrase: str | None = None) -> list[DiffItem]:
    """Object by object, what restoring the backup would change in the running configuration."""
    return config_backup_preview(name=name, passphrase=passphrase).items


@sensitive_variables("passphrase")
def config_backup_restore(
    *,
    user: User | None,
    name: str,
    passphrase: str | None = None,
    confirmed: Collection[str] = (),
) -> RestoreResult:
    """Restore a configuration backup, all or nothing, then its console settings; an event
    with the outcome either way.

    An unverified backup needs ``confirmed``: every file the restore writes, as the preview
    listed them (:class:`ConfirmationRequired`, no event, nothing changed, otherwise).
    """

    def restore(lease: jobs_engine.Lease) -> RestoreResult:
        def progress(step: int, what: str) -> None:
            lease.progress(step=step, step_name=what)

        try:
            return backuprestore.backup_restore(loaded, confirmed=confirmed, progress=progress)
        except ConfirmationRequired as exc:
            lease.finish(JobState.CANCELLED, error=str(exc))  # nothing changed
            raise

    try:
        loaded = _load(name, passphrase)
        console = console_settings_parse(loaded.console)
        result = jobs_engine.run_here(
            CONFIG_RESTORE,
            restore,
            title=f"Restore of configuration backup {name}",
            user=user,
            conflict_group=APPLIANCE_GROUP,
            steps=2,
            details={"backup": name, "console": loaded.console},
        )
    except ConfirmationRequired:
        raise  # a question for the administrator, not a failure
    except jobs_engine.JobConflict as exc:
        raise JobInProgress(str(exc)) from None
    except (ApplianceError, OSError) as exc:
        refuse(
            exc,
            f"Restore of configuration backup {name} failed: {exc}",
            user=user,
            refusal=f"The restore failed, nothing was changed: {exc}",
            name=name,
            reason=str(exc),
        )
    console_settings_apply(loaded.console, user)
    converted = (
        f", converted from configuration format {result.converted_from}"
        if result.converted_from
        else ""
    )
    unverified = (
        ""
        if loaded.verified
        else "; the backup was unverified, the files it writes confirmed by the user"
    )
    _event(
        f"Configuration backup {name} restored: {result.files_written} files written, "
        f"{result.files_removed} removed, {result.stores_updated} message stores updated"
        f"{converted}{unverified}",
        user=user,
        verified=loaded.verified,
        confirmed_files=[] if loaded.verified else sorted(set(confirmed))[:MAX_LISTED_FILES],
        name=name,
        files_written=result.files_written,
        files_removed=result.files_removed,
        stores_updated=result.stores_updated,
        converted_from=result.converted_from,
        console_settings=console,
        firmware_version=loaded.header.firmware_version,
    )
    return result


def config_backup_delete(*, user: User | None, name: str) -> None:
    """Delete one configuration backup."""
    try:
        configbackup.backup_delete(name)
    except KeyError:
        raise _not_found(name) from None
    except (ApplianceError, OSError, ValueError) as exc:
        _event(
            f"Configuration backup {name} could not be deleted: {exc}",
            severity=Severity.ERROR,
            user=user,
            name=name,
        )
        raise BackupError(f"The backup could not be deleted: {exc}") from exc
    _event(f"Configuration backup {name} deleted", user=user, name=name)


def scheduled_backup_run() -> BackupHeader | None:
    """Beat, hourly: once a day, from the scheduled hour on, make a backup and prune old ones.

    The day is claimed by a conditional update of ``last_scheduled_on``, so a second beat (or
    an hour caught up after a stopped worker) makes no second backup that day.
    """
    row = backup_settings_row()
    if not row.scheduled_enabled:
        return None
    now = timezone.localtime()
    if now.hour < row.scheduled_hour:
        return None
    today = now.date()
    claimed = (
        BackupSettings.objects.filter(pk=1, scheduled_enabled=True)
        .exclude(last_scheduled_on=today)
        .update(last_scheduled_on=today)
    )
    if not claimed:
        return None
    try:
        header = config_backup_create(user=None, comment="Scheduled backup", trigger="scheduled")
    except BackupError:
        logger.exception("the scheduled configuration backup failed")  # the event says why
        return None
    _prune("scheduled", row.keep_last)
    return header


def config_restore_resume(lease: jobs_engine.Lease) -> None:
    """Finish a restore whose process died, from its journal (a worker, sent by the reconciler).

    Past its commit point the restore is rolled forward and the backup's console settings
    applied; before it, nothing had been replaced and its staged files are removed.
    """
    job = lease.job()
    name = job.details.get("backup", "")
    if backuprestore.restore_recover():
        console_settings_apply(job.details.get("console") or {}, job.requested_by or None)
        lease.finish(
            JobState.SUCCEEDED,
            message=f"Configuration backup {name} restored: finished from its journal after "
            "the process restoring it stopped",
        )
    else:
        lease.finish(
            JobState.ROLLED_BACK,
            message=f"Restore of configuration backup {name} undone: the process restoring it "
            "stopped before anything was replaced; the configuration is as it was",
        )


def _config_create_lost(lease: jobs_engine.Lease) -> None:
    raise BackupError("The configuration backup stopped with its process; make it again.")


def _config_create_undo(lease: jobs_engine.Lease) -> None:
    """A configuration backup whose process died: its archive appears whole or not at all,
    so undoing it is deleting the temporary file a write cut short left."""
    removed = len(configbackup.backup_leftovers_remove())
    partial = f" ({removed} partial file{'s' if removed != 1 else ''} removed)" if removed else ""
    lease.finish(
        JobState.ROLLED_BACK,
        message="Configuration backup undone: the process making it stopped before it was "
        f"written{partial}; make it again",
    )


def register_job_kinds() -> None:
    """The configuration backup kinds of the job engine (BackupsConfig.ready)."""
    jobs_registry.register(
        jobs_registry.Kind(
            name=CONFIG_BACKUP,
            label="Configuration backup",
            category=Category.BACKUP,
            run=_config_create_lost,
            on_dead="rollback",  # written atomically: undoing it is removing a partial file
            rollback=_config_create_undo,
            own_events=True,
        )
    )
    jobs_registry.register(
        jobs_registry.Kind(
            name=CONFIG_RESTORE,
            label="Configuration restore",
            category=Category.BACKUP,
            run=config_restore_resume,
            on_dead="resume",
            own_events=True,
        )
    )
