"""What every phase of the install and its rollback works through: the run held by this
executor (every write fenced on its job), progress, abort and lease checks, the run's log and
events, and the job's end written with the run's.

upgrades.install runs the job (start, the phase loop, the outcome of a phase),
upgrades.phases holds the ten phases, upgrades.rollback puts the old system back; all three
build on this module, which builds on none of them.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings
from django.db.models import QuerySet

from appliance.firmware import spool, updatelogs
from appliance.system import priority
from appliance.system.errors import ApplianceError
from appliance.system.paths import layout
from events.models import Category, Severity
from events.services import User, event_write
from jobs import engine as jobs_engine
from jobs.models import JobState
from upgrades.models import (
    PHASE_COUNT,
    Download,
    InstallPhase,
    InstallRun,
    InstallState,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between progress writes of one phase
T = TypeVar("T")
ONLINE_PHASES = (1, 2)  # nothing the running appliance uses is touched: abort allowed
COMMIT_PHASE = PHASE_COUNT

# What the run's final state makes of its job.
JOB_OUTCOME = {
    InstallState.SUCCEEDED: JobState.SUCCEEDED,
    InstallState.ROLLED_BACK: JobState.ROLLED_BACK,
    InstallState.ABORTED: JobState.CANCELLED,
    InstallState.FAILED: JobState.FAILED,
}


# --- Internal outcomes of a phase -----------------------------------------------------------


# Another executor holds the run now: stop touching the appliance.
LeaseLost = jobs_engine.LeaseLost


class Stopped(Exception):
    """An administrator aborted the install in phases 1-2."""


class PhaseFailed(Exception):
    """The phase cannot complete; the message says why."""


def event(
    message: str,
    *,
    severity: int = Severity.INFO,
    user: User | None = None,
    **details: Any,
) -> None:
    """An event of Updates & Licensing: the one writer of the app's feed checks, downloads,
    licenses, installs, returns and schedules (all of them below or beside this module)."""
    event_write(
        category=Category.UPDATE, message=message, severity=severity, user=user, details=details
    )


def log(run: InstallRun, line: str) -> None:
    """One line in the run's log; a log that cannot be written never stops the install."""
    if not run.log_name:
        return
    try:
        updatelogs.log_append(run.log_name, line)
    except (OSError, ValueError):
        logger.exception("install %s: cannot write its log", run.pk)


def mine(run_id: int, lease: jobs_engine.Lease) -> QuerySet[InstallRun]:
    """The run while this executor still holds its job: every write of a phase goes through it."""
    return InstallRun.objects.filter(
        pk=run_id, job_id=lease.job_id, job__fence=lease.fence, job__state=JobState.RUNNING
    )


def bundle_path(download: Download) -> Path:
    return spool.bundle_path(spool.bundle_id(download.version, download.sha256))


def message_count(msgstore: Any) -> int:
    totals = msgstore.totals()
    return totals.messages if totals is not None else 0


def abort_requested(run_id: int) -> bool:
    return bool(
        InstallRun.objects.filter(pk=run_id).values_list("abort_requested", flat=True).first()
    )


def wait(lease: jobs_engine.Lease, seconds: float) -> None:
    """A pause before a retry, keeping the lease (the heartbeat renews it meanwhile)."""
    if lease.lost.wait(seconds):
        raise LeaseLost("the install's job moved on during a retry pause")


def finish_job(lease: jobs_engine.Lease, run: InstallRun, state: InstallState) -> None:
    """The job's end, written in the transaction that wrote the run's (the caller's)."""
    if not lease.finish(
        JOB_OUTCOME[state], error=run.error if state != InstallState.SUCCEEDED else ""
    ):
        raise LeaseLost(f"install {run.pk}: its job moved on")


