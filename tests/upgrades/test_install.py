"""The firmware install end to end: a real worker, real Redis, the real mail service.

The demo appliance (2.8.0.0) gets the demo vendor's signed 2.8.1.0 bundle through the real
feed and download code, then the ten phases run in a real `celery worker`. What is checked is
what the appliance looks like afterwards: firmware level, message store and configuration
formats, the message count and checksum, the events, and after a rollback the appliance root
byte for byte (the few paths that legitimately change are listed in EXCLUDED with the reason).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.utils import timezone

from appliance.config import configconvert
from appliance.firmware import spool
from appliance.mail import msgcounts, msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from events.models import Category, Event
from jobs import leases
from jobs.models import Job, JobState
from jobs.reconciler import enqueue_grace, reconcile
from tests.support import enqueue as enqueues
from tests.support.jobs import appliance_job_running
from tests.support.services import WorkerProcess, wait_for
from tests.support.smtp import (
    SmtpServiceProcess,
    free_port,
    read_banner,
    smtp_service,  # noqa: F401
)
from upgrades import install
from upgrades.models import (
    INSTALL_FINAL_STATES,
    Download,
    InstallPhase,
    InstallRun,
    InstallState,
    PhaseState,
)

NEW_VERSION = "2.8.1.0"
OLD_VERSION = "2.8.0.0"
RUN_TIMEOUT = 120.0
# Rows a successful install adds to the SMTP log and to the tracking log by itself: phase 9's
# health probe, and the validation report's virus test message (quarantined, then deleted
# from its store: its log rows stay, as any deleted message's do).
INSTALL_OWN_LOG_ROWS = 2

# Paths (relative to the appliance root) a rolled-back appliance may differ in, and why.
EXCLUDED = (
    "var/spool/updates",  # the downloaded bundle, the install's log (XPU) and its work dir
    "var/lib/mailsec/backups",  # the automatic pre-install configuration backups (kept)
    "system/.firmware",  # the firmware layer's bookkeeping: lock, switch record, slot seal
    "var/lib/mailsec/msgstore",  # compared by content instead: counts and checksum of every row
)


def tree_digest(root: Path, excluded: tuple[str, ...] = EXCLUDED) -> dict[str, str]:
    """Every file, symlink and directory under root: content hash, link target or 'dir'."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel_dir = base.relative_to(root).as_posix()
        if rel_dir != "." and rel_dir.startswith(excluded):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = base / name
            relative = path.relative_to(root).as_posix()
            if relative.startswith(excluded) or name.endswith(".lock") or name == "lock":
                continue
            if path.is_symlink():
                found[relative] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[relative] = "dir"
            else:
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    keys = sorted(set(before) | set(after))
    before = {k: before.get(k, "") for k in keys}
    return [
        f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k)
    ]


@dataclass(frozen=True)
class Usage:
    total: int
    used: int
    free: int
    percent: float


def roomy_disk(path: str) -> Usage:
    """The real disk's size, but 80% of it free: the 50% rule is not this machine's to meet
    (seven engineers share its disk); its real measurement is tested in test_preflight.py."""
    real = psutil.disk_usage(path)
    free = max(real.free, int(real.total * 0.8))
    return Usage(real.total, real.total - free, free, 100.0 * (real.total - free) / real.total)


@pytest.fixture(autouse=True)
def roomy_preflight_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "PREFLIGHT_DISK_USAGE", roomy_disk)


def wait_final(run_id: int, timeout: float = RUN_TIMEOUT) -> InstallRun:
    def final() -> InstallRun | None:
        run = InstallRun.objects.get(pk=run_id)
        return run if run.state in INSTALL_FINAL_STATES else None

    return wait_for(final, timeout=timeout, interval=0.2, message=f"install {run_id} did not end")


