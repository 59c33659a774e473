"""Writes of the firmware install: preflight, start, abort, the ten phases and the rollback.

The run is a persisted state machine (``InstallRun`` and its ten ``InstallPhase`` rows, see
upgrades.models for the transitions) and one job of the job engine (kind ``install``). The
job's task claims it and runs the phases one after the other, then the rollback when one
failed (:func:`install_job_run`): there is no hand-off between phases that a broker blip could
lose. Every side effect of a phase is idempotent, so a phase whose worker was killed is simply
run again from its start by the next executor:

* one executor at a time: the engine's lease and fence; every write to the run is conditional
  on still holding the job (``_mine``), so a second copy of the task (a redelivery) finds it
  held and exits, and an executor that stalled past its lease changes nothing. The reconciler
  sees a dead holder (its process on this host gone at once, any other when its lease lapses)
  and hands the job to a worker (``on_dead="resume"``), which goes on where the run says;
* ``attempts`` counts phase starts: past ``INSTALL_MAX_ATTEMPTS`` (a crash loop) the run stops
  trying and rolls back;
* phases 1-2 touch nothing the running appliance uses: a failure or an abort there discards the
  staging and ends ABORTED. A failure in 3-9 (including the health check before commit) rolls
  back from the phase 4 and 5 backups and the previous slot. Phase 10 is the commit: a failure
  inside it is retried, never rolled back.

Every phase start, end and failure writes an event (Category.UPDATE) and a timestamped line to
the run's log in var/spool/updates/XPU.
"""

from __future__ import annotations

import logging
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from appliance.firmware import bundle as appliance_bundle
from appliance.firmware import spool, updatelogs
from appliance.system import maintenance
from appliance.system.errors import ApplianceError
from events.models import Category, Severity
from events.services import User, event_write, username_of
from jobs import engine as jobs_engine
from jobs import leases
from jobs import registry as jobs_registry
from jobs.models import APPLIANCE_GROUP, JobState
from upgrades import selectors
from upgrades.models import (
    FIRMWARE,
    INSTALL_ACTIVE_STATES,
    PHASE_COUNT,
    PHASE_NAMES,
    Download,
    InstallPhase,
    InstallRun,
    InstallState,
    InstallTrigger,
    PhaseState,
)

if TYPE_CHECKING:
    from appliance.config.configbackup import LoadedBackup
    from appliance.firmware.preflight import Check

logger = logging.getLogger(__name__)


PROGRESS_INTERVAL = 0.5  # seconds between progress writes of one phase
PHASE10_RETRY_MAX = 60  # seconds between retries of a failed commit
ROLLBACK_RETRY_MAX = 60  # seconds between the tries of a rollback that keeps failing
ROLLBACK_ALERT_AFTER = 3  # failed tries before a critical event says it keeps failing
ONLINE_PHASES = (1, 2)  # nothing the running appliance uses is touched: abort allowed
COMMIT_PHASE = PHASE_COUNT
INSTALL_KIND = "install"
# What the run's final state makes of its job.
JOB_OUTCOME = {
    InstallState.SUCCEEDED: JobState.SUCCEEDED,
    InstallState.ROLLED_BACK: JobState.ROLLED_BACK,
    InstallState.ABORTED: JobState.CANCELLED,
    InstallState.FAILED: JobState.FAILED,
}


# --- Errors a caller shows to a person ---------------------------------------------------------


class InstallError(Exception):
    """A refused request; the message says why and what to do."""


class PreflightFailed(InstallError):
    """At least one preflight check failed: nothing was changed."""

    def __init__(self, checks: list[Check]) -> None:
        self.checks = checks
        failed = [c for c in checks if c.status == "fail"]
        reasons = "; ".join(f"{c.title}: {c.value} ({c.advice})" for c in failed)
        super().__init__(f"The install cannot start, nothing was changed. {reasons}")


class InstallInProgress(InstallError):
    """One install at a time."""


class NothingToInstall(InstallError):
    """No verified newer firmware is in the spool."""


# --- Internal outcomes of a phase -----------------------------------------------------------


# Another executor holds the run now: stop touching the appliance.
_LeaseLost = jobs_engine.LeaseLost


class _Stopped(Exception):
    """An administrator aborted the install in phases 1-2."""


class _PhaseFailed(Exception):
    """The phase cannot complete; the message says why."""


# --- Small helpers ------------------------------------------------------------------------------


def _event(
    message: str,
    *,
    severity: int = Severity.INFO,
    user: User | None = None,
    **details: Any,
) -> None:
    event_write(
        category=Category.UPDATE, message=message, severity=severity, user=user, details=details
    )


def _log(run: InstallRun, line: str) -> None:
    """One line in the run's log; a log that cannot be written never stops the install."""
    if not run.log_name:
        return
    try:
        updatelogs.log_append(run.log_name, line)
    except (OSError, ValueError):
        logger.exception("install %s: cannot write its log", run.pk)


def _mine(run_id: int, lease: jobs_engine.Lease) -> QuerySet[InstallRun]:
    """The run while this executor still holds its job: every write of a phase goes through it."""
    return InstallRun.objects.filter(
        pk=run_id, job_id=lease.job_id, job__fence=lease.fence, job__state=JobState.RUNNING
    )


def _bundle_path(download: Download) -> Path:
    return spool.bundle_path(spool.bundle_id(download.version, download.sha256))


def _console_db_path() -> Path | None:
    conf = settings.DATABASES["default"]
    if str(conf.get("ENGINE", "")).endswith("sqlite3"):
        return Path(str(conf["NAME"]))
    return None


# --- Preflight ------------------------------------------------------------------------------------


# Tests on a shared machine cannot empty its disk: they point the 50% rule at a disk of their
# own making here (appliance.firmware.preflight's documented substitute). Production leaves it None.
PREFLIGHT_DISK_USAGE: Callable[[str], Any] | None = None