class PhaseContext:
    """One executor's run of one phase: the row, progress writes, abort and lease checks."""

    def __init__(self, run: InstallRun, number: int, lease: jobs_engine.Lease) -> None:
        self.run = run
        self.number = number
        self.lease = lease
        self._last_write = 0.0
        self._last_stop_check = 0.0

    @property
    def details(self) -> dict[str, Any]:
        return self.run.details

    def save_details(self, **values: Any) -> None:
        """Persist facts the next phases and the rollback need (before the next side effect)."""
        self.run.details = {**self.run.details, **values}
        self._update_run(details=self.run.details)

    def mine(self) -> QuerySet[InstallRun]:
        return mine(self.run.pk, self.lease)

    def _update_run(self, **fields: Any) -> None:
        if not self.mine().update(**fields):
            self.lease.lost.set()
            raise LeaseLost(f"install {self.run.pk}: its job moved on")
        for name, value in fields.items():
            setattr(self.run, name, value)

    def set_run(self, **fields: Any) -> None:
        self._update_run(**fields)

    def check(self) -> None:
        """Raise when the lease is gone; in phases 1-2 also when an abort was requested."""
        if self.lease.lost.is_set():
            raise LeaseLost(f"install {self.run.pk}: its job moved on")
        if self.should_stop():
            raise Stopped

    def should_stop(self) -> bool:
        """For the appliance's long steps (phases 1-2): stop promptly on abort or lease loss."""
        if self.lease.lost.is_set():
            return True
        if self.number not in ONLINE_PHASES:
            return False
        now = time.monotonic()
        if now - self._last_stop_check < PROGRESS_INTERVAL:
            return False
        self._last_stop_check = now
        return abort_requested(self.run.pk)

    def progress(
        self,
        done: int,
        total: int,
        *,
        unit: str = "bytes",
        message: str = "",
        force: bool = False,
    ) -> None:
        """Write the phase's progress at most every PROGRESS_INTERVAL."""
        if self.lease.lost.is_set():
            raise LeaseLost(f"install {self.run.pk}: its job moved on")
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_INTERVAL:
            return
        self._last_write = now
        fields: dict[str, Any] = {"done": max(0, int(done)), "total": max(0, int(total))}
        fields["unit"] = unit
        if message:
            fields["message"] = message[:300]
        InstallPhase.objects.filter(run=self.run, number=self.number).update(**fields)

    def callback(self, unit: str, message: str = "") -> Callable[..., None]:
        """A ``progress(done, total)`` callable for the appliance functions."""

        def report(done: Any = 0, total: Any = 0, *args: Any, **kwargs: Any) -> None:
            # Two shapes: progress(done, total), or one object with done, total (and step).
            text = message
            if hasattr(done, "done"):
                step = getattr(done, "step", "")
                text = f"{message}: {step}" if message and step else (step or message)
                done, total = done.done, done.total
            self.progress(int(done or 0), int(total or 0), unit=unit, message=text)

        return report

    def at_low_priority(
        self,
        work: Callable[[Callable[[Any], None], Callable[[], bool]], T],
        *,
        unit: str,
        message: str,
    ) -> T:
        """``work(progress, should_stop)`` in a niced thread of its own
        (:func:`appliance.system.priority.at_low_priority`): its progress is written, and the
        phase's stop question (abort, lease lost) asked, here, on this thread's connection."""
        return priority.at_low_priority(
            work,
            name=f"phase-{self.number}-online",
            report=self.callback(unit, message),
            should_stop=self.should_stop,
            poll=PROGRESS_INTERVAL,
        )

    def step(self, message: str) -> None:
        """Say what the phase does now (page and log)."""
        self.check()
        InstallPhase.objects.filter(run=self.run, number=self.number).update(message=message[:300])
        log(self.run, f"phase {self.number}: {message}")

    def counts(self, **values: Any) -> None:
        phase = InstallPhase.objects.get(run=self.run, number=self.number)
        InstallPhase.objects.filter(pk=phase.pk).update(counts={**phase.counts, **values})

    def checkpoint(self, where: str) -> None:
        """A test-only pause inside the phase (INSTALL_PHASE_DELAY_MS), so a kill lands here."""
        delay = settings.INSTALL_PHASE_DELAY_MS / 1000
        only = settings.INSTALL_PHASE_DELAY_PHASE
        if delay <= 0 or (only and only != self.number):
            return
        self.step(f"checkpoint: {where}")
        end = time.monotonic() + delay
        while time.monotonic() < end:
            time.sleep(0.05)
            self.check()


# Less free than this on the appliance root's disk is "full": SQLite and the file writes then
# fail with errors that do not say so ("disk I/O error").
FULL_DISK_BYTES = 1024 * 1024


def describe_failure(exc: BaseException) -> str:
    """What a phase or rollback step that raised says to the administrator; a full disk is
    named as such, with what is free, whatever the error that met it."""
    text = str(exc) if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
    root = layout().root
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return text
    if free < FULL_DISK_BYTES:
        text += (
            f" (the disk holding the appliance, {root}, is full: {free} bytes free; "
            "free space on it)"
        )
    return text
