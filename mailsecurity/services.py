"""Writes of Mail Security: retention changes and the retention purge that reclaims disk space.

A shorter retention only frees space once the expired rows are deleted and the file shrinks,
so saving one starts a purge, a job of the engine (jobs/) handed to the worker when the
transaction commits. One purge is queued or running at a time; a retention shortened while one
is active asks that job to go round once more instead of starting a second.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from accounts.roles import READ_ONLY_REFUSAL, is_administrator
from appliance.mail import purge, quarantine, retention
from appliance.mail.quarantine import QuarantinedCopy
from events.models import Category, Severity
from events.services import User, event_write, username_of
from jobs import engine as jobs_engine
from jobs import registry as jobs_registry
from jobs.models import Job, JobState
from mailsecurity.models import PURGE, QUARANTINE_RELEASE, PurgePhase, PurgeTrigger
from mailsecurity.planner import LOG_LABELS, SMTP_LOG, TRACKING_LOG, store_key
from smtp import delivery, spool
from smtp.engine import envelope_address
from smtp.server import appliance_hostname, new_queue_id

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


def days_text(count: int) -> str:
    return f"{count} day" if count == 1 else f"{count} days"


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


# --- Quarantine: release and delete ---------------------------------------------------------
# A release delivers a stored message on through the one delivery path the mail service uses
# (smtp.spool, the outgoing spool, then smtp.delivery: the next hop, or the local sink) and
# marks it released; the mark is claimed before anything is sent (msgstore's release record,
# inserted once), so no message is ever released twice. The stored copy stays until its
# retention (or a deletion) removes it, so the detail page can still say what was released.

MAX_BULK = 200  # messages per bulk release or deletion: one page of the tracking log


class QuarantineRefused(Exception):
    """A release or deletion that was not done; the message says why, for the administrator."""


@dataclass(frozen=True)
class ReleaseResult:
    """What a release did with each message asked for."""

    released: tuple[QuarantinedCopy, ...]
    failed: tuple[tuple[QuarantinedCopy, str], ...]  # the next hop did not take it: why
    released_already: tuple[int, ...]
    not_stored: tuple[int, ...]

    def summary(self) -> str:
        parts = []
        if self.released:
            parts.append(f"Released {_count(len(self.released))}")
        if self.failed:
            parts.append(
                f"{_count(len(self.failed))} not released, still in quarantine: "
                + "; ".join(error for _, error in self.failed[:3])
            )
        if self.released_already:
            parts.append(
                f"{_count(len(self.released_already))} released or delivered already, skipped"
            )
        return _summary(parts, self.not_stored, "Nothing was released.")


@dataclass(frozen=True)
class DeleteResult:
    """What a deletion did with each message asked for."""

    deleted: tuple[QuarantinedCopy, ...]
    releasing: tuple[int, ...]
    not_stored: tuple[int, ...]

    def summary(self) -> str:
        parts = []
        if self.deleted:
            parts.append(f"Deleted {_count(len(self.deleted))}")
        if self.releasing:
            parts.append(f"{_count(len(self.releasing))} being released right now, not deleted")
        return _summary(parts, self.not_stored, "Nothing was deleted.")


def _count(number: int) -> str:
    return f"{number} message" if number == 1 else f"{number} messages"


def _summary(parts: list[str], not_stored: tuple[int, ...], nothing: str) -> str:
    """A release's or deletion's outcome in sentences: ``parts``, then the messages skipped for
    being gone already (both skip those alike), or ``nothing`` when nothing at all happened."""
    if not_stored:
        parts = [
            *parts,
            f"{_count(len(not_stored))} no longer stored (deleted or purged by retention), skipped",
        ]
    return ". ".join(parts) + "." if parts else nothing


def _checked_ids(message_ids: Sequence[int], user: User | None) -> list[int]:
    """The distinct ids, refused for a read-only user (the views refuse first; a service
    reached another way must not release mail for one) and for too many or none."""
    if user is not None and not isinstance(user, str) and not is_administrator(user):
        raise QuarantineRefused(READ_ONLY_REFUSAL)
    ids = list(dict.fromkeys(message_ids))
    if not ids:
        raise QuarantineRefused("No message was chosen.")
    if len(ids) > MAX_BULK:
        raise QuarantineRefused(f"Choose at most {MAX_BULK} messages at a time.")
    return ids


def _about(copy: QuarantinedCopy) -> dict[str, object]:
    return {
        "message": copy.id,
        "message_id": copy.message_id,
        "store": copy.store_name,
        "sender": copy.sender,
        "recipients": list(copy.recipients),
        "subject": copy.subject[:200],
        "size": copy.size,
    }


def _delivery_error(path: Path, error: BaseException, copy: QuarantinedCopy) -> str:
    """Why a released message was not delivered, and to whom it got nonetheless: the next hop
    may take some recipients and refuse others (the spool file then lists only the rest)."""
    text = str(error) or type(error).__name__
    try:
        left = spool.parse_spool_file(path, path.read_bytes()).recipients
    except (OSError, ValueError):
        return text
    taken = [recipient for recipient in copy.recipients if recipient not in left]
    return f"{text} (delivered to {', '.join(taken)} only)" if taken else text


def quarantine_release(
    message_ids: Sequence[int], *, user: User | None, root: Path | None = None
) -> ReleaseResult:
    """Deliver quarantined messages on, each at most once, one event per message.

    A job of the job engine, run in this process (the page's request): should the process die
    half-way, the reconciler hands the job to a worker, which goes on from what the job and
    the release records say (:func:`_release_resume`), so no claimed message is left "release
    under way" for ever, and none is delivered twice.

    Each message is claimed first (a release record naming its spool queue id, inserted in one
    transaction for all of them), then spooled and delivered over one connection to the next
    hop, exactly as the mail service delivers what its policy lets through. A message the next
    hop does not take is taken out of the spool again and its claim dropped: it stays in
    quarantine and can be released again; nothing is retried behind the administrator's back.
    """
    ids = _checked_ids(message_ids, user)
    # The queue ids are recorded with the job before anything is claimed: a resumed release
    # knows its own claims (and their spool files) by them.
    queue = {message_id: new_queue_id() for message_id in ids}
    return jobs_engine.run_here(
        QUARANTINE_RELEASE,
        lambda lease: _release(lease, ids, queue, user, root),
        title=f"Release of {_count(len(ids))} from quarantine",
        user=user,
        steps=3,
        details={"queue": {str(k): v for k, v in queue.items()}, "by": username_of(user)},
    )


def _release(
    lease: jobs_engine.Lease,
    ids: list[int],
    queue: dict[int, str],
    user: User | None,
    root: Path | None,
) -> ReleaseResult:
    claims = quarantine.quarantine_release_claim(
        ids, by=username_of(user), now=int(timezone.now().timestamp()), queue_ids=queue, root=root
    )
    lease.progress(step=0, step_name="Claimed")
    spooled, failed = _spool(claims.claimed, queue, root)
    # Written before delivery: a spool file missing after this was delivered (and removed).
    lease.progress(
        step=1, step_name="Delivering", details={"spooled": [c.copy.id for c, _ in spooled]}
    )
    delivered, undelivered = _deliver(spooled, user, root, failed=failed, lease=lease)
    return ReleaseResult(
        released=delivered,
        failed=undelivered,
        released_already=claims.released_already,
        not_stored=claims.not_stored,
    )


def _spool(
    claims: Sequence[quarantine.ReleaseClaim], queue: dict[int, str], root: Path | None
) -> tuple[list[tuple[quarantine.ReleaseClaim, Path]], list[tuple[QuarantinedCopy, str]]]:
    spooled: list[tuple[quarantine.ReleaseClaim, Path]] = []
    failed: list[tuple[QuarantinedCopy, str]] = []
    for claim in claims:
        try:
            path = spool.spool_write(
                queue[claim.copy.id],
                envelope_address(claim.copy.sender),
                claim.copy.recipients,
                claim.raw,
                root,
            )
        except (OSError, ValueError) as exc:
            failed.append((claim.copy, f"it could not be spooled: {exc}"))
            continue
        spooled.append((claim, path))
    return spooled, failed


def _deliver(
    spooled: Sequence[tuple[quarantine.ReleaseClaim, Path]],
    user: User | None,
    root: Path | None,
    *,
    failed: Sequence[tuple[QuarantinedCopy, str]] = (),
    lease: jobs_engine.Lease | None = None,
) -> tuple[tuple[QuarantinedCopy, ...], tuple[tuple[QuarantinedCopy, str], ...]]:
    """Deliver the spooled claims, mark them released or drop their claims, one event each."""
    results = (
        delivery.deliver_batch([path for _, path in spooled], root, appliance_hostname(root))
        if spooled
        else []
    )
    if lease is not None:
        lease.progress(step=2, step_name="Recording")
    delivered: list[tuple[QuarantinedCopy, str]] = []
    undelivered = list(failed)
    for (claim, path), result in zip(spooled, results, strict=True):
        if isinstance(result, BaseException):
            undelivered.append((claim.copy, _delivery_error(path, result, claim.copy)))
            path.unlink(missing_ok=True)
        else:
            delivered.append((claim.copy, result))
    return _settle(delivered, undelivered, user, root)


def _settle(
    delivered: Sequence[tuple[QuarantinedCopy, str]],
    failed: Sequence[tuple[QuarantinedCopy, str]],
    user: User | None,
    root: Path | None,
) -> tuple[tuple[QuarantinedCopy, ...], tuple[tuple[QuarantinedCopy, str], ...]]:
    now = int(timezone.now().timestamp())
    done = set(
        quarantine.quarantine_release_finish([c.id for c, _ in delivered], now=now, root=root)
    )
    quarantine.quarantine_release_abandon([copy.id for copy, _ in failed], root=root)
    for copy, where in delivered:
        if copy.id in done:
            event_write(
                category=Category.MAIL,
                message=f"Released quarantined message {copy.id} from {copy.store_name} to "
                f"{', '.join(copy.recipients)[:200]} (delivered to {where})",
                user=user,
                details={**_about(copy), "delivered_to": where, "outcome": "released"},
            )
    for copy, error in failed:
        event_write(
            category=Category.MAIL,
            message=f"Release of quarantined message {copy.id} failed; it stays in "
            f"quarantine: {error}",
            severity=Severity.WARNING,
            user=user,
            details={**_about(copy), "error": error[:500], "outcome": "failed"},
        )
    return tuple(copy for copy, _ in delivered), tuple(failed)


def _release_resume(lease: jobs_engine.Lease) -> None:
    """A release whose process died (the reconciler's ``resume``): finish its own claims.

    A claimed message whose spool file is there is delivered; one recorded as spooled whose
    file is gone was delivered before the process died (the file leaves the spool after the
    next hop's 250) and is marked released; one never spooled is spooled from the store and
    delivered. Messages it had not claimed yet are left alone: nothing was done to them.
    """
    details = lease.job().details
    queue = {int(k): v for k, v in details.get("queue", {}).items()}
    spooled_before = set(details.get("spooled", []))
    user = details.get("by") or None
    to_deliver: list[tuple[quarantine.ReleaseClaim, Path]] = []
    delivered: list[tuple[QuarantinedCopy, str]] = []
    unspooled: list[quarantine.ReleaseClaim] = []
    for claim in quarantine.quarantine_release_claimed(queue):
        found = spool.spool_find(queue[claim.copy.id])
        if found is not None:
            to_deliver.append((claim, found))
        elif claim.copy.id in spooled_before:
            delivered.append((claim.copy, "the next hop, before the release was interrupted"))
        else:
            unspooled.append(claim)
    spooled, failed = _spool(unspooled, queue, None)
    lease.progress(step=1, step_name="Delivering")
    _settle(delivered, (), user, None)
    _deliver(to_deliver + spooled, user, None, failed=failed)


def quarantine_delete(
    message_ids: Sequence[int], *, user: User | None, root: Path | None = None
) -> DeleteResult:
    """Delete quarantined messages in one transaction, one event per message deleted.

    The tracking log keeps its rows (it records what happened to the mail; its entries then
    say the copy is no longer stored), exactly as after a retention purge.
    """
    outcome = quarantine.quarantine_delete(_checked_ids(message_ids, user), root=root)
    for copy in outcome.deleted:
        event_write(
            category=Category.MAIL,
            message=f"Deleted quarantined message {copy.id} from {copy.store_name}: "
            f"{copy.subject[:100]!r} from {copy.sender[:100]}",
            user=user,
            details={**_about(copy), "outcome": "deleted"},
        )
    return DeleteResult(outcome.deleted, outcome.releasing, outcome.not_stored)


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
    """The purge and quarantine release kinds of the job engine (MailSecurityConfig.ready)."""
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
    jobs_registry.register(
        jobs_registry.Kind(
            name=QUARANTINE_RELEASE,
            label="Quarantine release",
            category=Category.MAIL,
            run=_release_resume,
            on_dead="resume",  # its own claims and spool files say where it was
            own_events=True,  # one event per message released or not
        )
    )
