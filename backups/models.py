"""The console's record of Backup & Restore: the backup schedule and the system backup jobs.

Configuration backups themselves live on the appliance (appliance.config.configbackup); the console
keeps only what the appliance has no place for: when to make scheduled backups, and the jobs
that write or restore the system backup image on the rescue partition.
"""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from lmi import progress

KEEP_LAST_MAX = 90


class BackupSettings(models.Model):
    """The schedule of configuration backups (one row, pk=1).

    ``last_scheduled_on`` is the local date of the last scheduled backup; the hourly beat claims
    a day by a conditional update of it, so two beats (or a restarted beat) never make two
    backups on one day.
    """

    scheduled_enabled = models.BooleanField(default=True)
    scheduled_hour = models.PositiveSmallIntegerField(
        default=2, validators=[MinValueValidator(0), MaxValueValidator(23)]
    )
    keep_last = models.PositiveSmallIntegerField(
        default=7, validators=[MinValueValidator(1), MaxValueValidator(KEEP_LAST_MAX)]
    )
    last_scheduled_on = models.DateField(null=True, blank=True)
    changed_at = models.DateTimeField(null=True, blank=True)
    changed_by = models.CharField(max_length=150, blank=True)

    class Meta:
        constraints = (
            models.CheckConstraint(
                condition=Q(scheduled_hour__lte=23), name="backupsettings_hour_of_day"
            ),
            models.CheckConstraint(
                condition=Q(keep_last__gte=1, keep_last__lte=KEEP_LAST_MAX),
                name="backupsettings_keep_last_range",
            ),
        )

    def __str__(self) -> str:
        state = f"daily at {self.scheduled_hour:02d}:00" if self.scheduled_enabled else "off"
        return f"Scheduled configuration backups {state}, keep {self.keep_last}"


class SystemJobKind(models.TextChoices):
    """What a system backup job does to the rescue partition's image."""

    CREATE = "create", "Create system backup"
    RESTORE = "restore", "Restore system backup"


class SystemJobState(models.TextChoices):
    """Where a system backup job is. Allowed transitions, each by a conditional update::

        queued  -> running     the worker's task claimed it (a redelivered task finds it
                               running or finished and leaves it alone)
        running -> succeeded   the image was written (create) or the appliance returned to it
                               (restore); the task itself writes this
        running -> failed      the appliance layer refused or failed (the reason in ``error``),
                               or the worker stopped: its heartbeat lapsed and a starting worker
                               or the next start reaped it
        queued  -> failed      the task could not be enqueued, or no worker took it in time

    succeeded and failed are final: another attempt is a new job.
    """

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


ACTIVE_STATES = (SystemJobState.QUEUED, SystemJobState.RUNNING)
FINAL_STATES = (SystemJobState.SUCCEEDED, SystemJobState.FAILED)


class SystemBackupJob(models.Model):
    """One creation or restore of the system backup image on the rescue partition.

    Created queued before its task is enqueued (on commit). The partial unique index allows one
    queued or running job at a time, so a second click, the API and a redelivered task can never
    write the one image twice at once. ``heartbeat_at`` moves with every progress write; a
    running job whose heartbeat lapsed lost its worker.
    """

    kind = models.CharField(max_length=16, choices=SystemJobKind.choices)
    state = models.CharField(
        max_length=16, choices=SystemJobState.choices, default=SystemJobState.QUEUED
    )
    requested_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    executor = models.CharField(max_length=200, blank=True)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    firmware_version = models.CharField(max_length=32, blank=True)
    # How many times the job was started again after its worker stopped (a creation writes
    # through a temporary file and a restore keeps a journal, so a new start is safe).
    restarts = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                models.Value(1),
                condition=Q(state__in=ACTIVE_STATES),
                name="systembackupjob_one_active",
                violation_error_message="A system backup job is already queued or running.",
            ),
        )

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.pk} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def percent(self) -> float:
        return progress.percent(
            self.bytes_done, self.bytes_total, finished=self.state == SystemJobState.SUCCEEDED
        )

    @property
    def duration(self) -> float | None:
        """Seconds from claim to finish (or to now while it runs)."""
        return progress.seconds_between(self.started_at, self.finished_at)