def wait_for_checkpoint(
    run: InstallRun, phase: int, *, timeout: float, interval: float = 0.1
) -> None:
    """Wait until the worker sits at ``phase``'s checkpoint (LMI_INSTALL_PHASE_DELAY_MS)."""
    wait_for(
        lambda: InstallPhase.objects.filter(
            run=run, number=phase, state=PhaseState.RUNNING, message__startswith="checkpoint"
        ).exists(),
        timeout=timeout,
        interval=interval,
        message=f"phase {phase} never reached its checkpoint",
    )


KILL_DELAY_MS = "800"  # the pause at the killed phase's checkpoint: the other phases run fast
KILL_LEASE = "6"


def killed_in_phase_then_resumed(
    start: Callable[[], InstallRun],
    phase: int,
    workers_on_mail: Callable[..., WorkerProcess],
    *,
    own_log_rows: int,
) -> InstallRun:
    """Start a run (an install or a return) with a worker (from the ``workers_on_mail``
    fixture) that pauses at ``phase``'s checkpoint, SIGKILL that worker there, start a fresh
    one, and wait for the run's end:
    it must have ended SUCCEEDED with the killed phase run twice, every other once, each
    completed once, and the job resumed once by the reconciler. No message may be lost or
    changed, and the SMTP log gains only the run's ``own_log_rows`` (its own test messages,
    logged once even when their phase ran twice: each checkpoint is before its send)."""
    before = msgcounts.store_counts()
    first = workers_on_mail(
        LMI_INSTALL_LEASE_SECONDS=KILL_LEASE,
        LMI_INSTALL_PHASE_DELAY_MS=KILL_DELAY_MS,
        LMI_INSTALL_PHASE_DELAY_PHASE=str(phase),
    )
    run = start()
    wait_for_checkpoint(run, phase, timeout=90, interval=0.05)
    first.kill()
    workers_on_mail(LMI_INSTALL_LEASE_SECONDS=KILL_LEASE)
    run = wait_final(run.pk)
    assert run.state == InstallState.SUCCEEDED, (run.state, run.phase, run.error)
    run.job.refresh_from_db()
    assert (run.job.state, run.job.restarts, run.job.lease_owner) == ("succeeded", 1, "")
    attempts = dict(run.phases.values_list("number", "attempts"))
    assert attempts == {n: 2 if n == phase else 1 for n in range(1, 11)}
    assert completed_events(run) == {n: 1 for n in range(1, 11)}
    after = msgcounts.store_counts()
    assert after.messages == before.messages == run.messages_after
    assert after.tables["messages"] == before.tables["messages"]
    assert after.tables["bodies"] == before.tables["bodies"]
    assert after.smtp_log == before.smtp_log + own_log_rows
    return run


def completed_events(run: InstallRun) -> dict[int, int]:
    """How many 'phase N ... completed' events each phase wrote."""
    counts: dict[int, int] = {}
    for event in Event.objects.filter(category=Category.UPDATE, details__run=run.pk):
        if " completed" in event.message and "phase" in event.message:
            number = int(event.details.get("phase", 0))
            counts[number] = counts.get(number, 0) + 1
    return counts


def assert_upgraded(run: InstallRun, before: msgcounts.StoreCounts) -> None:
    assert run.state == InstallState.SUCCEEDED, (run.error, run.phase)
    assert system_info().firmware_version == NEW_VERSION
    assert msgstore.format_version() == "2.8.1"
    assert configconvert.config_format() == "2.8.1"
    after = msgcounts.store_counts()
    assert after.messages == before.messages == run.messages_before == run.messages_after
    # Every message and body as before; the logs gained the install's own test messages.
    assert after.tables["messages"] == before.tables["messages"]
    assert after.tables["bodies"] == before.tables["bodies"]
    assert (after.smtp_log, after.tracking_log) == (
        before.smtp_log + INSTALL_OWN_LOG_ROWS,
        before.tracking_log + INSTALL_OWN_LOG_ROWS,
    )
    assert maintenance_status() is None
    assert [p.state for p in run.phases.order_by("number")] == [PhaseState.SUCCEEDED] * 10
    assert completed_events(run) == {n: 1 for n in range(1, 11)}
    assert Event.objects.filter(message=f"Upgrade complete: firmware {NEW_VERSION}").count() == 1
    assert run.downtime_started_at is not None and run.downtime_ended_at is not None


