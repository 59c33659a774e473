"""Writes of Mail Security: retention changes and the retention purge that reclaims disk space.

A shorter retention only frees space once the expired rows are deleted and the file shrinks,
so saving one starts a purge, a job of the engine (jobs/) handed to the worker when the
transaction commits. One purge is queued or running at a time; a retention shortened while one
is active asks that job to go round once more instead of starting a second.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from django.template.defaultfilters import filesizeformat

from appliance.mail import purge, retention
from events.models import Category
from events.services import User, event_write
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import Job, JobState
from mailsecurity.models import PURGE, PurgePhase, PurgeTrigger

logger = logging.getLogger(__name__)


MAX_RESTARTS = 2  # a purge whose worker keeps dying (a crash loop) fails after this many
# Pass this to a purge's follow-up loop at most; each pass is a retention shortened meanwhile.
MAX_PASSES = 10


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
    purge: Job | None
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


# --- The purge job ---------------------------------------------------------------------------
# A job of the engine (jobs/), one at a time (conflict group "purge"). A purge whose worker
# died is started again from the top: it deletes only expired rows, so a second pass over what
# the first already did deletes nothing twice.

_PHASES = (PurgePhase.MESSAGES, PurgePhase.SMTP_LOG, PurgePhase.TRACKING_LOG, PurgePhase.VACUUM)


def purge_start(
    *, trigger: PurgeTrigger, user: User | None = None, reason: str = ""
) -> tuple[Job, bool]:
    """Queue a purge, or (one is already queued or running) ask that one to go round again.

    Returns the job and whether it is new. The job is handed to the worker when the caller's
    transaction commits, so the worker never looks for a row that is not there yet.
    """
    for _ in range(3):
        try:
            job = jobs_engine.start(
                PURGE,
                title="Retention purge",
                user=user,
                trigger=trigger,
                conflict_group=PURGE,
                steps=len(_PHASES),
                details={"reason": reason[:500]},
            )
            return job, True
        except jobs_engine.JobConflict as exc:
            if exc.active is not None and jobs_engine.request_again(exc.active.pk):
                exc.active.refresh_from_db()
                return exc.active, False
            # It finished in between: start a new one.
    raise jobs_engine.JobError("The retention purge could not be started; try again.")


def purge_scheduled() -> Job | None:
    """The daily purge (beat); an active one covers today, so nothing is started then."""
    try:
        return jobs_engine.start(
            PURGE,
            title="Retention purge",
            trigger=PurgeTrigger.SCHEDULE,
            conflict_group=PURGE,
            steps=len(_PHASES),
            details={"reason": "Daily purge"},
        )
    except jobs_engine.JobConflict:
        logger.info("a retention purge is already active; the daily run is skipped")
        return None


class _Totals:
    """What the passes of one job deleted so far; reported as the job's progress."""

    def __init__(self) -> None:
        self.counts = {
            "messages_deleted": 0,
            "smtp_log_deleted": 0,
            "tracking_log_deleted": 0,
            "pages_returned": 0,
        }
        self.per_store: dict[str, int] = {}
        self.phase_seconds: dict[str, float] = {}

    def with_progress(self, done: purge.PurgeProgress) -> dict[str, int]:
        """The totals plus what the pass under way has done."""
        return {
            "messages_deleted": self.counts["messages_deleted"]
            + sum(done.messages_deleted.values()),
            "smtp_log_deleted": self.counts["smtp_log_deleted"] + done.smtp_log_deleted,
            "tracking_log_deleted": self.counts["tracking_log_deleted"] + done.tracking_log_deleted,
            "pages_returned": self.counts["pages_returned"] + done.pages_returned,
        }

    def add(self, result: purge.PurgeResult) -> None:
        names = {store.id: store.name for store in result.settings.stores}
        for store_id, count in result.messages_deleted.items():
            name = names.get(store_id, str(store_id))
            self.per_store[name] = self.per_store.get(name, 0) + count
        self.counts = self.with_progress(
            purge.PurgeProgress(
                messages_deleted=result.messages_deleted,
                smtp_log_deleted=result.smtp_log_deleted,
                tracking_log_deleted=result.tracking_log_deleted,
                pages_returned=result.pages_returned,
            )
        )
        for name, seconds in result.phase_seconds.items():
            self.phase_seconds[name] = round(self.phase_seconds.get(name, 0.0) + seconds, 3)


def purge_job_run(lease: jobs_engine.Lease) -> None:
    """Purge for one job, going round again while retentions were shortened meanwhile.

    The job finishes as succeeded only when no new request came in: the check and the final
    write are one update (Lease.finish ``unless_again``), so a retention shortened at the last
    moment is purged by this job, not forgotten.
    """
    totals = _Totals()

    def progress(done: purge.PurgeProgress) -> None:
        phase = PurgePhase(done.phase)
        lease.progress(
            step=_PHASES.index(phase),
            step_name=phase.label,
            details=totals.with_progress(done),
        )

    lease.progress(step=0, step_name=PurgePhase.MESSAGES.label)
    first: purge.PurgeResult | None = None
    for passes in range(1, MAX_PASSES + 1):
        last = purge.purge_expired(progress=progress)
        first = first or last
        totals.add(last)
        if lease.finish(
            JobState.SUCCEEDED,
            message=_purge_summary(first, last, totals),
            details=_purge_details(first, last, totals),
            unless_again=passes < MAX_PASSES,
        ):
            return
        if not lease.take_again():
            raise jobs_engine.LeaseLost(f"purge job {lease.job_id} moved on")


def _purge_details(
    first: purge.PurgeResult, last: purge.PurgeResult, totals: _Totals
) -> dict[str, object]:
    return {
        **totals.counts,
        "store_bytes_before": first.store_bytes_before,
        "store_bytes_after": last.store_bytes_after,
        "disk_free_before": first.disk_free_before,
        "disk_free_after": last.disk_free_after,
        "bytes_reclaimed": max(0, first.store_bytes_before - last.store_bytes_after),
        "messages_per_store": totals.per_store,
        "phase_seconds": totals.phase_seconds,
        "retention_days": {
            **{store.name: store.retention_days for store in last.settings.stores},
            LOG_LABELS[SMTP_LOG]: last.settings.smtp_log_days,
            LOG_LABELS[TRACKING_LOG]: last.settings.tracking_log_days,
        },
    }


def _purge_summary(first: purge.PurgeResult, last: purge.PurgeResult, totals: _Totals) -> str:
    reclaimed = max(0, first.store_bytes_before - last.store_bytes_after)
    return (
        f"Retention purge reclaimed {filesizeformat(reclaimed)}: deleted "
        f"{totals.counts['messages_deleted']} messages, {totals.counts['smtp_log_deleted']} "
        f"SMTP log and {totals.counts['tracking_log_deleted']} tracking log entries"
    )


def register_job_kinds() -> None:
    """The purge kind of the job engine (MailSecurityConfig.ready)."""
    jobs_registry.register(
        jobs_registry.Kind(
            name=PURGE,
            label="Retention purge",
            category=Category.MAIL,
            run=purge_job_run,
            on_dead="restart",
            max_restarts=MAX_RESTARTS,
        )
    )
