"""The rollback of a failed install: the pre-upgrade state back, one recorded step at a time;
and the reconciler's net under it, leaving a maintenance that no install holds any more.

The same steps undo a failed Return to the previous firmware (issue 18): phases 3-6 of a
return record the same facts (the slot and firmware level it left, the phase 4 store copy, the
phase 5 configuration files), only of the newer firmware; the message store conversion it
discards goes the other way, and the configuration put back is the newer format's file.

upgrades.install runs it in the install's job when a phase in 3-9 failed; a pass run again
(its process died, a step raised) goes on from the recorded steps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from appliance.firmware import updatelogs
from appliance.system import maintenance
from appliance.system.errors import ApplianceError
from appliance.system.testpause import pause_for_tests
from events.models import Severity
from jobs import engine as jobs_engine
from upgrades.models import (
    INSTALL_ACTIVE_STATES,
    InstallRun,
    InstallState,
    PhaseState,
)
from upgrades.phase_context import (
    LeaseLost,
    describe_failure,
    event,
    finish_job,
    log,
    message_count,
    mine,
    wait,
)

logger = logging.getLogger(__name__)

ROLLBACK_RETRY_MAX = 60  # seconds between the tries of a rollback that keeps failing
ROLLBACK_ALERT_AFTER = 3  # failed tries before a critical event says it keeps failing


# --- Rollback ------------------------------------------------------------------------------------


def rollback_execute(run: InstallRun, lease: jobs_engine.Lease) -> None:
    """Put the exact pre-upgrade state back; idempotent, retried after a pause when it raised."""
    try:
        _rollback(run, lease)
    except LeaseLost:
        raise
    except Exception as exc:
        logger.exception("install %s: rollback failed", run.pk)
        _rollback_failed(run, lease, describe_failure(exc))
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
        log(run, f"rollback: {line}")
        work()
        done.append(name)
        run.details = {**run.details, "rollback_done": done}
        if not mine(run.pk, lease).update(details=run.details):
            raise LeaseLost(f"install {run.pk}: its job moved on")
        pause_for_tests("install_rollback", name)

    def restore_store() -> None:
        if maintenance.maintenance_status() is None:  # never write the store under live mail
            maintenance.maintenance_enter(
                f"Rollback of the {'return' if run.is_return else 'upgrade'} to {run.version}",
                by=run.requested_by or "update",
                holder=f"install:{run.pk}",
            )
        msgbackup.msgstore_restore(Path(details["store_backup"]["path"]))

    def check_count() -> None:
        messages = message_count(msgstore)
        if messages != run.messages_before:
            raise ApplianceError(
                f"after the rollback the message store holds {messages} messages, "
                f"{run.messages_before} before"
            )

    def discard_staging() -> None:
        msgmigrate.migrate_discard(
            direction=msgmigrate.BACK if run.is_return else msgmigrate.FORWARD
        )
        firmware.staging_cleanup()
        new_slot = details.get("new_slot")
        if new_slot and new_slot != firmware.active_slot():
            firmware.slot_remove(new_slot)

    if not done:
        log(run, f"rollback started: {run.error}")
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

    def restore_config() -> None:
        configconvert.config_revert(updatelogs.install_files_load(run.pk))
        if run.is_return:
            # The newer file is back: the older files go again (removed before the conversion
            # checks the lists it names, which is no business of the rollback's).
            with contextlib.suppress(configconvert.ConfigConvertError):
                configconvert.config_convert()

    if 8 in started and details.get("config_files_sha256"):
        step(
            "config",
            f"restoring the exact configuration files of {run.from_version} saved in phase 5",
            restore_config,
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


def _rollback_done(run: InstallRun, lease: jobs_engine.Lease) -> None:
    now = timezone.now()
    with transaction.atomic():
        updated = (
            mine(run.pk, lease)
            .filter(state=InstallState.ROLLING_BACK)
            .update(
                state=InstallState.ROLLED_BACK,
                finished_at=now,
                downtime_ended_at=Coalesce(F("downtime_ended_at"), now),
            )
        )
        if not updated:
            raise LeaseLost(f"install {run.pk}: its job moved on")
        finish_job(lease, run, InstallState.ROLLED_BACK)
        run.phases.filter(
            state__in=(PhaseState.RUNNING, PhaseState.SUCCEEDED, PhaseState.FAILED)
        ).update(state=PhaseState.ROLLED_BACK)
        run.phases.filter(state=PhaseState.PENDING).update(state=PhaseState.SKIPPED)
        event(
            f"{run.label} rolled back to {run.from_version}: {run.error}",
            severity=Severity.ERROR,
            run=run.pk,
            reason=run.error,
        )
    log(run, f"rollback complete: firmware {run.from_version} runs as before")


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
    log(run, f"rollback attempt {tries} failed: {reason}; retrying in {delay} s")
    if not mine(run.pk, lease).update(details=details):
        raise LeaseLost(f"install {run.pk}: its job moved on")
    run.details = details
    if tries == ROLLBACK_ALERT_AFTER:
        event(
            f"The rollback of the install of firmware {run.version} keeps failing: {reason}. "
            f"It is retried every {ROLLBACK_RETRY_MAX} s at most; mail is held (421) until it "
            "completes. Fix the cause (for a full disk, free space on it).",
            severity=Severity.CRITICAL,
            run=run.pk,
        )
    else:
        event(
            f"Rollback of the install of {run.version} failed, retrying in {delay} s: {reason}",
            severity=Severity.ERROR,
            run=run.pk,
        )
    wait(lease, delay)  # then the loop runs the rollback again, from its recorded steps


def maintenance_recover() -> list[int]:
    """The reconciler's pass over maintenance: leave one that an install holds when that install
    is no longer active (its final state should have left it; this is the net under a bug or a
    hand-edited database). An administrator's own maintenance (no holder) is never touched.
    Returns the run whose maintenance was left."""
    try:
        state = maintenance.maintenance_status()
    except ApplianceError:
        return []  # a damaged file means "hold mail": never guessed away
    if state is None or not state.holder.startswith("install:"):
        return []
    run_id = int(state.holder.partition(":")[2] or 0)
    run = InstallRun.objects.filter(pk=run_id).first()
    if run is not None and run.state in INSTALL_ACTIVE_STATES:
        return []
    maintenance.maintenance_leave()
    how = f"ended {InstallState(run.state).label.lower()}" if run else "no longer exists"
    event(
        f"Maintenance mode left: the install that held it ({state.reason}) {how}; "
        "mail is accepted again",
        severity=Severity.WARNING,
        run=run_id,
    )
    return [run_id]