@pytest.mark.integration
@pytest.mark.slow
def test_full_install_upgrades_the_appliance(
    ready_firmware: Download,
    smtp_service: SmtpServiceProcess,  # noqa: F811
    workers_on_mail: Callable[..., WorkerProcess],
    admin_user,
) -> None:
    workers_on_mail()
    before = msgcounts.store_counts()
    run = install.install_start(user=admin_user)
    assert run.state == InstallState.QUEUED and run.phases.count() == 10
    run = wait_final(run.pk)
    assert_upgraded(run, before)
    from appliance.system.rescue import system_backup_info

    backup = system_backup_info()
    assert backup is not None and backup.firmware_version == NEW_VERSION
    assert read_banner(smtp_service.host, smtp_service.port)[:3] == b"220"
    log = install.install_log_tail(run)
    assert any("health check passed" in line for line in log)
    assert any("upgrade complete" in line for line in log)


@pytest.mark.integration
@pytest.mark.slow
def test_failed_health_check_rolls_back_to_the_exact_previous_state(
    ready_firmware: Download, install_workers, admin_user, appliance_root: Path
) -> None:
    # No mail service listens on this port: the health check before the commit fails.
    install_workers(LMI_SMTP_PORT=str(free_port()))
    tree_before = tree_digest(appliance_root)
    counts_before = msgcounts.store_counts()
    run = install.install_start(user=admin_user)
    run = wait_final(run.pk)
    assert run.state == InstallState.ROLLED_BACK, (run.state, run.error)
    assert "health check" in run.error
    assert system_info().firmware_version == OLD_VERSION
    assert msgstore.format_version() == "2.8.0"
    assert configconvert.config_format() == "2.8.0"
    counts_after = msgcounts.store_counts()
    assert counts_after.messages == counts_before.messages
    assert counts_after.checksum == counts_before.checksum
    assert maintenance_status() is None
    assert differences(tree_before, tree_digest(appliance_root)) == []
    phases = {p.number: p.state for p in run.phases.all()}
    assert phases[9] == PhaseState.ROLLED_BACK and phases[10] == PhaseState.SKIPPED
    assert Event.objects.filter(message__contains="rolled back to").count() == 1


@pytest.mark.integration
@pytest.mark.slow
def test_a_rollback_killed_after_restoring_the_store_goes_on_without_restoring_it_again(
    ready_firmware: Download, install_workers, admin_user, appliance_root: Path
) -> None:
    """SIGKILL the worker right after the rollback recorded the store's restore: the next
    worker goes on from the recorded steps (the store is restored once, under maintenance)."""
    no_smtp = str(free_port())  # the health check fails: phase 9 rolls back
    first = install_workers(LMI_SMTP_PORT=no_smtp, LMI_JOB_PAUSE="install_rollback:store:30000")
    counts_before = msgcounts.store_counts()
    run = install.install_start(user=admin_user)
    wait_for(
        lambda: "store" in InstallRun.objects.get(pk=run.pk).details.get("rollback_done", []),
        timeout=RUN_TIMEOUT,
        message=f"the rollback did not restore the store; the worker's log:\n{first.log()}",
    )
    assert maintenance_status() is not None  # the store was written while mail was held
    first.kill()
    install_workers(LMI_SMTP_PORT=no_smtp)

    run = wait_final(run.pk)
    assert run.state == InstallState.ROLLED_BACK, (run.state, run.error)
    assert run.job.restarts == 1 and run.job.state == JobState.ROLLED_BACK
    log = install.install_log_tail(run, 500)
    assert sum("restoring the message store" in line for line in log) == 1
    assert msgcounts.store_counts().checksum == counts_before.checksum
    assert system_info().firmware_version == OLD_VERSION and msgstore.format_version() == "2.8.0"
    assert maintenance_status() is None