def install_preflight(*, user: User | None = None) -> list[Check]:
    """Every check before Install is allowed; reads only, never changes anything.

    The appliance's checks (appliance.firmware.preflight) plus the console's: the bundle present and
    verified again, the entitlement, and the cluster role. It is a plan that can be read at any
    time, like Proxmox's pmg7to8: before a download every check runs all the same, against the
    newest firmware offered, and those that need the bundle are pending rather than failed.
    """
    from appliance.firmware import preflight

    checks: list[Check] = []
    installed = selectors.installed_version()
    download = selectors.ready_download(installed)
    manifest = None
    offer = selectors.newest_downloadable(installed)
    if download is None:
        checks.append(
            preflight.Check(
                key="bundle",
                title="Firmware bundle",
                status=preflight.PENDING,
                value=(
                    f"firmware {offer.offer.version} is available, not yet downloaded"
                    if offer is not None
                    else f"nothing newer than the installed {installed or 'firmware'}"
                ),
                advice=(
                    "Download it under Updates & Licensing; it is verified again here."
                    if offer is not None
                    else ""
                ),
            )
        )
    else:
        try:
            manifest = appliance_bundle.verify_bundle(_bundle_path(download))
        except (appliance_bundle.BundleError, OSError) as exc:
            checks.append(
                preflight.Check(
                    key="bundle",
                    title="Firmware bundle",
                    status="fail",
                    value=f"firmware {download.version} does not verify: {exc}",
                    advice="Download the firmware again.",
                )
            )
        else:
            checks.append(
                preflight.Check(
                    key="bundle",
                    title="Firmware bundle",
                    status="pass",
                    value=f"firmware {manifest.version}, signature and digest verified",
                    advice="",
                )
            )
    lic = selectors.license_view()
    checks.append(
        preflight.Check(
            key="license",
            title="Update entitlement",
            status="pass" if lic.entitled else "fail",
            value=(
                f"updates included until {lic.updates_until}"
                if lic.entitled
                else (lic.reason or "no license is installed")
            ),
            advice=""
            if lic.entitled
            else "Upload a license with a valid update entitlement under Licensing.",
        )
    )
    from cluster.preflight import cluster_preflight_check  # issue 7: members follow Central

    checks.append(cluster_preflight_check(download.version if download else installed or ""))
    if manifest is not None:
        target, minimum, image = manifest.version, manifest.min_version, manifest.payload_size
    elif download is not None:
        return checks  # the bundle failed verification: nothing else can be trusted to it
    elif offer is not None:
        target, minimum, image = offer.offer.version, offer.offer.min_version, None
    else:
        target, minimum, image = None, "", None
    checks.extend(
        preflight.preflight_checks(
            target,
            minimum,
            console_db_path=_console_db_path(),
            image_bytes=image,
            disk_usage=PREFLIGHT_DISK_USAGE,
        )
    )
    return checks


# --- Start, abort, recover -----------------------------------------------------------------------


def _active_run() -> InstallRun | None:
    return InstallRun.objects.filter(component=FIRMWARE, state__in=INSTALL_ACTIVE_STATES).first()


def _in_progress(run: InstallRun | None) -> InstallInProgress:
    if run is None:
        return InstallInProgress("A firmware install is already in progress.")
    return InstallInProgress(
        f"A firmware install is already in progress: firmware {run.version}, phase {run.phase} "
        f"of {PHASE_COUNT} ({InstallState(run.state).label.lower()})."
    )


def install_start(*, user: User | None, trigger: InstallTrigger | str = "console") -> InstallRun:
    """Check, back up the configuration, create the run and its ten phases, enqueue phase 1.

    A failed preflight check raises :class:`PreflightFailed` before anything is changed.
    """
    if (active := _active_run()) is not None:
        raise _in_progress(active)
    if (busy := jobs_engine.active_in(APPLIANCE_GROUP)) is not None:
        who = f", started by {busy.requested_by}" if busy.requested_by else ""
        raise InstallInProgress(
            f"{busy.title} is in progress{who}: the install can start once it has finished."
        )
    installed = selectors.installed_version()
    download = selectors.ready_download(installed)
    if download is None:
        raise NothingToInstall(
            "No verified newer firmware is downloaded. Download it under Updates & Licensing first."
        )
    checks = install_preflight(user=user)
    if any(check.status == "fail" for check in checks):
        error = PreflightFailed(checks)
        _event(
            f"Install of firmware {download.version} refused by the preflight checks",
            severity=Severity.WARNING,
            user=user,
            version=download.version,
            failed=[c.key for c in checks if c.status == "fail"],
        )
        raise error
    from backups.services import config_backup_before_install

    try:
        header = config_backup_before_install(user=user)
    except (ApplianceError, OSError) as exc:
        raise InstallError(
            f"The automatic configuration backup failed, so the install did not start: {exc}"
        ) from exc
    with transaction.atomic():
        try:
            job = jobs_engine.start(
                INSTALL_KIND,
                title=f"Install of firmware {download.version}",
                user=user,
                trigger=str(trigger),
                conflict_group=APPLIANCE_GROUP,  # no restore or system backup under it
                steps=PHASE_COUNT,
                details={"version": download.version},
            )
        except jobs_engine.JobConflict as exc:
            raise InstallInProgress(str(exc)) from None
        try:
            with transaction.atomic():
                run = InstallRun.objects.create(
                    job=job,
                    download=download,
                    version=download.version,
                    from_version=installed or "",
                    requested_by=username_of(user),
                    trigger=str(trigger),
                    phase=1,
                    details={
                        "pre_install_backup": header.name,
                        "preflight": {c.key: c.status for c in checks},
                    },
                )
        except IntegrityError:
            raise _in_progress(_active_run()) from None
        run.log_name = f"install-{run.pk}-{run.version}.log"
        InstallRun.objects.filter(pk=run.pk).update(log_name=run.log_name)
        InstallPhase.objects.bulk_create(
            InstallPhase(run=run, number=number, name=name) for number, name in PHASE_NAMES.items()
        )
        _event(
            f"Install of firmware {run.version} started (from {run.from_version})",
            user=user,
            run=run.pk,
            version=run.version,
            trigger=run.trigger,
            backup=header.name,
        )
    _log(
        run,
        f"install of firmware {run.version} over {run.from_version} started by "
        f"{run.requested_by or 'the system'} ({run.trigger}); configuration backup {header.name}",
    )
    for check in checks:
        _log(run, f"preflight {check.key}: {check.status}: {check.value}")
    return run


