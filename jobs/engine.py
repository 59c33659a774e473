"""Start, claim, keep alive, report, finish and cancel jobs: every change a conditional update.

The lease says who runs a job and until when; the fence, moved on at every claim, makes every
write of a worker conditional on still holding the job, so a redelivered task or a worker that
stalled past its lease can never run a step twice or overwrite another's progress (fencing
tokens, as in UPGRADE-SAFETY.md). Services start jobs here; they never import a tasks module:
the job is handed to the worker by task name when the transaction commits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Required, TypedDict, TypeVar, Unpack

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from appliance.system.testpause import pause_for_tests
from events.models import Severity
from events.services import User, event_write, username_of
from jobs import leases, registry
from jobs.models import ACTIVE_STATES, FINAL_STATES, Job, JobState
from lmi import celery as lmi_celery
from lmi.progress import RateMeter

logger = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_INTERVAL = 0.5  # seconds between progress writes within one step


class JobError(Exception):
    """A job cannot be started or changed as asked; the message is for the administrator."""


class JobConflict(JobError):
    """Another job of the same group is queued or running."""

    def __init__(self, message: str, active: Job | None) -> None:
        super().__init__(message)
        self.active = active


class LeaseLost(Exception):
    """The job moved on without this worker (reconciled, cancelled, finished): stop quietly."""


def event(job: Job, message: str, severity: str = Severity.INFO, **details: Any) -> None:
    """The one way a job's event is written: its kind's category, its requester, its id."""
    event_write(
        category=registry.get(job.kind).category,
        severity=severity,
        message=message,
        user=job.requested_by or None,
        details={"job": job.pk, "kind": job.kind, **details},
    )


def enqueue(job_id: int, kind: str) -> bool:
    """Hand the job to the worker; a broker that refuses leaves it queued for the reconciler."""
    try:
        lmi_celery.enqueue(registry.get(kind).task_name, job_id)
    except Exception:  # kombu raises several unrelated types for an unreachable broker
        logger.exception("could not enqueue job %s; the reconciler will", job_id)
        return False
    return True


class Request(TypedDict, total=False):
    """What a caller says about the job it starts (the same for every way of starting one)."""

    title: Required[str]
    user: User | None
    trigger: str
    # At most one queued or running job per non-empty group (JobConflict otherwise).
    conflict_group: str
    steps: int
    bytes_total: int
    details: Mapping[str, Any] | None


def _create(kind: str, request: Request, **fields: Any) -> Job:
    """The job row and its start event (unless its kind writes its own); JobConflict (naming
    the active one) when its group is busy."""
    spec = registry.get(kind)
    group = request.get("conflict_group", "")
    try:
        with transaction.atomic():
            job = Job.objects.create(
                kind=kind,
                conflict_group=group,
                title=request["title"][:200],
                requested_by=username_of(request.get("user"))[:150],
                trigger=request.get("trigger", ""),
                steps=request.get("steps", 0),
                bytes_total=request.get("bytes_total", 0),
                details=dict(request.get("details") or {}),
                **fields,
            )
    except IntegrityError:
        active = Job.objects.filter(conflict_group=group, state__in=ACTIVE_STATES).first()
        if active is None:  # it ended meanwhile: say what kind of job it was
            message = f"A {spec.label.lower()} is already in progress: try again in a moment."
        else:
            who = f", started by {active.requested_by}" if active.requested_by else ""
            message = f"{active.title} is already in progress{who}: wait for it to finish."
        raise JobConflict(message, active) from None
    if not spec.own_events:
        event(job, f"{job.title} started")
    return job


def active_in(group: str) -> Job | None:
    """The queued or running job of a conflict group, if any (for a refusal that names it
    before any work; the group's constraint is what really keeps a second one out)."""
    return Job.objects.filter(conflict_group=group, state__in=ACTIVE_STATES).first()


def start(kind: str, *, enqueue_on_commit: bool = True, **request: Unpack[Request]) -> Job:
    """Create a queued job and enqueue it on commit; JobConflict when its group is busy.

    With ``enqueue_on_commit=False`` the caller claims it in its own process (update-control
    downloading in the foreground); should that process die, the reconciler sends it on.
    """
    with transaction.atomic():
        job = _create(kind, request)
        pk = job.pk
        if enqueue_on_commit:
            transaction.on_commit(lambda: enqueue(pk, kind))
    return job


@dataclass
class Lease:
    """A worker's hold on one job; every write through it is fenced."""

    job_id: int
    owner: str
    fence: int
    kind: str
    lease_seconds: float
    # Set once a write found the job moved on, or the heartbeat could not renew the lease: a
    # long step that cannot report progress looks at it between pieces of work.
    lost: threading.Event = field(default_factory=threading.Event, repr=False)
    _meter: RateMeter = field(default_factory=RateMeter, repr=False)
    _last_write: float = field(default=0.0, repr=False)
    _last_step: int = field(default=-1, repr=False)

    def _held(self) -> Any:
        return Job.objects.filter(pk=self.job_id, fence=self.fence, state=JobState.RUNNING)

    def job(self) -> Job:
        return Job.objects.get(pk=self.job_id)

    def renew(self) -> None:
        """Extend the lease (the heartbeat); LeaseLost when the job moved on."""
        now = timezone.now()
        if not self._held().update(
            heartbeat_at=now, lease_expires_at=now + timedelta(seconds=self.lease_seconds)
        ):
            self.lost.set()
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.owner}")

    def progress(
        self,
        *,
        step: int | None = None,
        steps: int | None = None,
        step_name: str | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        details: Mapping[str, Any] | None = None,
        rate: float | None = None,
    ) -> None:
        """Record progress (throttled within a step); renews the lease; LeaseLost when lost.

        The rate is smoothed here from ``bytes_done``, unless the work measures its own
        (``rate``: a download that knows when its transfer paused for a retry)."""
        clock = time.monotonic()
        new_step = step is not None and step != self._last_step
        if rate is not None:
            self._meter.rate = rate
        elif bytes_done is not None:
            self._meter.update(bytes_done, clock)
        if not new_step and clock - self._last_write < PROGRESS_INTERVAL:
            return
        self._last_write = clock
        if step is not None:
            self._last_step = step
        now = timezone.now()
        values: dict[str, Any] = {
            "heartbeat_at": now,
            "progress_at": now,
            "lease_expires_at": now + timedelta(seconds=self.lease_seconds),
            "rate": self._meter.rate,
        }
        for name, value in (
            ("step", step),
            ("steps", steps),
            ("step_name", step_name),
            ("bytes_done", bytes_done),
            ("bytes_total", bytes_total),
        ):
            if value is not None:
                values[name] = value
        if details is not None:
            job = self.job()
            values["details"] = {**job.details, **details}
        if not self._held().update(**values):
            self.lost.set()
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.owner}")
        if new_step:
            pause_for_tests(self.kind, self._last_step)

    def cancel_requested(self) -> bool:
        return Job.objects.filter(pk=self.job_id, cancel_requested=True).exists()

    def take_again(self) -> bool:
        """Clear a request to go round once more; True when there was one to take."""
        return bool(self._held().filter(again_requested=True).update(again_requested=False))

    def finish(
        self,
        state: JobState,
        *,
        error: str = "",
        message: str = "",
        details: Mapping[str, Any] | None = None,
        unless_again: bool = False,
    ) -> bool:
        """Write the final state (and its event); False when the job had moved on, or (with
        ``unless_again``) when it was asked to go round once more: the check and the write are
        one update, so a request that comes in at the last moment is never lost."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")
        job = self.job()
        values: dict[str, Any] = {
            "state": state,
            "finished_at": timezone.now(),
            "error": error[:2000],
            "lease_owner": "",
            "lease_expires_at": None,
        }
        if state == JobState.SUCCEEDED:
            values.update(step=F("steps"), bytes_done=F("bytes_total"))
        if details is not None:
            values["details"] = {**job.details, **details}
        held = self._held().filter(again_requested=False) if unless_again else self._held()
        if not held.update(**values):
            return False
        severity = {JobState.SUCCEEDED: Severity.INFO, JobState.FAILED: Severity.ERROR}.get(
            state,
            Severity.WARNING,  # cancelled, rolled back: nothing broken, nothing done
        )
        text = message or (
            f"{job.title} {JobState(state).label.lower()}" + (f": {error}" if error else "")
        )
        if not registry.get(job.kind).own_events or message:
            event(job, text, severity, **({"error": error[:300]} if error else {}))
        return True

    def release(self) -> None:
        """Give the job up without finishing it (the next step runs in another task)."""
        self._held().update(lease_owner="", lease_expires_at=None)

    @contextmanager
    def keep_alive(self) -> Iterator[threading.Event]:
        """Renew the lease from a thread every third of it while the body runs.

        Yields ``lost``, set when the lease was lost, for long steps that cannot report progress
        but can look between pieces of work.
        """
        lost = self.lost
        stop = threading.Event()

        def beat() -> None:
            from django.db import connection

            try:
                while not stop.wait(self.lease_seconds / 3):
                    try:
                        self.renew()
                    except LeaseLost:
                        return  # renew() set lost
                    except Exception:  # a database blip: try again at the next beat
                        logger.exception("job %s: heartbeat failed", self.job_id)
            finally:
                connection.close()

        thread = threading.Thread(target=beat, name=f"job-{self.job_id}-heartbeat", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()


def claim(job_id: int, owner: str) -> Lease | None:
    """Take a queued job, or a running one whose holder is gone; None when someone holds it or
    it is finished (a redelivered task then does nothing)."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.state in FINAL_STATES:
        return None
    spec = registry.get(job.kind)
    now = timezone.now()
    free = Q(state=JobState.QUEUED) | Q(lease_owner="") | Q(lease_expires_at__lt=now)
    if job.state == JobState.RUNNING and job.lease_owner and leases.holder_dead(job.lease_owner):
        free |= Q(lease_owner=job.lease_owner)  # its process is gone: no need to wait
    claimed = (
        Job.objects.filter(pk=job_id, fence=job.fence, state__in=ACTIVE_STATES)
        .filter(free)
        .update(
            state=JobState.RUNNING,
            lease_owner=owner[:200],
            lease_expires_at=now + timedelta(seconds=spec.lease_seconds),
            heartbeat_at=now,
            fence=F("fence") + 1,
        )
    )
    if not claimed:
        return None
    Job.objects.filter(pk=job_id, started_at__isnull=True).update(started_at=now)
    return Lease(job_id, owner, job.fence + 1, job.kind, spec.lease_seconds)


