"""One table for every long piece of work, whatever its kind (AWX's unified job, NetBox's Job).

A job is created queued, and its task is enqueued when the creating transaction commits. A
worker claims it by a conditional update that takes the lease and moves ``fence`` on; every
later write of that worker (progress, heartbeat, finish) is conditional on the fence, so a
worker that lost its lease (it stalled, the reconciler gave the job to another) can no longer
change the job. The stored state is the truth the reconciler (jobs/reconciler.py) acts on.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from lmi import progress


class JobState(models.TextChoices):
    """Where a job is. Transitions, each a conditional update::

    queued  -> running      a worker claimed it (lease taken, fence + 1)
    running -> running      a worker claimed it again after the lease expired (fence + 1)
    running -> queued       the reconciler starts it again after its worker died
    queued/running -> succeeded, failed, cancelled, rolled_back   final
    """

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    ROLLED_BACK = "rolled_back", "Rolled back"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)

# The conflict group of every job that changes the appliance itself (an install and its
# rollback, a configuration restore, a system backup or restore): one at a time, so a restore
# can never run under an install, nor an install start under a restore.
APPLIANCE_GROUP = "appliance"
FINAL_STATES = (
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.ROLLED_BACK,
)


class Job(models.Model):
    """One piece of long work: its kind, who asked, how far it got, and who runs it now."""

    kind = models.CharField(max_length=32)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    title = models.CharField(max_length=200)
    requested_by = models.CharField(max_length=150, blank=True)
    trigger = models.CharField(max_length=32, blank=True)
    # At most one queued or running job per non-empty group (the constraint below), so two
    # clicks, the API and the CLI can never run two jobs that write the same thing.
    conflict_group = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # When it was last handed to the worker (created, or started again after a dead worker).
    queued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    step = models.PositiveIntegerField(default=0)
    steps = models.PositiveIntegerField(default=0)
    step_name = models.CharField(max_length=200, blank=True)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    rate = models.FloatField(default=0.0)  # bytes per second, smoothed (lmi.progress.RateMeter)
    progress_at = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    fence = models.PositiveBigIntegerField(default=0)
    restarts = models.PositiveSmallIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    # What the job works from changed while it ran (a retention shortened during a purge): it
    # goes round once more before it finishes instead of a second job being started.
    again_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        indexes = (models.Index(fields=("kind", "-created_at"), name="job_kind_created_idx"),)
        constraints = (
            models.UniqueConstraint(
                fields=("conflict_group",),
                condition=Q(state__in=ACTIVE_STATES) & ~Q(conflict_group=""),
                name="job_one_active_per_group",
                violation_error_message="A job of this group is already queued or running.",
            ),
        )

    def __str__(self) -> str:
        return f"{self.title} ({self.kind} {self.pk}, {self.state})"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def percent(self) -> float:
        """Bytes when the job counts bytes, else steps; 100 once it succeeded."""
        finished = self.state == JobState.SUCCEEDED
        if self.bytes_total:
            return progress.percent(self.bytes_done, self.bytes_total, finished=finished)
        return progress.percent(self.step, self.steps, finished=finished)

    @property
    def seconds_left(self) -> int | None:
        if self.state != JobState.RUNNING or not self.bytes_total:
            return None
        return progress.seconds_left(self.bytes_total, self.bytes_done, self.rate)

    @property
    def duration(self) -> float | None:
        """Seconds from the first claim to the finish (or to now while it runs)."""
        return progress.seconds_between(self.started_at, self.finished_at)