@pytest.mark.django_db(transaction=True)
def test_a_rollback_run_again_after_its_last_step_changes_nothing(
    ready_firmware: Download, admin_user, settings
) -> None:
    """A rollback whose process died after it left maintenance (mail flows again) but before
    it wrote the final state: the pass run again skips every recorded step, so it neither
    takes mail down again nor fails the count on the mail accepted in between."""
    run = _crash_looping_run(ready_firmware, messages_before=msgcounts.store_counts().messages)
    assert install.install_execute(run.pk) == InstallState.ROLLED_BACK
    run.refresh_from_db()
    assert run.details["rollback_done"][-3:] == ["count", "maintenance", "workdir"]
    # The process "died" before the final write: the run and its job are still at it, and
    # mail was accepted since maintenance was left (the count no longer matches).
    InstallRun.objects.filter(pk=run.pk).update(
        state=InstallState.ROLLING_BACK, messages_before=run.messages_before - 1, finished_at=None
    )
    Job.objects.filter(pk=run.job_id).update(state=JobState.QUEUED, finished_at=None)
    log_before = len(install.install_log_tail(run, 500))

    assert install.install_execute(run.pk) == InstallState.ROLLED_BACK

    assert maintenance_status() is None
    new_lines = install.install_log_tail(run, 500)[log_before:]
    assert not [line for line in new_lines if "rollback: " in line], new_lines


@pytest.mark.django_db(transaction=True)
def test_failed_preflight_changes_nothing(
    ready_firmware: Download, admin_user, appliance_root: Path
) -> None:
    # An honest failure: the downloaded bundle was damaged in the spool since its download.
    path = spool.bundle_path(spool.bundle_id(ready_firmware.version, ready_firmware.sha256))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    before = tree_digest(appliance_root, excluded=())
    with pytest.raises(install.PreflightFailed) as refused:
        install.install_start(user=admin_user)
    assert "nothing was changed" in str(refused.value)
    assert any(c.key == "bundle" and c.status == "fail" for c in refused.value.checks)
    assert differences(before, tree_digest(appliance_root, excluded=())) == []
    assert not InstallRun.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_install_without_a_download_is_refused(demo_appliance: Path, admin_user) -> None:
    with pytest.raises(install.NothingToInstall):
        install.install_start(user=admin_user)
    assert not InstallRun.objects.exists()


@pytest.mark.integration
@pytest.mark.slow
def test_abort_in_phase_2_leaves_the_running_system_untouched(
    ready_firmware: Download, install_workers, admin_user, appliance_root: Path
) -> None:
    install_workers(LMI_INSTALL_PHASE_DELAY_MS="3000", LMI_INSTALL_PHASE_DELAY_PHASE="2")
    tree_before = tree_digest(appliance_root)
    run = install.install_start(user=admin_user)
    wait_for_checkpoint(run, 2, timeout=60)
    install.install_abort(user=admin_user, run_id=run.pk)
    run = wait_final(run.pk)
    assert run.state == InstallState.ABORTED
    assert run.error.startswith("Aborted by an administrator")
    assert system_info().firmware_version == OLD_VERSION
    assert differences(tree_before, tree_digest(appliance_root)) == []
    assert not (appliance_root / "system" / "slot-b").exists()


@pytest.mark.django_db(transaction=True)
def test_abort_is_refused_after_phase_2(ready_firmware: Download, admin_user) -> None:
    run = InstallRun.objects.create(
        download=ready_firmware, version=NEW_VERSION, state=InstallState.RUNNING, phase=4
    )
    with pytest.raises(install.InstallError, match="phases 1 and 2"):
        install.install_abort(user=admin_user, run_id=run.pk)
    run.refresh_from_db()
    assert not run.abort_requested