def run_here(kind: str, body: Callable[[Lease], T], **request: Unpack[Request]) -> T:
    """Run short work in this process (a page's request, the CLI) as a job, and return what
    ``body`` returns; its exception propagates once the job is marked failed.

    The job is created already held by this process, so it is in the one table (history, one
    per group, events) and, should the process die, the reconciler sees its holder gone and
    does what the kind's ``on_dead`` says: ``resume`` hands it to a worker, which runs the
    kind's ``run`` (for a restore, finishing from its journal).
    """
    spec = registry.get(kind)
    owner = leases.executor_name("here")
    now = timezone.now()
    job = _create(
        kind,
        request,
        state=JobState.RUNNING,
        started_at=now,
        heartbeat_at=now,
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=spec.lease_seconds),
        fence=1,
    )
    lease = Lease(job.pk, owner, 1, kind, spec.lease_seconds)
    try:
        with lease.keep_alive():
            result = body(lease)
    except BaseException as exc:
        lease.finish(JobState.FAILED, error=str(exc) or type(exc).__name__)
        raise
    lease.finish(JobState.SUCCEEDED)  # a no-op when the body wrote its own final state
    return result


def start_driven(kind: str, **request: Unpack[Request]) -> Job:
    """Create a driven job (registry.Kind.driven): running from the start, held by nobody;
    its service moves it on and ends it with :func:`drive`. JobConflict when its group is busy."""
    if not registry.get(kind).driven:
        raise ValueError(f"job kind {kind} is run by a worker, not driven")
    now = timezone.now()
    return _create(kind, request, state=JobState.RUNNING, started_at=now, progress_at=now)