def install_abort(*, user: User | None, run_id: int | None = None) -> InstallRun:
    """Stop the install in phases 1-2: the staging is discarded, the running system untouched."""
    query = InstallRun.objects.filter(component=FIRMWARE, state__in=INSTALL_ACTIVE_STATES)
    if run_id is not None:
        query = query.filter(pk=run_id)
    run = query.first()
    if run is None:
        raise InstallError("No firmware install is in progress.")
    if run.state == InstallState.ROLLING_BACK or run.phase not in ONLINE_PHASES:
        where = (
            f"in phase {run.phase} ({PHASE_NAMES[run.phase]})"
            if run.phase in PHASE_NAMES
            else "rolling back"
            if run.state == InstallState.ROLLING_BACK
            else "not yet in a phase"
        )
        raise InstallError(
            f"The install is {where}: it can be "
            "aborted only while the new system is downloaded and installed (phases 1 and 2). "
            "From phase 3 it completes, or rolls back by itself on any failure."
        )
    updated = InstallRun.objects.filter(
        pk=run.pk,
        state__in=(InstallState.QUEUED, InstallState.RUNNING),
        phase__in=ONLINE_PHASES,
    ).update(abort_requested=True)
    if not updated:
        run.refresh_from_db()
        raise InstallError(
            f"The install moved on (phase {run.phase}, {InstallState(run.state).label.lower()}) "
            "and can no longer be aborted."
        )
    _event(
        f"Abort of the install of firmware {run.version} requested in phase {run.phase}",
        user=user,
        run=run.pk,
        phase=run.phase,
    )
    _log(run, f"abort requested by {username_of(user) or 'the system'} in phase {run.phase}")
    # The executor sees the flag within a second; a dead one's successor aborts at its start.
    run.refresh_from_db()
    return run


def install_holds_maintenance() -> bool:
    """True while an install is past phase 2 (beat tasks that touch the appliance skip then)."""
    return InstallRun.objects.filter(state__in=INSTALL_ACTIVE_STATES, phase__gte=3).exists() or (
        InstallRun.objects.filter(state=InstallState.ROLLING_BACK).exists()
    )


def install_log_tail(run: InstallRun, lines: int = 200) -> list[str]:
    """The last lines of the run's log (timestamped, oldest first)."""
    if not run.log_name:
        return []
    try:
        return updatelogs.log_tail(run.log_name, lines)
    except (OSError, ValueError):
        return []


# --- The job: claiming the run, its phases one after the other, the rollback -----------------


def install_execute(run_id: int, executor: str | None = None) -> str:
    """Run the install in this process from where its run is to its end (tests, a bench);
    returns the state it left. A no-op when a live executor holds its job or it is finished."""
    run = InstallRun.objects.filter(pk=run_id).first()
    if run is None or run.job_id is None:
        return "missing"
    lease = jobs_engine.claim(run.job_id, executor or leases.executor_name("here"))
    if lease is not None:
        with lease.keep_alive():
            install_job_run(lease)
    run.refresh_from_db()
    return str(run.state)


def install_job_run(lease: jobs_engine.Lease) -> None:
    """The install kind's ``run``: the phases from the run's phase to the end, then the
    rollback when one failed; what a killed worker left is resumed here from the stored state."""
    run = InstallRun.objects.filter(job_id=lease.job_id).first()
    if run is None:
        lease.finish(JobState.FAILED, error="its install record is gone")
        return
    _mine(run.pk, lease).filter(state=InstallState.QUEUED).update(
        state=InstallState.RUNNING, started_at=timezone.now()
    )
    while True:
        if lease.lost.is_set():
            raise _LeaseLost(f"install {run.pk} is held by another executor")
        run.refresh_from_db()
        if run.state == InstallState.RUNNING:
            _execute_phase(run, run.phase, lease)
        elif run.state == InstallState.ROLLING_BACK:
            _rollback_execute(run, lease)
        elif run.state in JOB_OUTCOME:
            # Finished (an earlier executor may have died between the run's and the job's
            # write): the job ends the same way; a no-op when it already did.
            lease.finish(JOB_OUTCOME[InstallState(run.state)], error=run.error)
            return
        else:  # still queued: the update above did not go through, so the job is not ours
            raise _LeaseLost(f"install {run.pk} is held by another executor")


def _wait(lease: jobs_engine.Lease, seconds: float) -> None:
    """A pause before a retry, keeping the lease (the heartbeat renews it meanwhile)."""
    if lease.lost.wait(seconds):
        raise _LeaseLost("the install's job moved on during a retry pause")


def _finish_job(lease: jobs_engine.Lease, run: InstallRun, state: InstallState) -> None:
    """The job's end, written in the transaction that wrote the run's (the caller's)."""
    if not lease.finish(
        JOB_OUTCOME[state], error=run.error if state != InstallState.SUCCEEDED else ""
    ):
        raise _LeaseLost(f"install {run.pk}: its job moved on")


