"""Writes of Mail Security: retention changes and the retention purge that reclaims disk space.

A shorter retention only frees space once the expired rows are deleted and the file shrinks,
so saving one starts a purge: a PurgeRun row is created (queued) and its task enqueued when
the transaction commits. The database allows one queued or running purge at a time; a
retention shortened while one is active asks that run to go round once more (follow_up)
instead of starting a second. The task claims the run by a conditional update, reports
progress on it, and writes the final state itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from appliance.mail import purge, retention
from events.models import Category, Severity
from events.services import User, event_write, username_of
from lmi import celery as lmi_celery
from mailsecurity.models import (
    ACTIVE_STATES,
    PurgePhase,
    PurgeRun,
    PurgeState,
    PurgeTrigger,
)

logger = logging.getLogger(__name__)


# A running purge reports progress at least this often; one silent for STALE_AFTER was lost
# (its worker was killed) and is marked failed so that purges can start again.
PROGRESS_INTERVAL = 1.0
STALE_AFTER = timedelta(minutes=10)
MAX_RESTARTS = 2  # a purge whose worker keeps dying (a crash loop) fails after this many
# Pass this to a purge's follow-up loop at most; each pass is a retention shortened meanwhile.
MAX_PASSES = 10


class PurgeLost(Exception):
    """The run is no longer running (it was reaped as stale); the purge must stop."""


# --- Retention changes -----------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionChange:
    """One retention set to a new value."""

    key: str  # "store:<id>", "smtp_log", "tracking_log"
    label: str
    old_days: int
    new_days: int

    @property
    def shorter(self) -> bool:
        return self.new_days < self.old_days


@dataclass(frozen=True)
class RetentionResult:
    """What a save changed and the purge it started or joined (None: nothing got shorter)."""

    changes: tuple[RetentionChange, ...]
    purge: PurgeRun | None
    purge_created: bool = False


SMTP_LOG = "smtp_log"
TRACKING_LOG = "tracking_log"
LOG_LABELS = {SMTP_LOG: "SMTP log", TRACKING_LOG: "Message tracking log"}


def days_text(count: int) -> str:
    return f"{count} day" if count == 1 else f"{count} days"


def store_key(store_id: int) -> str:
    return f"store:{store_id}"


def retention_apply(
    values: Mapping[str, int],
    *,
    user: User | None,
    trigger: PurgeTrigger = PurgeTrigger.RETENTION,
) -> RetentionResult:
    """Set the given retentions (keys as in RetentionChange), one event per change; if any got
    shorter, start a purge (or ask the active one to go round again).

    Unknown store ids raise KeyError, values outside 1 to MAX_RETENTION_DAYS ValueError,
    before anything is written.
    """
    for days in values.values():
        retention.validate_days(days)
    current = retention.retention_settings()
    stores = {store_key(store.id): store for store in current.stores}
    for key in values:
        if key not in stores and key not in LOG_LABELS:
            raise KeyError(key)

    changes: list[RetentionChange] = []
    for key, days in values.items():
        if key in stores:
            store = stores[key]
            if days != store.retention_days:
                old = retention.store_retention_set(store.id, days)
                changes.append(RetentionChange(key, f"Message store {store.name}", old, days))
    log_values = {key: values[key] for key in LOG_LABELS if key in values}
    old_logs = {SMTP_LOG: current.smtp_log_days, TRACKING_LOG: current.tracking_log_days}
    log_changes = {key: days for key, days in log_values.items() if days != old_logs[key]}
    if log_changes:
        old_smtp, old_tracking = retention.log_retention_set(
            smtp_log_days=log_changes.get(SMTP_LOG),
            tracking_log_days=log_changes.get(TRACKING_LOG),
        )
        previous = {SMTP_LOG: old_smtp, TRACKING_LOG: old_tracking}
        changes += [
            RetentionChange(key, LOG_LABELS[key], previous[key], days)
            for key, days in log_changes.items()
        ]

    for change in changes:
        event_write(
            category=Category.SMTP if change.key == SMTP_LOG else Category.MAIL,
            message=f"{change.label} retention changed from {days_text(change.old_days)} to "
            f"{days_text(change.new_days)}",
            user=user,
            details={
                "retention": change.key,
                "old_days": change.old_days,
                "new_days": change.new_days,
            },
        )
    shorter = [change for change in changes if change.shorter]
    if not shorter:
        return RetentionResult(tuple(changes), None)
    reason = "; ".join(
        f"{c.label}: {days_text(c.old_days)} to {days_text(c.new_days)}" for c in shorter
    )
    run, created = purge_start(trigger=trigger, user=user, reason=reason)
    return RetentionResult(tuple(changes), run, created)


def reclaim_plan_apply(values: Mapping[str, int], *, user: User | None) -> RetentionResult:
    """Apply the reclaim planner's retentions and start a purge even if none got shorter (the
    plan counts on the data that is already past its retention going too)."""
    result = retention_apply(values, user=user, trigger=PurgeTrigger.PLANNER)
    if result.purge is not None:
        return result
    run, created = purge_start(
        trigger=PurgeTrigger.PLANNER, user=user, reason="Reclaim plan: purge expired data"
    )
    return RetentionResult(result.changes, run, created)


# --- Starting a purge ------------------------------------------------------------------------


def purge_runs_reap(now: datetime | None = None, *, executor: str | None = None) -> int:
    """Start again the runs whose worker is gone (fail them after MAX_RESTARTS), and fail runs
    queued for longer than a task may run (the broker lost them). Returns how many.

    A running run is gone when it made no progress for STALE_AFTER, or when ``executor`` (a
    worker that is just starting) ran it: that worker died mid-purge.
    """
    now = now or timezone.now()
    running = PurgeRun.objects.filter(state=PurgeState.RUNNING)
    lost = list(running.filter(heartbeat_at__lt=now - STALE_AFTER))
    if executor:
        lost += list(running.filter(executor=executor).exclude(pk__in=[r.pk for r in lost]))
    reaped = sum(_restart(run, now) for run in lost)
    never_started = now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT) - STALE_AFTER
    reaped += PurgeRun.objects.filter(state=PurgeState.QUEUED, created_at__lt=never_started).update(
        state=PurgeState.FAILED,
        finished_at=now,
        error="No worker picked the purge up.",
    )
    return reaped


def _restart(run: PurgeRun, now: datetime) -> int:
    """Queue a lost run again by a conditional update (one reaper wins), or fail it for good."""
    runs = PurgeRun.objects.filter(pk=run.pk, state=PurgeState.RUNNING, restarts=run.restarts)
    if run.restarts >= MAX_RESTARTS:
        return runs.update(
            state=PurgeState.FAILED,
            finished_at=now,
            error=f"The worker stopped {run.restarts + 1} times during the purge; it was given up.",
        )
    if not runs.update(
        state=PurgeState.QUEUED, executor="", heartbeat_at=None, restarts=F("restarts") + 1
    ):
        return 0
    event_write(
        category=Category.MAIL,
        severity=Severity.WARNING,
        message=f"Retention purge interrupted: its worker stopped; started again "
        f"(restart {run.restarts + 1} of {MAX_RESTARTS})",
        details={"run": run.pk},
    )
    pk = run.pk
    transaction.on_commit(lambda: _enqueue(pk))
    return 1


def _enqueue(run_id: int) -> None:
    """Hand the run to the worker; a broker that refuses fails the run instead of the page."""
    try:
        lmi_celery.enqueue("mailsecurity.tasks.retention_purge", run_id)
    except Exception as exc:  # kombu raises several unrelated types for an unreachable broker
        logger.exception("could not enqueue retention purge %s", run_id)
        failed = PurgeRun.objects.filter(pk=run_id, state=PurgeState.QUEUED).update(
            state=PurgeState.FAILED,
            finished_at=timezone.now(),
            error=f"The purge could not be queued: {exc}",
        )
        if failed:
            event_write(
                category=Category.MAIL,
                severity=Severity.ERROR,
                message="Retention purge could not be queued: the task queue is unreachable",
                details={"run": run_id, "error": str(exc)[:300]},
            )


def purge_start(
    *, trigger: PurgeTrigger, user: User | None = None, reason: str = ""
) -> tuple[PurgeRun, bool]:
    """Queue a purge, or (one is already queued or running) ask that one to go round again.

    Returns the run and whether it is new. The new run's task is enqueued when the caller's
    transaction commits, so the worker never looks for a row that is not there yet.
    """
    purge_runs_reap()
    with transaction.atomic():
        try:
            with transaction.atomic():
                run = PurgeRun.objects.create(
                    trigger=trigger, requested_by=username_of(user), reason=reason[:500]
                )
        except IntegrityError:
            active = PurgeRun.objects.filter(state__in=ACTIVE_STATES).first()
            if active is None:  # it finished in between: try once more
                return purge_start(trigger=trigger, user=user, reason=reason)
            PurgeRun.objects.filter(pk=active.pk, state__in=ACTIVE_STATES).update(follow_up=True)
            active.refresh_from_db()
            return active, False
        transaction.on_commit(lambda: _enqueue(run.pk))
    return run, True


# --- Running a purge -------------------------------------------------------------------------


class _ProgressWriter:
    """Copies the purge's progress onto its run, at most once per PROGRESS_INTERVAL.

    Every write is conditional on the run still running; when it is not (it was reaped), the
    purge is stopped by raising PurgeLost from inside it.
    """

    def __init__(self, run_id: int, base: dict[str, int]) -> None:
        self.run_id = run_id
        self.base = base  # what earlier passes of this run deleted
        self.last = 0.0

    def __call__(self, progress: purge.PurgeProgress) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        updated = PurgeRun.objects.filter(pk=self.run_id, state=PurgeState.RUNNING).update(
            phase=progress.phase,
            heartbeat_at=timezone.now(),
            messages_deleted=self.base["messages"] + sum(progress.messages_deleted.values()),
            smtp_log_deleted=self.base["smtp_log"] + progress.smtp_log_deleted,
            tracking_log_deleted=self.base["tracking_log"] + progress.tracking_log_deleted,
            pages_returned=self.base["pages"] + progress.pages_returned,
        )
        if not updated:
            raise PurgeLost(f"purge run {self.run_id} is no longer running")


def purge_runs_requeue() -> list[int]:
    """Enqueue queued runs again (a worker that starts): a duplicate delivery is harmless, the
    claim lets one executor through."""
    ids = list(PurgeRun.objects.filter(state=PurgeState.QUEUED).values_list("pk", flat=True))
    for run_id in ids:
        _enqueue(run_id)
    return ids


def purge_run_execute(run_id: int, *, executor: str = "") -> PurgeState | None:
    """Claim the queued run and purge; returns its final state, or None if it was not queued.

    A redelivered task finds its run running or finished and does nothing: one executor per
    run. The run is finished as succeeded only when no follow-up was asked for meanwhile;
    otherwise the follow-up flag is cleared and the purge goes round again.
    """
    now = timezone.now()
    claimed = PurgeRun.objects.filter(pk=run_id, state=PurgeState.QUEUED).update(
        state=PurgeState.RUNNING,
        executor=executor[:200],
        started_at=now,
        heartbeat_at=now,
        phase=PurgePhase.MESSAGES,
        follow_up=False,
    )
    if not claimed:
        logger.warning("retention purge %s is not queued; not running it", run_id)
        return None

    totals = {"messages": 0, "smtp_log": 0, "tracking_log": 0, "pages": 0}
    per_store: dict[str, int] = {}
    phase_seconds: dict[str, float] = {}
    first: purge.PurgeResult | None = None
    last: purge.PurgeResult | None = None
    try:
        for _ in range(MAX_PASSES):
            writer = _ProgressWriter(run_id, dict(totals))
            last = purge.purge_expired(progress=writer)
            first = first or last
            names = {store.id: store.name for store in last.settings.stores}
            for store_id, count in last.messages_deleted.items():
                name = names.get(store_id, str(store_id))
                per_store[name] = per_store.get(name, 0) + count
            totals["messages"] += sum(last.messages_deleted.values())
            totals["smtp_log"] += last.smtp_log_deleted
            totals["tracking_log"] += last.tracking_log_deleted
            totals["pages"] += last.pages_returned
            for name, seconds in last.phase_seconds.items():
                phase_seconds[name] = round(phase_seconds.get(name, 0.0) + seconds, 3)
            details = {"messages_per_store": per_store, "phase_seconds": phase_seconds}
            finished = _purge_finish(run_id, first, last, totals, details)
            if finished:
                break
            # A retention was shortened during this pass: clear the flag and go round again.
            again = PurgeRun.objects.filter(
                pk=run_id, state=PurgeState.RUNNING, follow_up=True
            ).update(follow_up=False)
            if not again:
                raise PurgeLost(f"purge run {run_id} is no longer running")
        else:
            _purge_finish(run_id, first, last, totals, details, force=True)
    except PurgeLost:
        logger.warning("retention purge %s was abandoned while it ran", run_id)
        return PurgeRun.objects.get(pk=run_id).state
    except Exception as exc:  # the purge's own errors, SQLite's, the soft time limit
        _purge_fail(run_id, exc)
        return PurgeState.FAILED
    return PurgeState.SUCCEEDED


def _purge_finish(
    run_id: int,
    first: purge.PurgeResult,
    last: purge.PurgeResult,
    totals: dict[str, int],
    details: dict[str, Mapping[str, object]],
    *,
    force: bool = False,
) -> bool:
    """Mark the run succeeded (unless a follow-up is pending) and write its event."""
    reclaimed = max(0, first.store_bytes_before - last.store_bytes_after)
    runs = PurgeRun.objects.filter(pk=run_id, state=PurgeState.RUNNING)
    if not force:
        runs = runs.filter(follow_up=False)
    finished = runs.update(
        state=PurgeState.SUCCEEDED,
        phase=PurgePhase.DONE,
        finished_at=timezone.now(),
        heartbeat_at=timezone.now(),
        messages_deleted=totals["messages"],
        smtp_log_deleted=totals["smtp_log"],
        tracking_log_deleted=totals["tracking_log"],
        pages_returned=totals["pages"],
        store_bytes_before=first.store_bytes_before,
        store_bytes_after=last.store_bytes_after,
        disk_free_before=first.disk_free_before,
        disk_free_after=last.disk_free_after,
        bytes_reclaimed=reclaimed,
        details={
            **details,
            "retention_days": {
                **{store.name: store.retention_days for store in last.settings.stores},
                LOG_LABELS[SMTP_LOG]: last.settings.smtp_log_days,
                LOG_LABELS[TRACKING_LOG]: last.settings.tracking_log_days,
            },
        },
    )
    if not finished:
        return False
    run = PurgeRun.objects.get(pk=run_id)
    event_write(
        category=Category.MAIL,
        message=f"Retention purge reclaimed {filesizeformat(reclaimed)}: deleted "
        f"{run.messages_deleted} messages, {run.smtp_log_deleted} SMTP log and "
        f"{run.tracking_log_deleted} tracking log entries",
        user=run.requested_by,
        details={
            "run": run.pk,
            "trigger": run.trigger,
            "bytes_reclaimed": reclaimed,
            "disk_free_before": first.disk_free_before,
            "disk_free_after": last.disk_free_after,
            "messages_deleted": run.messages_deleted,
            "smtp_log_deleted": run.smtp_log_deleted,
            "tracking_log_deleted": run.tracking_log_deleted,
            "messages_per_store": details["messages_per_store"],
        },
    )
    return True


def _purge_fail(run_id: int, exc: BaseException) -> None:
    """Mark the run failed (its counters keep the last progress report) and say so."""
    logger.exception("retention purge %s failed", run_id)
    failed = PurgeRun.objects.filter(pk=run_id, state=PurgeState.RUNNING).update(
        state=PurgeState.FAILED,
        finished_at=timezone.now(),
        error=f"{type(exc).__name__}: {exc}"[:2000],
    )
    if failed:
        event_write(
            category=Category.MAIL,
            severity=Severity.ERROR,
            message=f"Retention purge failed: {exc}"[:500],
            details={"run": run_id, "error": f"{type(exc).__name__}: {exc}"[:500]},
        )


def purge_scheduled(*, executor: str = "") -> PurgeState | None:
    """The daily run (beat, no run id): reap lost runs, then create a run and execute it here.

    If a purge is already queued or running, that one covers today and nothing is started.
    """
    purge_runs_reap()
    try:
        with transaction.atomic():
            run = PurgeRun.objects.create(trigger=PurgeTrigger.SCHEDULE, reason="Daily purge")
    except IntegrityError:
        logger.info("a retention purge is already active; the daily run is skipped")
        return None
    return purge_run_execute(run.pk, executor=executor)
