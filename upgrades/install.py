"""Writes of the firmware install: preflight, start, abort, and the job that runs it.

The ten phases are in upgrades.phases, the rollback in upgrades.rollback, and what both work
through (the run held by this executor, progress, the log) in upgrades.phase_context.

The run is a persisted state machine (``InstallRun`` and its ten ``InstallPhase`` rows, see
upgrades.models for the transitions) and one job of the job engine (kind ``install``). The
job's task claims it and runs the phases one after the other, then the rollback when one
failed (:func:`install_job_run`): there is no hand-off between phases that a broker blip could
lose. Every side effect of a phase is idempotent, so a phase whose worker was killed is simply
run again from its start by the next executor:

* one executor at a time: the engine's lease and fence; every write to the run is
  conditional on still holding the job (``phase_context.mine``), so a second copy of the task
  (a redelivery) finds it held and exits, and an executor that stalled past its lease changes
  nothing. The reconciler sees a dead holder (its process on this host gone at once, any other
  when its lease lapses) and hands the job to a worker (``on_dead="resume"``), which goes on
  where the run says;
* ``attempts`` counts phase starts: past ``INSTALL_MAX_ATTEMPTS`` (a crash loop) the run stops
  trying and rolls back;
* phases 1-2 touch nothing the running appliance uses: a failure or an abort there discards the
  staging and ends ABORTED. A failure in 3-9 (including the health check before commit) rolls
  back from the phase 4 and 5 backups and the previous slot. Phase 10 is the commit: a failure
  inside it is retried, never rolled back.

Every phase start, end and failure writes an event (Category.UPDATE) and a timestamped line to
the run's log in var/spool/updates/XPU.

A little over 600 lines on purpose: starting, aborting and running a run, and the moves of its
phases from one state to the next, are the one state machine; the phases' own work is
elsewhere (above).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from appliance.firmware import bundle as appliance_bundle
from appliance.firmware import updatelogs
from appliance.system.errors import ApplianceError
from events.models import Category, Severity
from events.services import User, username_of
from jobs import engine as jobs_engine
from jobs import leases
from jobs import registry as jobs_registry
from jobs.models import APPLIANCE_GROUP, JobState
from upgrades import install_selectors, selectors
from upgrades.models import (
    INSTALL_ACTIVE_STATES,
    PHASE_COUNT,
    InstallPhase,
    InstallRun,
    InstallState,
    InstallTrigger,
    PhaseState,
)
from upgrades.phase_context import (
    COMMIT_PHASE,
    JOB_OUTCOME,
    ONLINE_PHASES,
    LeaseLost,
    PhaseContext,
    PhaseFailed,
    Stopped,
    abort_requested,
    bundle_path,
    describe_failure,
    event,
    finish_job,
    log,
    mine,
    wait,
)
from upgrades.phases import PHASES
from upgrades.return_phases import RETURN_PHASES
from upgrades.rollback import rollback_execute
from upgrades.schedule_kinds import schedule_supersede

if TYPE_CHECKING:
    from appliance.config.backupformat import BackupHeader
    from appliance.firmware.preflight import Check

logger = logging.getLogger(__name__)


PHASE10_RETRY_MAX = 60  # seconds between retries of a failed commit
INSTALL_KIND = "install"
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


# --- Small helpers ------------------------------------------------------------------------------


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
    # The bundle's check, one key and title whatever it says: pending before a download,
    # verified again after.
    if download is None:
        status = preflight.PENDING
        value = (
            f"firmware {offer.offer.version} is available, not yet downloaded"
            if offer is not None
            else f"nothing newer than the installed {installed or 'firmware'}"
        )
        advice = (
            "Download it under Updates & Licensing; it is verified again here."
            if offer is not None
            else ""
        )
    else:
        try:
            manifest = appliance_bundle.verify_bundle(bundle_path(download))
        except (appliance_bundle.BundleError, OSError) as exc:
            status = "fail"
            value = f"firmware {download.version} does not verify: {exc}"
            advice = "Download the firmware again."
        else:
            status = "pass"
            value = f"firmware {manifest.version}, signature and digest verified"
            advice = ""
    checks.append(
        preflight.Check(
            key="bundle", title="Firmware bundle", status=status, value=value, advice=advice
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
    if (active := install_selectors.active_install()) is not None:
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
        event(
            f"Install of firmware {download.version} refused by the preflight checks",
            severity=Severity.WARNING,
            user=user,
            version=download.version,
            failed=[c.key for c in checks if c.status == "fail"],
        )
        raise error
    header = backup_before_start(user=user, what="install")
    with transaction.atomic():
        run = run_create(
            InstallRun(
                download=download,
                version=download.version,
                from_version=installed or "",
                requested_by=username_of(user),
                trigger=str(trigger),
                details={
                    "pre_install_backup": header.name,
                    "preflight": {c.key: c.status for c in checks},
                },
            ),
            user,
        )
        event(
            f"Install of firmware {run.version} started (from {run.from_version})",
            user=user,
            run=run.pk,
            version=run.version,
            trigger=run.trigger,
            backup=header.name,
        )
        if str(trigger) != InstallTrigger.SCHEDULE:
            schedule_supersede(
                reason=f"the install of firmware {run.version} started now instead (run {run.pk})",
                user=user,
                run=run.pk,
            )
    log(
        run,
        f"install of firmware {run.version} over {run.from_version} started by "
        f"{run.requested_by or 'the system'} ({run.trigger}); configuration backup {header.name}",
    )
    for check in checks:
        log(run, f"preflight {check.key}: {check.status}: {check.value}")
    return run


def backup_before_start(*, user: User | None, what: str) -> BackupHeader:
    """The automatic configuration backup an install or a return (``what``) makes before it
    starts, refused alike in both directions: when it fails, nothing starts."""
    from backups.services import config_backup_before_install

    try:
        return config_backup_before_install(user=user)
    except (ApplianceError, OSError) as exc:
        raise InstallError(
            f"The automatic configuration backup failed, so the {what} did not start: {exc}"
        ) from exc


def run_create(run: InstallRun, user: User | None) -> InstallRun:
    """The run (unsaved, either direction) saved with its job and its ten phases, in the
    caller's transaction; the job is enqueued on commit. InstallInProgress when another run
    or appliance job holds the appliance."""
    try:
        job = jobs_engine.start(
            INSTALL_KIND,
            title=run.label,
            user=user,
            trigger=run.trigger,
            conflict_group=APPLIANCE_GROUP,  # no restore or system backup under it
            steps=PHASE_COUNT,
            details={"version": run.version, "direction": run.direction},
        )
    except jobs_engine.JobConflict as exc:
        raise InstallInProgress(str(exc)) from None
    run.job, run.phase = job, 1
    try:
        with transaction.atomic():
            run.save(force_insert=True)
    except IntegrityError:
        raise _in_progress(install_selectors.active_install()) from None
    prefix = "return" if run.is_return else "install"
    run.log_name = f"{prefix}-{run.pk}-{run.version}.log"
    InstallRun.objects.filter(pk=run.pk).update(log_name=run.log_name)
    InstallPhase.objects.bulk_create(
        InstallPhase(run=run, number=number, name=name) for number, name in run.phase_names.items()
    )
    return run


def install_abort(*, user: User | None, run_id: int | None = None) -> InstallRun:
    """Stop the install in phases 1-2: the staging is discarded, the running system untouched."""
    run = install_selectors.active_install()  # at most one: a partial unique index
    if run is None or (run_id is not None and run.pk != run_id):
        raise InstallError("No firmware install is in progress.")
    if run.state == InstallState.ROLLING_BACK or run.phase not in ONLINE_PHASES:
        where = (
            f"in phase {run.phase} ({run.phase_names[run.phase]})"
            if run.phase in run.phase_names
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
    event(
        f"Abort of the {'return to' if run.is_return else 'install of'} firmware {run.version} "
        f"requested in phase {run.phase}",
        user=user,
        run=run.pk,
        phase=run.phase,
    )
    log(run, f"abort requested by {username_of(user) or 'the system'} in phase {run.phase}")
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
    mine(run.pk, lease).filter(state=InstallState.QUEUED).update(
        state=InstallState.RUNNING, started_at=timezone.now()
    )
    while True:
        if lease.lost.is_set():
            raise LeaseLost(f"install {run.pk} is held by another executor")
        run.refresh_from_db()
        if run.state == InstallState.RUNNING:
            _execute_phase(run, run.phase, lease)
        elif run.state == InstallState.ROLLING_BACK:
            rollback_execute(run, lease)
        elif run.state in JOB_OUTCOME:
            # Finished (an earlier executor may have died between the run's and the job's
            # write): the job ends the same way; a no-op when it already did.
            lease.finish(JOB_OUTCOME[InstallState(run.state)], error=run.error)
            return
        else:  # still queued: the update above did not go through, so the job is not ours
            raise LeaseLost(f"install {run.pk} is held by another executor")


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


# --- Executing a phase ----------------------------------------------------------------------------


def _execute_phase(run: InstallRun, phase: int, lease: jobs_engine.Lease) -> None:
    """Run phase ``phase`` of the run; a failure rolls back (3-9), aborts (1-2) or is retried
    after a pause (10); LeaseLost when another executor has the run now."""
    mine(run.pk, lease).update(attempts=F("attempts") + 1)
    run.refresh_from_db()
    ctx = PhaseContext(run, phase, lease)
    try:
        if run.abort_requested and phase in ONLINE_PHASES:
            raise Stopped
        if run.attempts > settings.INSTALL_MAX_ATTEMPTS and phase != COMMIT_PHASE:
            raise PhaseFailed(
                f"the install was started {run.attempts} times without completing "
                "(its worker keeps stopping): giving up"
            )
        _phase_start(ctx)
        (RETURN_PHASES if run.is_return else PHASES)[phase](ctx)
        _phase_succeeded(ctx)
    except LeaseLost:
        logger.warning("install %s phase %s: lease lost, stopping", run.pk, phase)
        raise
    except Stopped:
        _abort_finish(ctx, None)
    except Exception as exc:
        if phase in ONLINE_PHASES and abort_requested(run.pk):
            # The appliance step stopped because of the abort (InstallAborted and the like).
            _abort_finish(ctx, None)
            return
        if isinstance(exc, PhaseFailed):
            reason = str(exc)
        else:
            logger.exception("install %s phase %s failed", run.pk, phase)
            reason = describe_failure(exc)
        _phase_failed(ctx, reason)


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
    name = ctx.run.phase_names[ctx.number]
    ctx.lease.progress(
        step=ctx.number - 1, steps=PHASE_COUNT, step_name=f"Phase {ctx.number}: {name}"
    )
    if phase.attempts > 1:
        text = f"{ctx.run.short_label}: phase {ctx.number} ({name}) restarted"
        event(text + " (its previous executor stopped)", run=ctx.run.pk, phase=ctx.number)
        log(ctx.run, f"phase {ctx.number} ({name}) restarted, attempt {phase.attempts}")
    else:
        event(
            f"{ctx.run.short_label}: phase {ctx.number} ({name}) started",
            run=ctx.run.pk,
            phase=ctx.number,
        )
        log(ctx.run, f"phase {ctx.number} ({name}) started")


def _phase_succeeded(ctx: PhaseContext) -> None:
    run, number = ctx.run, ctx.number
    now = timezone.now()
    name = run.phase_names[number]
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
            raise LeaseLost(f"install {run.pk}: its job moved on")
        if number == COMMIT_PHASE:
            finish_job(ctx.lease, run, InstallState.SUCCEEDED)
        event(
            f"{run.short_label}: phase {number} ({name}) completed",
            run=run.pk,
            phase=number,
        )
        if number == COMMIT_PHASE:
            run.refresh_from_db()
            event(
                f"Return complete: firmware {run.version} runs again (from {run.from_version})"
                if run.is_return
                else f"Upgrade complete: firmware {run.version}",
                run=run.pk,
                version=run.version,
                from_version=run.from_version,
                downtime_seconds=run.downtime_seconds,
                messages=run.messages_after,
            )
    log(run, f"phase {number} ({name}) completed")
    if number == COMMIT_PHASE:
        log(run, f"{'return' if run.is_return else 'upgrade'} complete: firmware {run.version}")


def _phase_failed(ctx: PhaseContext, reason: str) -> None:
    run, number = ctx.run, ctx.number
    name = run.phase_names[number]
    log(run, f"phase {number} ({name}) failed: {reason}")
    if number in ONLINE_PHASES:
        _abort_finish(ctx, f"phase {number} ({name}) failed: {reason}")
        return
    if number == COMMIT_PHASE:
        # After the commit nothing rolls back: try again, with a growing pause.
        phase = InstallPhase.objects.get(run=run, number=number)
        delay = min(PHASE10_RETRY_MAX, 2 ** min(phase.attempts, 6))
        InstallPhase.objects.filter(pk=phase.pk).update(message=f"failed, retrying: {reason}"[:300])
        event(
            f"{run.short_label}: phase {number} ({name}) failed, retrying in {delay} s: {reason}",
            severity=Severity.WARNING,
            run=run.pk,
            phase=number,
            reason=reason,
        )
        wait(ctx.lease, delay)  # then the loop runs the phase again
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
            raise LeaseLost(f"install {run.pk}: its job moved on")
        event(
            f"{run.short_label}: phase {number} ({name}) failed, rolling back: {reason}",
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
    msgmigrate.migrate_discard(direction=msgmigrate.BACK if run.is_return else msgmigrate.FORWARD)
    updatelogs.install_workdir_remove(run.pk)
    now = timezone.now()
    error = failure or "Aborted by an administrator; the running system was not changed."
    with transaction.atomic():
        if (
            not ctx.mine()
            .filter(state__in=INSTALL_ACTIVE_STATES)
            .update(state=InstallState.ABORTED, finished_at=now, error=error)
        ):
            raise LeaseLost(f"install {run.pk}: its job moved on")
        run.error = error
        finish_job(ctx.lease, run, InstallState.ABORTED)
        run.phases.filter(state__in=(PhaseState.RUNNING, PhaseState.SUCCEEDED)).update(
            state=PhaseState.ROLLED_BACK, finished_at=now
        )
        run.phases.filter(state=PhaseState.PENDING).update(state=PhaseState.SKIPPED)
        event(
            f"{run.label} aborted in phase {ctx.number}: {error}",
            severity=Severity.WARNING if failure is None else Severity.ERROR,
            run=run.pk,
            phase=ctx.number,
        )
    log(run, f"{'return' if run.is_return else 'install'} aborted in phase {ctx.number}: {error}")