def register_job_kind() -> None:
    """The install kind of the job engine (UpgradesConfig.ready)."""
    jobs_registry.register(
        jobs_registry.Kind(
            name=INSTALL_KIND,
            label="Firmware install",
            category=Category.UPDATE,
            run=install_job_run,
            on_dead="resume",  # every phase and the rollback are idempotent
            # The run counts its own phase starts and rolls back a crash loop (attempts); the
            # engine must never give an install up half-done.
            max_restarts=10_000,
            lease_seconds=float(settings.INSTALL_LEASE_SECONDS),
            own_events=True,
        )
    )


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
        return _mine(self.run.pk, self.lease)

    def _update_run(self, **fields: Any) -> None:
        if not self.mine().update(**fields):
            self.lease.lost.set()
            raise _LeaseLost(f"install {self.run.pk}: its job moved on")
        for name, value in fields.items():
            setattr(self.run, name, value)

    def set_run(self, **fields: Any) -> None:
        self._update_run(**fields)

    def check(self) -> None:
        """Raise when the lease is gone; in phases 1-2 also when an abort was requested."""
        if self.lease.lost.is_set():
            raise _LeaseLost(f"install {self.run.pk}: its job moved on")
        if self.should_stop():
            raise _Stopped

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
        return _abort_requested(self.run.pk)

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
            raise _LeaseLost(f"install {self.run.pk}: its job moved on")
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

    def step(self, message: str) -> None:
        """Say what the phase does now (page and log)."""
        self.check()
        InstallPhase.objects.filter(run=self.run, number=self.number).update(message=message[:300])
        _log(self.run, f"phase {self.number}: {message}")

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


# --- Executing a phase ----------------------------------------------------------------------------


def _execute_phase(run: InstallRun, phase: int, lease: jobs_engine.Lease) -> None:
    """Run phase ``phase`` of the run; a failure rolls back (3-9), aborts (1-2) or is retried
    after a pause (10); LeaseLost when another executor has the run now."""
    _mine(run.pk, lease).update(attempts=F("attempts") + 1)
    run.refresh_from_db()
    ctx = PhaseContext(run, phase, lease)
    try:
        if run.abort_requested and phase in ONLINE_PHASES:
            raise _Stopped
        if run.attempts > settings.INSTALL_MAX_ATTEMPTS and phase != COMMIT_PHASE:
            raise _PhaseFailed(
                f"the install was started {run.attempts} times without completing "
                "(its worker keeps stopping): giving up"
            )
        _phase_start(ctx)
        PHASES[phase](ctx)
        _phase_succeeded(ctx)
    except _LeaseLost:
        logger.warning("install %s phase %s: lease lost, stopping", run.pk, phase)
        raise
    except _Stopped:
        _abort_finish(ctx, None)
    except Exception as exc:
        if phase in ONLINE_PHASES and _abort_requested(run.pk):
            # The appliance step stopped because of the abort (InstallAborted and the like).
            _abort_finish(ctx, None)
            return
        if isinstance(exc, _PhaseFailed):
            reason = str(exc)
        else:
            logger.exception("install %s phase %s failed", run.pk, phase)
            reason = (
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, ApplianceError) else str(exc)
            )
        _phase_failed(ctx, reason)


def _abort_requested(run_id: int) -> bool:
    return bool(
        InstallRun.objects.filter(pk=run_id).values_list("abort_requested", flat=True).first()
    )


def _phase_start(ctx: PhaseContext) -> None:
    now = timezone.now()
    InstallPhase.objects.filter(run=ctx.run, number=ctx.number).update(
        state=PhaseState.RUNNING,
        started_at=Coalesce(F("started_at"), now),
        finished_at=None,
        attempts=F("attempts") + 1,
        message="",
    )
    phase = InstallPhase.objects.get(run=ctx.run, number=ctx.number)
    name = PHASE_NAMES[ctx.number]
    ctx.lease.progress(
        step=ctx.number - 1, steps=PHASE_COUNT, step_name=f"Phase {ctx.number}: {name}"
    )
    if phase.attempts > 1:
        text = f"Install of {ctx.run.version}: phase {ctx.number} ({name}) restarted"
        _event(text + " (its previous executor stopped)", run=ctx.run.pk, phase=ctx.number)
        _log(ctx.run, f"phase {ctx.number} ({name}) restarted, attempt {phase.attempts}")
    else:
        _event(
            f"Install of {ctx.run.version}: phase {ctx.number} ({name}) started",
            run=ctx.run.pk,
            phase=ctx.number,
        )
        _log(ctx.run, f"phase {ctx.number} ({name}) started")


def _phase_succeeded(ctx: PhaseContext) -> None:
    run, number = ctx.run, ctx.number
    now = timezone.now()
    name = PHASE_NAMES[number]
    with transaction.atomic():
        InstallPhase.objects.filter(run=run, number=number, state=PhaseState.RUNNING).update(
            state=PhaseState.SUCCEEDED, finished_at=now, message=""
        )
        fields: dict[str, Any] = {}
        if number == COMMIT_PHASE:
            fields.update(state=InstallState.SUCCEEDED, finished_at=now)
        else:
            fields["phase"] = number + 1
        if not ctx.mine().filter(state=InstallState.RUNNING, phase=number).update(**fields):
            raise _LeaseLost(f"install {run.pk}: its job moved on")
        if number == COMMIT_PHASE:
            _finish_job(ctx.lease, run, InstallState.SUCCEEDED)
        _event(
            f"Install of {run.version}: phase {number} ({name}) completed",
            run=run.pk,
            phase=number,
        )
        if number == COMMIT_PHASE:
            run.refresh_from_db()
            _event(
                f"Upgrade complete: firmware {run.version}",
                run=run.pk,
                version=run.version,
                from_version=run.from_version,
                downtime_seconds=run.downtime_seconds,
                messages=run.messages_after,
            )
    _log(run, f"phase {number} ({name}) completed")
    if number == COMMIT_PHASE:
        _log(run, f"upgrade complete: firmware {run.version}")


