"""The console's record of retention purges of the message store."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class PurgeState(models.TextChoices):
    """Where a purge run is. Allowed transitions, each made by a conditional update::

        queued  -> running    the task claimed the run (it only ever starts a queued run)
        queued  -> failed     the task could not be enqueued, or the run was never picked up
        running -> succeeded  the expired rows are deleted and the freed pages returned
        running -> failed     the purge raised, or its worker stopped reporting progress

    succeeded and failed are final.
    """

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


ACTIVE_STATES = (PurgeState.QUEUED, PurgeState.RUNNING)
FINAL_STATES = (PurgeState.SUCCEEDED, PurgeState.FAILED)


class PurgePhase(models.TextChoices):
    """What a running purge is doing (progress only; the state machine is PurgeState)."""

    WAITING = "waiting", "Waiting for the worker"
    MESSAGES = "messages", "Deleting expired messages"
    SMTP_LOG = "smtp_log", "Deleting expired SMTP log entries"
    TRACKING_LOG = "tracking_log", "Deleting expired tracking log entries"
    VACUUM = "vacuum", "Returning free space to the disk"
    DONE = "done", "Done"


class PurgeTrigger(models.TextChoices):
    """Why a purge was started."""

    RETENTION = "retention", "Retention shortened"
    PLANNER = "planner", "Reclaim plan applied"
    SCHEDULE = "schedule", "Daily schedule"


class PurgeRun(models.Model):
    """One retention purge of the message store: who asked, how far it got, what it freed.

    Created (queued) before its task is enqueued, on commit; the task claims it, reports
    progress on it while it works and writes its final state itself. At most one run is queued
    or running at any time: the partial unique index below refuses a second one. A retention
    shortened while a run is active sets ``follow_up``, and the run purges again before it
    finishes, so the new retention is honoured without a second run.
    """

    state = models.CharField(max_length=16, choices=PurgeState.choices, default=PurgeState.QUEUED)
    phase = models.CharField(max_length=16, choices=PurgePhase.choices, default=PurgePhase.WAITING)
    trigger = models.CharField(max_length=16, choices=PurgeTrigger.choices)
    requested_by = models.CharField(max_length=150, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    follow_up = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Updated with every progress report; a running run whose heartbeat stops was lost.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The worker running it (a worker that starts again under this name lost it), and how many
    # times it was started again after its worker stopped (deleting expired rows twice is
    # harmless: a new start carries on from what is left).
    executor = models.CharField(max_length=200, blank=True)
    restarts = models.PositiveSmallIntegerField(default=0)
    messages_deleted = models.BigIntegerField(default=0)
    smtp_log_deleted = models.BigIntegerField(default=0)
    tracking_log_deleted = models.BigIntegerField(default=0)
    pages_returned = models.BigIntegerField(default=0)
    store_bytes_before = models.BigIntegerField(null=True, blank=True)
    store_bytes_after = models.BigIntegerField(null=True, blank=True)
    disk_free_before = models.BigIntegerField(null=True, blank=True)
    disk_free_after = models.BigIntegerField(null=True, blank=True)
    bytes_reclaimed = models.BigIntegerField(null=True, blank=True)
    # Messages deleted per store name, and the retentions the purge applied.
    details = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                models.Value(1),
                condition=Q(state__in=ACTIVE_STATES),
                name="purgerun_one_active",
                violation_error_message="A retention purge is already queued or running.",
            ),
        )

    def __str__(self) -> str:
        return f"Purge {self.pk} ({self.state})"

    @property
    def rows_deleted(self) -> int:
        return self.messages_deleted + self.smtp_log_deleted + self.tracking_log_deleted

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def duration(self) -> float | None:
        """Seconds from claim to finish."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def disk_free_gained(self) -> int | None:
        """How much the disk's free space rose meanwhile (other writers on the disk count too)."""
        if self.disk_free_before is None or self.disk_free_after is None:
            return None
        return self.disk_free_after - self.disk_free_before