def drive(
    job_id: int,
    *,
    step: int | None = None,
    step_name: str | None = None,
    details: Mapping[str, Any] | None = None,
    final: JobState | None = None,
    error: str = "",
) -> bool:
    """Move a driven job on (its step) or end it (``final``); False when it already ended.

    The caller serialises its own advances (the cluster upgrade's revision), so this is the
    record of what the service decided, written in the caller's transaction.
    """
    values: dict[str, Any] = {"progress_at": timezone.now()}
    if step is not None:
        values["step"] = step
    if step_name is not None:
        values["step_name"] = step_name[:200]
    if details is not None:
        job = Job.objects.filter(pk=job_id).first()
        values["details"] = {**(job.details if job else {}), **details}
    if final is not None:
        if final not in FINAL_STATES:
            raise ValueError(f"{final} is not a final state")
        values.update(state=final, finished_at=timezone.now(), error=error[:2000])
        if final == JobState.SUCCEEDED:
            values["step"] = F("steps")
    return bool(Job.objects.filter(pk=job_id, state=JobState.RUNNING).update(**values))


def request_again(job_id: int) -> bool:
    """Ask an active job to go round once more before it finishes; False when it is not active
    (it finished meanwhile: the caller starts a new one)."""
    return bool(Job.objects.filter(pk=job_id, state__in=ACTIVE_STATES).update(again_requested=True))