def _phase_failed(ctx: PhaseContext, reason: str) -> None:
    run, number = ctx.run, ctx.number
    name = PHASE_NAMES[number]
    _log(run, f"phase {number} ({name}) failed: {reason}")
    if number in ONLINE_PHASES:
        _abort_finish(ctx, f"phase {number} ({name}) failed: {reason}")
        return
    if number == COMMIT_PHASE:
        # After the commit nothing rolls back: try again, with a growing pause.
        phase = InstallPhase.objects.get(run=run, number=number)
        delay = min(PHASE10_RETRY_MAX, 2 ** min(phase.attempts, 6))
        InstallPhase.objects.filter(pk=phase.pk).update(message=f"failed, retrying: {reason}"[:300])
        _event(
            f"Install of {run.version}: phase {number} ({name}) failed, retrying in {delay} s: "
            f"{reason}",
            severity=Severity.WARNING,
            run=run.pk,
            phase=number,
            reason=reason,
        )
        _wait(ctx.lease, delay)  # then the loop runs the phase again
        return
    now = timezone.now()
    with transaction.atomic():
        InstallPhase.objects.filter(run=run, number=number).update(
            state=PhaseState.FAILED, finished_at=now, message=reason[:300]
        )
        if (
            not ctx.mine()
            .filter(state=InstallState.RUNNING)
            .update(state=InstallState.ROLLING_BACK, error=f"Phase {number} ({name}): {reason}")
        ):
            raise _LeaseLost(f"install {run.pk}: its job moved on")
        _event(
            f"Install of {run.version}: phase {number} ({name}) failed, rolling back: {reason}",
            severity=Severity.ERROR,
            run=run.pk,
            phase=number,
            reason=reason,
        )


def _abort_finish(ctx: PhaseContext, failure: str | None) -> None:
    """Phases 1-2 ended early: discard the staging, the running system was never touched."""
    run = ctx.run
    from appliance.firmware import firmware
    from appliance.mail import msgmigrate

    new_slot = run.details.get("new_slot")
    if new_slot and new_slot != firmware.active_slot():
        try:
            firmware.slot_remove(new_slot)
        except (ApplianceError, OSError, ValueError):
            logger.exception("install %s: could not remove the staged slot", run.pk)
    firmware.staging_cleanup()
    msgmigrate.migrate_discard()
    updatelogs.install_workdir_remove(run.pk)
    now = timezone.now()
    error = failure or "Aborted by an administrator; the running system was not changed."
    with transaction.atomic():
        if (
            not ctx.mine()
            .filter(state__in=INSTALL_ACTIVE_STATES)
            .update(state=InstallState.ABORTED, finished_at=now, error=error)
        ):
            raise _LeaseLost(f"install {run.pk}: its job moved on")
        run.error = error
        _finish_job(ctx.lease, run, InstallState.ABORTED)
        run.phases.filter(state__in=(PhaseState.RUNNING, PhaseState.SUCCEEDED)).update(
            state=PhaseState.ROLLED_BACK, finished_at=now
        )
        run.phases.filter(state=PhaseState.PENDING).update(state=PhaseState.SKIPPED)
        _event(
            f"Install of firmware {run.version} aborted in phase {ctx.number}: {error}",
            severity=Severity.WARNING if failure is None else Severity.ERROR,
            run=run.pk,
            phase=ctx.number,
        )
    _log(run, f"install aborted in phase {ctx.number}: {error}")


# --- The ten phases -------------------------------------------------------------------------


def _phase_download(ctx: PhaseContext) -> None:
    """1: the downloaded bundle, verified again (it sat in the spool since the download)."""
    run = ctx.run
    path = _bundle_path(run.download)
    ctx.step(f"verifying {path.name}")
    ctx.checkpoint("bundle about to be verified")
    try:
        manifest = appliance_bundle.verify_bundle(path, progress=ctx.callback("bytes"))
    except appliance_bundle.BundleError as exc:
        raise _PhaseFailed(f"the downloaded bundle does not verify: {exc}") from exc
    except FileNotFoundError as exc:
        raise _PhaseFailed("the downloaded bundle is gone from var/spool/updates") from exc
    if manifest.version != run.version:
        raise _PhaseFailed(f"the bundle is firmware {manifest.version}, not {run.version}")
    ctx.progress(manifest.total_size, manifest.total_size, force=True)
    ctx.save_details(
        bundle={
            "file": path.name,
            "version": manifest.version,
            "os_release": manifest.os_release,
            "msgstore_format": manifest.msgstore_format,
            "config_format": manifest.config_format,
            "size": manifest.total_size,
            "payload_sha256": manifest.payload_sha256,
        }
    )


def _phase_install_system(ctx: PhaseContext) -> None:
    """2: the new system into the inactive slot, and the message store's online copy."""
    from appliance.firmware import firmware
    from appliance.mail import msgmigrate

    path = _bundle_path(ctx.run.download)
    target = ctx.details.get("new_slot") or firmware.inactive_slot()
    ctx.save_details(new_slot=target)
    ctx.step(f"installing the new system into {target}")
    image = firmware.slot_install(
        path,
        progress=ctx.callback("bytes", f"writing {target}"),
        should_stop=ctx.should_stop,
        rate_limit=settings.INSTALL_RATE_LIMIT or None,
    )
    ctx.check()
    ctx.counts(slot=image.slot, files=image.files, size=image.size)
    ctx.save_details(new_slot=image.slot, image_sha256=image.tree_sha256)
    ctx.checkpoint("new system written, message store copy next")
    ctx.step("copying the message store to the 2.8.1 format while mail flows")
    prepared = msgmigrate.migrate_prepare(
        progress=ctx.callback("messages", "copying the message store"),
        should_stop=ctx.should_stop,
        pause=settings.INSTALL_MIGRATE_PAUSE_MS / 1000,
        yield_ratio=settings.INSTALL_MIGRATE_YIELD_PERCENT / 100,
    )
    ctx.check()
    ctx.counts(prepared=_plain(prepared))