@pytest.mark.django_db(transaction=True)
def test_a_second_install_is_refused(ready_firmware: Download, admin_user) -> None:
    InstallRun.objects.create(
        download=ready_firmware, version=NEW_VERSION, state=InstallState.RUNNING, phase=2
    )
    with pytest.raises(install.InstallInProgress):
        install.install_start(user=admin_user)
    assert InstallRun.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_an_install_started_while_the_broker_is_down_is_sent_by_the_reconciler(
    ready_firmware: Download, admin_user, monkeypatch
) -> None:
    """The start's enqueue is refused (Redis down): the run and its job wait queued, and the
    reconciler's pass after the grace hands the job to the worker; nothing else is needed."""
    enqueues.broker_down(monkeypatch)
    run = install.install_start(user=admin_user)
    assert (run.state, run.job.state) == (InstallState.QUEUED, JobState.QUEUED)

    sent = enqueues.capture(monkeypatch, "jobs.run")  # the broker is back
    assert reconcile().enqueued == []
    assert reconcile(timezone.now() + enqueue_grace() + timedelta(seconds=1)).enqueued == [
        run.job_id
    ]
    assert sent == [run.job_id]


@pytest.mark.django_db(transaction=True)
def test_the_reconciler_leaves_a_maintenance_that_no_install_holds_any_more(
    ready_firmware: Download, monkeypatch
) -> None:
    from appliance.system.maintenance import maintenance_enter

    enqueues.capture(monkeypatch, "jobs.run")
    ended = _run_with_job(ready_firmware, state=InstallState.ROLLED_BACK, phase=9)
    running = _run_with_job(ready_firmware, state=InstallState.RUNNING, phase=4)

    maintenance_enter("Firmware upgrade to 2.8.1.0", by="admin", holder=f"install:{running.pk}")
    assert reconcile().recovered["maintenance"] == []  # its install still runs: mail is held
    InstallRun.objects.filter(pk=running.pk).delete()
    maintenance_enter("Set by an administrator", by="admin")
    assert reconcile().recovered["maintenance"] == []  # not an install's: never touched
    assert maintenance_status() is not None

    maintenance_enter("Firmware upgrade to 2.8.1.0", by="admin", holder=f"install:{ended.pk}")
    assert reconcile().recovered["maintenance"] == [ended.pk]
    assert maintenance_status() is None
    assert Event.objects.filter(message__startswith="Maintenance mode left: the install").exists()


@pytest.mark.django_db(transaction=True)
def test_no_install_starts_under_a_restore(ready_firmware: Download, admin_user) -> None:
    appliance_job_running("system_restore", "System restore")
    with pytest.raises(install.InstallInProgress, match="System restore is in progress, started"):
        install.install_start(user=admin_user)
    assert not InstallRun.objects.exists()


def _run_with_job(download: Download, **fields: Any) -> InstallRun:
    job = Job.objects.create(kind="install", title=f"Install of firmware {NEW_VERSION}", steps=10)
    return InstallRun.objects.create(download=download, version=NEW_VERSION, job=job, **fields)


def _crash_looping_run(download: Download, **fields: Any) -> InstallRun:
    """A run in phase 3 whose next phase start is one past INSTALL_MAX_ATTEMPTS: it rolls back."""
    from django.conf import settings

    run = _run_with_job(
        download,
        from_version=OLD_VERSION,
        state=InstallState.RUNNING,
        phase=3,
        attempts=settings.INSTALL_MAX_ATTEMPTS,
        **fields,
    )
    InstallPhase.objects.bulk_create(
        InstallPhase(run=run, number=n, name=f"phase {n}") for n in range(1, 11)
    )
    return run


@pytest.mark.django_db(transaction=True)
def test_a_task_for_a_held_run_does_nothing(ready_firmware: Download) -> None:
    """A second copy of the install's task finds the job held by a live executor and leaves."""
    run = _run_with_job(ready_firmware, state=InstallState.RUNNING, phase=1)
    Job.objects.filter(pk=run.job_id).update(
        state=JobState.RUNNING,
        lease_owner=leases.executor_name("other"),  # this very process: alive
        lease_expires_at=timezone.now() + timedelta(seconds=30),
        fence=1,
    )
    InstallPhase.objects.create(run=run, number=1, name="Download")

    assert install.install_execute(run.pk, leases.executor_name("worker")) == InstallState.RUNNING

    run.refresh_from_db()
    assert run.attempts == 0
    assert InstallPhase.objects.get(run=run, number=1).state == PhaseState.PENDING


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_task_of_a_finished_install_does_nothing(ready_firmware: Download) -> None:
    run = _run_with_job(ready_firmware, state=InstallState.SUCCEEDED, phase=10)
    Job.objects.filter(pk=run.job_id).update(state=JobState.SUCCEEDED)

    assert install.install_execute(run.pk) == InstallState.SUCCEEDED

    run.refresh_from_db()
    assert run.attempts == 0 and run.phase == 10


