"""Compare the stored jobs with the world and act, every few seconds and at every worker start.

Recovery does not wait for an event that may never come (a worker start, an hourly check): a
queued job nobody took is handed to the worker again (its enqueue was lost with the broker), and
a running job whose holder is gone (lease expired, or its process on this host no longer exists)
becomes what its kind's ``on_dead`` says. Every change is a conditional update on the fence, so
two reconcilers at once, or one racing a worker, change a job once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from events.models import Severity
from jobs import engine, registry
from jobs.models import Job, JobState

logger = logging.getLogger(__name__)


def enqueue_grace() -> timedelta:
    """A queued job's task normally arrives within a second; one older than this lost its
    message (settings.JOBS_ENQUEUE_GRACE_SECONDS)."""
    return timedelta(seconds=settings.JOBS_ENQUEUE_GRACE_SECONDS)


@dataclass
class Reconciled:
    """What one pass did, by job id."""

    enqueued: list[int] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    rolling_back: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    # By recovery name (registry.register_recovery): the ids it handed to the worker again.
    recovered: dict[str, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(
            (self.enqueued, self.restarted, self.resumed, self.rolling_back, self.failed)
        ) or any(self.recovered.values())


def _fail(job: Job, error: str, now: datetime) -> bool:
    if not Job.objects.filter(pk=job.pk, fence=job.fence, state=job.state).update(
        state=JobState.FAILED, finished_at=now, error=error, lease_owner="", lease_expires_at=None
    ):
        return False
    engine.event(job, f"{job.title} failed: {error}", Severity.ERROR)
    return True


def _requeue(job: Job, now: datetime, *, rollback: bool = False) -> bool:
    """Back to queued (fence + 1: the dead holder can no longer write) and enqueued again."""
    values: dict[str, object] = {
        "state": JobState.QUEUED,
        "lease_owner": "",
        "lease_expires_at": None,
        "fence": F("fence") + 1,
        "queued_at": now,  # the enqueue grace counts from here
        "restarts": F("restarts") + 1,
    }
    if rollback:
        values["details"] = {**job.details, "rollback": True}
    if not Job.objects.filter(pk=job.pk, fence=job.fence, state=JobState.RUNNING).update(**values):
        return False
    engine.enqueue(job.pk, job.kind)
    return True


def _dead(job: Job, now: datetime, summary: Reconciled) -> None:
    spec = registry.get(job.kind)
    # A job run where it was asked for (jobs.engine.run_here) had a process, not a worker.
    holder = "process" if job.lease_owner.startswith("here:") else "worker"
    if spec.on_dead == "fail":
        if _fail(job, f"The {holder} running it stopped; it was not started again.", now):
            summary.failed.append(job.pk)
        return
    if job.restarts >= spec.max_restarts:
        error = f"The {holder} stopped {job.restarts + 1} times during the job; it was given up."
        if _fail(job, error, now):
            summary.failed.append(job.pk)
        return
    if spec.on_dead == "rollback":
        # A rollback is idempotent: one interrupted in its turn is simply run again.
        if _requeue(job, now, rollback=True):
            engine.event(
                job,
                f"{job.title} interrupted: its {holder} stopped; rolling back",
                Severity.WARNING,
            )
            summary.rolling_back.append(job.pk)
        return
    if _requeue(job, now):
        how = "resumed" if spec.on_dead == "resume" else "started again"
        engine.event(
            job,
            f"{job.title} interrupted: its {holder} stopped; {how} "
            f"(restart {job.restarts + 1} of {spec.max_restarts})",
            Severity.WARNING,
        )
        (summary.resumed if spec.on_dead == "resume" else summary.restarted).append(job.pk)


def reconcile(now: datetime | None = None) -> Reconciled:
    """One pass over the active jobs; returns what it did."""
    now = now or timezone.now()
    summary = Reconciled()
    known = {kind.name for kind in registry.kinds() if not kind.driven}
    stale = Q(state=JobState.QUEUED, queued_at__lt=now - enqueue_grace())
    for job in Job.objects.filter(stale, kind__in=known):
        if engine.enqueue(job.pk, job.kind):
            # Count the grace from now, so a slow worker is not sent the job every pass.
            Job.objects.filter(pk=job.pk, fence=job.fence, state=JobState.QUEUED).update(
                queued_at=now
            )
            summary.enqueued.append(job.pk)
    for job in Job.objects.filter(state=JobState.RUNNING, kind__in=known):
        if engine.holder_gone(job, now):
            _dead(job, now, summary)
    for name, recover in registry.recoveries().items():
        try:
            summary.recovered[name] = recover()
        except Exception:  # one failing recovery (a broker blip) must not stop the others
            logger.exception("job recovery %s failed; the next pass tries again", name)
    if summary:
        logger.info("reconciled jobs: %s", summary)
    return summary