def _phase_shutdown(ctx: PhaseContext) -> None:
    """3: maintenance mode on (SMTP answers 421, beat skips, configuration read-only)."""
    from appliance.firmware import firmware
    from appliance.mail import msgstore

    run = ctx.run
    if "previous_slot" not in ctx.details:
        # Recorded before the first change of this phase: the rollback needs it.
        level = firmware.firmware_level()
        ctx.save_details(
            previous_slot=firmware.active_slot(),
            from_firmware=level.version or run.from_version,
            from_os_release=level.os_release,
        )
    ctx.step("entering maintenance mode: mail is answered 421 until the services restart")
    maintenance.maintenance_enter(
        f"Firmware upgrade to {run.version}", by=run.requested_by or "update"
    )
    if run.downtime_started_at is None:
        ctx.set_run(downtime_started_at=timezone.now())
    ctx.checkpoint("maintenance on, counting the message store next")
    # Transactions already past MAIL FROM finish their DATA (or are refused at its end).
    time.sleep(settings.INSTALL_DRAIN_MS / 1000)
    # A plain count: the content checksums come with the phase 4 copy, which reads it all
    # anyway, so the downtime does not pay for them twice.
    ctx.step("counting the message store")
    messages = _message_count(msgstore)
    ctx.set_run(messages_before=messages)
    ctx.counts(messages=messages)


def _message_count(msgstore: Any) -> int:
    totals = msgstore.totals()
    return totals.messages if totals is not None else 0


def _phase_store_backup(ctx: PhaseContext) -> None:
    """4: a consistent, checksummed, synced copy of the message store."""
    from appliance.mail import msgbackup

    dest = updatelogs.install_workdir(ctx.run.pk) / "msgstore-backup.db"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ctx.step(f"backing up the message store to var/spool/updates/{dest.parent.name}")
    ctx.checkpoint("message store backup next")
    result = msgbackup.msgstore_backup(dest, progress=ctx.callback("bytes", "copying"))
    backup = _plain(result)
    backup["path"] = str(getattr(result, "path", dest))
    ctx.save_details(store_backup=backup)
    ctx.counts(bytes=backup.get("size"), sha256=backup.get("sha256"))


def _phase_config_backup(ctx: PhaseContext) -> None:
    """5: the configuration in the Backup & Restore format, verified, for an exact revert."""
    from appliance.config import configbackup
    from backups.services import config_backup_before_install

    name = ctx.details.get("config_backup")
    if name:
        try:
            configbackup.backup_load(name)
            updatelogs.install_files_load(ctx.run.pk)
        except (ApplianceError, KeyError, OSError, ValueError):
            name = None  # a half-written or lost backup: take it again
    if not name:
        ctx.step("backing up the configuration")
        ctx.checkpoint("configuration backup next")
        loaded = _unchanged_start_backup(ctx)
        if loaded is None:
            header = config_backup_before_install(user=ctx.run.requested_by or "update")
            loaded = configbackup.backup_load(header.name)  # full validation: every checksum
        name = loaded.header.name
        # The exact 2.8.0 bytes for the rollback: after phase 8 a load of the archive would
        # convert them to the running (2.8.1) format.
        digest = updatelogs.install_files_save(ctx.run.pk, _cpe_files(loaded.files))
        ctx.save_details(config_backup=name, config_files_sha256=digest)
        ctx.counts(backup=name, files=len(loaded.files))


def _unchanged_start_backup(ctx: PhaseContext) -> LoadedBackup | None:
    """The backup taken when the install started, if the configuration is still exactly what
    it holds: one automatic backup per install, unless phases 1-2 saw a change."""
    from appliance.config import backuprestore, configbackup

    name = ctx.details.get("pre_install_backup")
    if not name:
        return None
    try:
        loaded = configbackup.backup_load(name)
        plan = backuprestore.restore_plan(loaded)
    except (ApplianceError, KeyError, OSError, ValueError):
        return None
    return loaded if not plan.writes and not plan.removes else None


def _phase_switch(ctx: PhaseContext) -> None:
    """6: the new system becomes the active one, with its firmware level."""
    from appliance.firmware import firmware

    new_slot = ctx.details["new_slot"]
    ctx.step(f"switching the active system to {new_slot}")
    previous = firmware.slot_switch(new_slot)
    if previous and previous != new_slot and "switched_from" not in ctx.details:
        ctx.save_details(switched_from=previous)
    ctx.checkpoint("active system switched, firmware level next")
    os_release = firmware.slot_os_release(new_slot) or ctx.details.get("bundle", {}).get(
        "os_release"
    )
    firmware.firmware_level_set(ctx.run.version, os_release or None)
    ctx.counts(active=new_slot, firmware=ctx.run.version)


def _phase_migrate(ctx: PhaseContext) -> None:
    """7: the message store in the 2.8.1 format, counts and checksums as before."""
    from appliance.mail import msgmigrate

    ctx.step("migrating the message store")
    ctx.checkpoint("message store migration next")
    result = msgmigrate.migrate_finish(progress=ctx.callback("messages", "migrating"))
    # Compared with the phase 4 copy: the same store, read once more while mail was stopped.
    counts = result.counts
    before = ctx.details.get("store_backup", {}).get("counts", {})
    if counts.messages != ctx.run.messages_before:
        raise _PhaseFailed(
            f"the migrated message store holds {counts.messages} messages, "
            f"{ctx.run.messages_before} before"
        )
    checksum = getattr(counts, "checksum", None)
    if before.get("checksum") and checksum and checksum != before["checksum"]:
        tables = getattr(counts, "tables", {}) or {}
        differ = sorted(
            name for name, digest in tables.items() if before.get("tables", {}).get(name) != digest
        )
        raise _PhaseFailed(
            "the migrated message store's checksum differs from before"
            + (f" (tables: {', '.join(differ)})" if differ else "")
        )
    ctx.counts(migrated=_plain(result), messages=counts.messages)