@pytest.mark.django_db(transaction=True)
def test_a_crash_loop_rolls_back_instead_of_trying_for_ever(
    ready_firmware: Download, admin_user, settings
) -> None:
    """Past INSTALL_MAX_ATTEMPTS phase starts the phase fails and the same job rolls back."""
    run = _crash_looping_run(ready_firmware)

    assert install.install_execute(run.pk) == InstallState.ROLLED_BACK

    run.refresh_from_db()
    assert "keeps stopping" in run.error
    assert run.job.state == JobState.ROLLED_BACK and not run.job.lease_owner
    assert system_info().firmware_version == OLD_VERSION
    assert maintenance_status() is None


@pytest.mark.integration
def test_maintenance_lets_only_the_health_probe_through(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:

    from appliance.system import maintenance

    maintenance.maintenance_enter("Firmware upgrade to 2.8.1.0")
    assert read_banner(smtp_service.host, smtp_service.port)[:3] == b"421"
    token = maintenance.maintenance_probe_open()
    try:
        with smtp_service.client() as client:
            # A guessed token is refused like any other sender.
            client.ehlo()
            code, _ = client.mail("upgrade-probe+0123456789abcdef01234567@localhost")
            assert code == 421
        with smtp_service.client() as client:
            refused = client.sendmail(
                maintenance.probe_sender(token), ["postmaster@localhost"], b"Subject: x\r\n\r\nx"
            )
            assert refused == {}
        with smtp_service.client() as client:
            client.ehlo()
            code, _ = client.mail("someone@example.com")
            assert code == 421
    finally:
        maintenance.maintenance_probe_close()
    assert read_banner(smtp_service.host, smtp_service.port)[:3] == b"421"
    assert maintenance.maintenance_status() is not None
    assert not (smtp_service.appliance_root / "var/spool/mailsec/delivered").exists() or not any(
        (smtp_service.appliance_root / "var/spool/mailsec/delivered").iterdir()
    )


@pytest.mark.integration
@pytest.mark.slow
def test_a_damaged_new_system_rolls_back_before_the_store_is_touched(
    ready_firmware: Download, install_workers, admin_user, appliance_root: Path
) -> None:
    """A byte of the staged slot flipped after phase 2: phase 6's read-back refuses the switch."""
    install_workers(
        LMI_INSTALL_PHASE_DELAY_MS="1500",
        LMI_INSTALL_PHASE_DELAY_PHASE="4",
        LMI_SMTP_PORT=str(free_port()),
    )
    tree_before = tree_digest(appliance_root)
    counts_before = msgcounts.store_counts()
    run = install.install_start(user=admin_user)
    wait_for_checkpoint(run, 4, timeout=60, interval=0.05)
    staged = max(
        (p for p in (appliance_root / "system" / "slot-b").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(staged.read_bytes())
    data[len(data) // 2] ^= 0x01
    staged.write_bytes(bytes(data))
    run = wait_final(run.pk)
    assert run.state == InstallState.ROLLED_BACK, (run.state, run.error)
    assert run.error.startswith("Phase 6")
    assert system_info().firmware_version == OLD_VERSION
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts().checksum == counts_before.checksum
    assert differences(tree_before, tree_digest(appliance_root)) == []
    phases = {p.number: p.state for p in run.phases.all()}
    assert phases[6] == PhaseState.ROLLED_BACK and phases[7] == PhaseState.SKIPPED