def holder_gone(job: Job, now: datetime) -> bool:
    """Nobody runs this job any more: no lease, a lapsed one, or its process here is gone."""
    if not job.lease_owner or job.lease_expires_at is None:
        return True
    return job.lease_expires_at < now or leases.holder_dead(job.lease_owner)


def cancel(job_id: int, *, user: User | None) -> Job:
    """Cancel a queued job, or a cancellable one nobody runs any more, at once; ask a running
    cancellable one to stop between steps."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.state in FINAL_STATES:
        raise JobError("The job is not running.")
    spec = registry.get(job.kind)
    now = timezone.now()
    unheld = Q(state=JobState.QUEUED)
    if spec.cancellable and holder_gone(job, now):
        unheld |= Q(state=JobState.RUNNING, fence=job.fence)
    if Job.objects.filter(unheld, pk=job_id).update(
        state=JobState.CANCELLED, finished_at=now, lease_owner="", lease_expires_at=None
    ):
        if not spec.own_events:
            who = username_of(user) or "system"
            when = " before it started" if job.state == JobState.QUEUED else ""
            event(job, f"{job.title} cancelled{when} ({who})", Severity.WARNING)
    elif spec.cancellable:
        Job.objects.filter(pk=job_id, state=JobState.RUNNING).update(cancel_requested=True)
    else:
        raise JobError(f"A running {job.title.lower()} cannot be cancelled safely.")
    job.refresh_from_db()
    return job


def job_dict(job: Job) -> dict[str, Any]:
    """The one shape of a job for the browser, the API and the command line (plain JSON)."""
    spec = registry.get(job.kind)

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": job.pk,
        "kind": job.kind,
        "label": spec.label,
        "title": job.title,
        "state": job.state,
        "state_label": JobState(job.state).label,
        "step": job.step,
        "steps": job.steps,
        "step_name": job.step_name,
        "percent": round(job.percent, 1),
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "rate": round(job.rate, 1),
        "seconds_left": job.seconds_left,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "requested_by": job.requested_by,
        "error": job.error,
        "restarts": job.restarts,
        "cancellable": spec.cancellable and job.active,
        "again_requested": job.again_requested,
        "details": job.details,
    }