def _phase_convert(ctx: PhaseContext) -> None:
    """8: the configuration in the 2.8.1 format, $(FILE) files carried over."""
    from appliance.config import configconvert

    ctx.step("converting the configuration")
    ctx.checkpoint("configuration conversion next")
    result = configconvert.config_convert()
    ctx.counts(
        objects=result.objects,
        rules=result.rules,
        settings=result.settings,
        files_carried=len(result.files_carried),
    )


def _phase_cleanup(ctx: PhaseContext) -> None:
    """9: temporary files removed, then the health check before the commit."""
    from appliance.firmware import firmware
    from appliance.mail import msgmigrate

    ctx.step("removing temporary files")
    freed = msgmigrate.migrate_discard() + firmware.staging_cleanup()
    ctx.counts(bytes_freed=int(freed))
    ctx.checkpoint("cleaned up, health check next")
    ctx.step(f"health check: the mail service on {settings.SMTP_HOST}:{settings.SMTP_PORT}")
    _health_check(ctx)


def _health_check(ctx: PhaseContext) -> None:
    """Services up, a test message accepted and tracked, the message count as before."""
    from appliance.mail import msgstore

    token = maintenance.maintenance_probe_open()
    sender = maintenance.probe_sender(token)
    try:
        try:
            with smtplib.SMTP(
                settings.SMTP_HOST, settings.SMTP_PORT, local_hostname="localhost", timeout=15
            ) as client:
                refused = client.sendmail(
                    sender,
                    ["postmaster@localhost"],
                    f"From: <{sender}>\r\nTo: <postmaster@localhost>\r\n"
                    f"Subject: upgrade health probe\r\n\r\nfirmware {ctx.run.version}\r\n",
                )
        except (OSError, smtplib.SMTPException) as exc:
            raise _PhaseFailed(
                f"health check: the mail service on {settings.SMTP_HOST}:{settings.SMTP_PORT} "
                f"did not accept a test message ({exc})"
            ) from exc
        if refused:
            raise _PhaseFailed(f"health check: the test message was refused: {refused}")
    finally:
        maintenance.maintenance_probe_close()
    if not _probe_tracked(sender):
        raise _PhaseFailed("health check: the test message was accepted but not tracked")
    messages = _message_count(msgstore)
    if messages != ctx.run.messages_before:
        raise _PhaseFailed(
            f"health check: the message store holds {messages} messages, "
            f"{ctx.run.messages_before} before the upgrade"
        )
    ctx.counts(health="passed", probe=sender)
    _log(ctx.run, "health check passed: mail service up, test message tracked, count as before")


def _probe_tracked(sender: str) -> bool:
    """The probe is in Message Tracking, found the way an administrator would search it."""
    from appliance.mail import tracking

    page = tracking.tracking_page(tracking.TrackingFilter(sender=sender), limit=5)
    return bool(page.entries)


def _phase_commit(ctx: PhaseContext) -> None:
    """10: the commit. Mail accepted again, new firmware level, new system backup."""
    from appliance.mail import msgstore
    from appliance.system import rescue

    run = ctx.run
    ctx.step("leaving maintenance mode: mail is accepted again")
    maintenance.maintenance_leave()
    if run.downtime_ended_at is None:
        ctx.set_run(downtime_ended_at=timezone.now())
    ctx.checkpoint("mail accepted again, system backup next")
    ctx.set_run(messages_after=_message_count(msgstore))
    ctx.step("writing a new system backup on the rescue partition")
    info = rescue.system_backup_create(progress=ctx.callback("bytes", "system backup"))
    freed = updatelogs.install_workdir_remove(run.pk)
    ctx.counts(system_backup=info.firmware_version, backup_size=info.size, bytes_freed=freed)


PHASES: dict[int, Callable[[PhaseContext], None]] = {
    1: _phase_download,
    2: _phase_install_system,
    3: _phase_shutdown,
    4: _phase_store_backup,
    5: _phase_config_backup,
    6: _phase_switch,
    7: _phase_migrate,
    8: _phase_convert,
    9: _phase_cleanup,
    10: _phase_commit,
}


def _plain(value: Any) -> dict[str, Any]:
    """A result dataclass as JSON-safe values (for details and counts)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        source = value
    elif hasattr(value, "__dataclass_fields__"):
        source = {name: getattr(value, name) for name in value.__dataclass_fields__}
    else:
        return {"value": str(value)}
    plain: dict[str, Any] = {}
    for key, item in source.items():
        if isinstance(item, bool | int | float | str) or item is None:
            plain[key] = item
        elif hasattr(item, "__dataclass_fields__"):
            plain[key] = _plain(item)
        elif isinstance(item, dict):
            plain[key] = {
                str(k): v if isinstance(v, int | float | str) else str(v) for k, v in item.items()
            }
        elif isinstance(item, list | tuple):
            plain[key] = [str(x) if not isinstance(x, int | float | str) else x for x in item]
        else:
            plain[key] = str(item)
    return plain


# --- Rollback ------------------------------------------------------------------------------------


def _rollback_execute(run: InstallRun, lease: jobs_engine.Lease) -> None:
    """Put the exact pre-upgrade state back; idempotent, retried after a pause when it raised."""
    try:
        _rollback(run, lease)
    except _LeaseLost:
        raise
    except Exception as exc:
        logger.exception("install %s: rollback failed", run.pk)
        _rollback_failed(run, lease, f"{type(exc).__name__}: {exc}")
    else:
        _rollback_done(run, lease)


def _rollback(run: InstallRun, lease: jobs_engine.Lease) -> None:
    """Put the pre-upgrade state back, one recorded step at a time.

    Each step's completion is saved in the run (``details["rollback_done"]``, a fenced write)
    before the next begins, and a pass run again (its process died, or a step raised and is
    retried) skips what is recorded: a healthy appliance is never "rolled back" twice, and the
    store is never restored again once maintenance was left and mail accepted since. The store
    is written only while maintenance holds mail.
    """
    from appliance.config import configconvert
    from appliance.firmware import firmware
    from appliance.mail import msgbackup, msgmigrate, msgstore

    details = run.details
    done: list[str] = list(details.get("rollback_done", []))
    started = {
        p.number
        for p in run.phases.all()
        if p.state != PhaseState.PENDING or p.started_at is not None
    }

    def step(name: str, line: str, work: Callable[[], object]) -> None:
        if name in done:
            return
        _log(run, f"rollback: {line}")
        work()
        done.append(name)
        run.details = {**run.details, "rollback_done": done}
        if not _mine(run.pk, lease).update(details=run.details):
            raise _LeaseLost(f"install {run.pk}: its job moved on")
        jobs_engine.pause_for_tests("install_rollback", name)

    def restore_store() -> None:
        if maintenance.maintenance_status() is None:  # never write the store under live mail
            maintenance.maintenance_enter(
                f"Rollback of the upgrade to {run.version}", by=run.requested_by or "update"
            )
        msgbackup.msgstore_restore(Path(details["store_backup"]["path"]))

    def check_count() -> None:
        messages = _message_count(msgstore)
        if messages != run.messages_before:
            raise ApplianceError(
                f"after the rollback the message store holds {messages} messages, "
                f"{run.messages_before} before"
            )

    def discard_staging() -> None:
        msgmigrate.migrate_discard()
        firmware.staging_cleanup()
        new_slot = details.get("new_slot")
        if new_slot and new_slot != firmware.active_slot():
            firmware.slot_remove(new_slot)

    if not done:
        _log(run, f"rollback started: {run.error}")
    previous = details.get("previous_slot")
    if previous and firmware.active_slot() != previous:
        step(
            "slot",
            f"switching the active system back to {previous}",
            lambda: firmware.slot_switch(previous),
        )
    if 6 in started and details.get("from_firmware"):
        step(
            "firmware_level",
            f"firmware level back to {details['from_firmware']}",
            lambda: firmware.firmware_level_set(
                details["from_firmware"], details.get("from_os_release")
            ),
        )
    if 7 in started and details.get("store_backup"):
        step("store", "restoring the message store from the phase 4 copy", restore_store)
    if 8 in started and details.get("config_files_sha256"):
        step(
            "config",
            "restoring the exact 2.8.0 configuration files saved in phase 5",
            lambda: configconvert.config_revert(updatelogs.install_files_load(run.pk)),
        )
    step("staging", "discarding the staging", discard_staging)
    if run.messages_before is not None:
        step("count", "counting the message store", check_count)
    step(
        "maintenance", "leaving maintenance: mail is accepted again", maintenance.maintenance_leave
    )
    step(
        "workdir",
        "removing the install's work files",
        lambda: updatelogs.install_workdir_remove(run.pk),
    )


def _cpe_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """The configuration XML files of a backup, by their path under the appliance root."""
    chosen: dict[str, bytes] = {}
    for name, data in files.items():
        relative = name.lstrip("/")
        index = relative.find("etc/mailsec/cpe/")
        if index >= 0:
            chosen[relative[index:]] = data
    return chosen


def _rollback_done(run: InstallRun, lease: jobs_engine.Lease) -> None:
    now = timezone.now()
    with transaction.atomic():
        updated = (
            _mine(run.pk, lease)
            .filter(state=InstallState.ROLLING_BACK)
            .update(
                state=InstallState.ROLLED_BACK,
                finished_at=now,
                downtime_ended_at=Coalesce(F("downtime_ended_at"), now),
            )
        )
        if not updated:
            raise _LeaseLost(f"install {run.pk}: its job moved on")
        _finish_job(lease, run, InstallState.ROLLED_BACK)
        run.phases.filter(
            state__in=(PhaseState.RUNNING, PhaseState.SUCCEEDED, PhaseState.FAILED)
        ).update(state=PhaseState.ROLLED_BACK)
        run.phases.filter(state=PhaseState.PENDING).update(state=PhaseState.SKIPPED)
        _event(
            f"Install of firmware {run.version} rolled back to {run.from_version}: {run.error}",
            severity=Severity.ERROR,
            run=run.pk,
            reason=run.error,
        )
    _log(run, f"rollback complete: firmware {run.from_version} runs as before")


def _rollback_failed(run: InstallRun, lease: jobs_engine.Lease, reason: str) -> None:
    """A rollback step raised (a full disk, a file it needs): record why and try again after a
    growing pause, for as long as it takes. The run stays rolling back, so maintenance keeps
    holding mail (421) over a half-upgraded appliance instead of a final state leaving it on;
    the Install page and Home say what is wrong, and the next pass goes on from the recorded
    steps once the cause is gone (space freed)."""
    details = dict(run.details)
    tries = int(details.get("rollback_failures", 0)) + 1
    delay = min(ROLLBACK_RETRY_MAX, 2**tries)
    details.update(rollback_failures=tries, rollback_error=reason[:500])
    _log(run, f"rollback attempt {tries} failed: {reason}; retrying in {delay} s")
    if not _mine(run.pk, lease).update(details=details):
        raise _LeaseLost(f"install {run.pk}: its job moved on")
    run.details = details
    if tries == ROLLBACK_ALERT_AFTER:
        _event(
            f"The rollback of the install of firmware {run.version} keeps failing: {reason}. "
            f"It is retried every {ROLLBACK_RETRY_MAX} s at most; mail is held (421) until it "
            "completes. Fix the cause (for a full disk, free space on it).",
            severity=Severity.CRITICAL,
            run=run.pk,
        )
    else:
        _event(
            f"Rollback of the install of {run.version} failed, retrying in {delay} s: {reason}",
            severity=Severity.ERROR,
            run=run.pk,
        )
    _wait(lease, delay)  # then the loop runs the rollback again, from its recorded steps
