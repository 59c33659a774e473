"""Every fault of issue 15 against `make run`'s launcher, under live mail: nothing is lost.

One launcher (its own private Redis, worker, beat, web server and mail service, on the test
database and root) lives through the whole sequence while a client sends mail all along, so
each fault meets the real processes and every 250 is accounted for at the end:

0. the restore of an image that lacks the firmware level, refused over HTTP (item 7);
1. a system backup whose worker is SIGKILLed while the new image is half written (items 8, 9):
   started again by the next worker, the half image swept, exactly one whole image current,
   and mail never held;
2. an install whose mail service dies at phase 9's health check (a late failure, item 3), and
   whose worker is then SIGKILLed inside the rollback just after the store was restored
   (item 4): the next worker finishes the rollback without restoring the store again;
3. an install whose start message is lost (item 2: the reconciler sends it again), during
   which a system restore and a configuration restore are asked for over HTTP (item 6: 409,
   nothing written), whose worker is SIGKILLed in phase 5 and whose Redis is SIGKILLed in
   phase 7 (item 1): it ends succeeded.

Asserted at the end: each run ended within a minute of its fault, every message answered 250
is in the SMTP log exactly once (the store itself unchanged), mail was refused (421) only
inside an install's window, and connections were refused only while the killed mail service
was down. The full-disk item (5) needs a small filesystem of its own:
tests/upgrades/test_install_full_disk.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from accounts.services import api_token_create
from appliance.mail import msgcounts, msgstore
from appliance.system import rescue
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from backups import services as backup_services
from backups import system_image
from jobs.models import Job, JobState
from tests.backups.test_integration import drop_from_image
from tests.support.launcher import LauncherProcess, launched_console
from tests.support.mailload import MailLoad, mail_flowing, outside
from tests.support.services import wait_for
from tests.support.trees import tree_snapshot
from tests.upgrades.conftest import ready_firmware  # noqa: F401
from tests.upgrades.test_install import (  # noqa: F401
    INSTALL_OWN_LOG_ROWS,
    NEW_VERSION,
    OLD_VERSION,
    roomy_preflight_disk,
    wait_final,
    wait_for_checkpoint,
)
from upgrades import install
from upgrades.models import Download, InstallRun, InstallState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_S = 60
CONSOLE_ENV = {
    # A pause in every phase, so each kill lands inside the phase it names.
    "LMI_INSTALL_PHASE_DELAY_MS": "450",
    # ...and inside the rollback's store step and the image write.
    "LMI_JOB_PAUSE": "install_rollback:store:1500,system_backup:tar-started:1500",
    # The reconciler every second; a queued job's lost message is sent again after 2 s.
    "LMI_JOBS_RECONCILE_SECONDS": "1",
    "LMI_JOBS_ENQUEUE_GRACE_SECONDS": "2",
}


def _kill(console: LauncherProcess, name: str) -> int:
    """SIGKILL one of the launcher's children with its process group (a worker and its pool)."""
    pid = console.children()[name]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    return pid


def _restarted(console: LauncherProcess, name: str, killed: int) -> float:
    """Wait until the launcher runs ``name`` again (answering, for Redis and SMTP); when."""

    def back() -> bool:
        if console.children().get(name) in (None, killed):
            return False
        if name == "redis":
            return console.redis_answers()
        if name == "smtp":
            return console.smtp_answers()
        return True

    wait_for(back, timeout=30, interval=0.05, message=f"no new {name}:\n{console.tail()}")
    return time.monotonic()


def _image_dirs(root: Path) -> set[str]:
    return {p.name for p in (root / "rescue").iterdir() if p.name.startswith("image-")}


def _post(console: LauncherProcess, path: str, token: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{console.port}{path}",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_every_fault_under_live_mail_ends_in_success_or_rollback_with_no_mail_lost(
    ready_firmware: Download,  # noqa: F811
    enqueued: list[int],  # handed to the launcher's Redis by hand (or, once, not at all)
    tmp_path: Path,
    appliance_root: Path,
) -> None:
    with launched_console(tmp_path, appliance_root, **CONSOLE_ENV) as console:
        before = msgcounts.store_counts()
        with mail_flowing(console.smtp_port) as load:
            windows = _faults(console, load, enqueued, appliance_root)
            time.sleep(0.5)  # some mail after the last install too

        assert load.failed == [], load.failed  # never a timeout or a 5xx
        assert "Unrecoverable error" not in console.log()
        after = msgcounts.store_counts()
        # Every 250 is in the log once, and so are the successful install's own test messages
        # (the failed install's probe never reached the dead mail service). A session the
        # killed service cut short may have stored its message before the 250 was sent.
        own = INSTALL_OWN_LOG_ROWS
        assert 0 <= after.smtp_log - (before.smtp_log + load.accepted + own) <= load.cut
        assert after.messages == before.messages
        assert load.refused, "no install held mail: the checkpoints were missed"
        assert outside(load.refused, windows["install_a"], windows["install_b"]) == []
        assert outside(load.down, windows["smtp_down"]) == []


def _faults(
    console: LauncherProcess, load: MailLoad, sent: list, root: Path
) -> dict[str, tuple[float, float]]:
    """The three faulted jobs in turn; returns the windows in which mail could be refused."""
    windows: dict[str, tuple[float, float]] = {}

    # 0. An image that lacks the firmware level (as the demo once made it): its restore is
    # refused over HTTP, naming what is missing, with nothing changed (item 7).
    token = api_token_create(get_user_model().objects.get(username="admin"), "faults")
    drop_from_image(root, "etc/firmware-release")
    etc_before = tree_snapshot(root / "etc")
    status, body = _post(console, "/api/v1/backups/system/restore", token)
    assert status in (400, 409) and "etc/firmware-release" in body["detail"], (status, body)
    assert (
        tree_snapshot(root / "etc") == etc_before
        and not Job.objects.filter(kind="system_restore").exists()
    )

    # 1. A system backup killed mid-image: started again, the half image swept, never a 421.
    refused_before = len(load.refused)
    image = rescue.system_backup_info()
    images_before = _image_dirs(root)
    job = system_image.system_backup_start(user="admin")
    console.send_task("jobs.run", sent.pop())
    wait_for(
        lambda: Job.objects.filter(pk=job.pk, step=1, bytes_done__gt=0).exists(),
        timeout=30,
        message=f"the system backup never wrote:\n{console.tail()}",
    )
    killed = _kill(console, "worker")
    assert rescue.system_backup_info() == image  # the old image is current, whole
    _restarted(console, "worker", killed)
    job = wait_for(
        lambda: Job.objects.filter(
            pk=job.pk, state__in=[JobState.SUCCEEDED, JobState.FAILED]
        ).first(),
        timeout=RECOVERY_S,
        message=f"the system backup did not end:\n{console.tail()}",
    )
    assert job.state == JobState.SUCCEEDED and job.restarts == 1, (job.state, job.error)
    assert len(job.details["leftovers_removed"]) == 1
    assert len(_image_dirs(root) - images_before) == 1 and len(_image_dirs(root)) == 1
    info = rescue.system_backup_info()
    assert info is not None and info.sha256 == job.details["sha256"]
    assert rescue.system_backup_verify()
    assert rescue.system_backup_check() == info  # the new image has all an appliance needs
    assert len(load.refused) == refused_before  # a backup never holds mail

    # 2. A late failure (the mail service dies at phase 9's health check), then the rollback's
    # worker killed just after it restored the store: rolled back, the store restored once.
    # What the store holds besides the logs that live mail adds to (counted at the end).
    stored = {
        k: msgcounts.store_counts().tables[k] for k in ("messages", "bodies", "message_stores")
    }
    started = time.monotonic()
    run = install.install_start(user="admin")
    console.send_task("jobs.run", sent.pop())
    wait_for_checkpoint(run, 9, timeout=90, interval=0.05)
    smtp_down = time.monotonic()
    killed = _kill(console, "smtp")
    wait_for(
        lambda: "store" in InstallRun.objects.get(pk=run.pk).details.get("rollback_done", []),
        timeout=RECOVERY_S,
        message=f"the rollback did not restore the store:\n{console.tail()}",
    )
    worker = _kill(console, "worker")
    assert maintenance_status() is not None  # the store was written while mail was held
    windows["smtp_down"] = (smtp_down, _restarted(console, "smtp", killed))
    fault_over = _restarted(console, "worker", worker)
    run = wait_final(run.pk, timeout=RECOVERY_S)
    windows["install_a"] = (started, time.monotonic())
    assert time.monotonic() - fault_over < RECOVERY_S
    assert run.state == InstallState.ROLLED_BACK, (run.state, run.error)
    assert "health check" in run.error
    assert run.job.restarts == 1
    log = install.install_log_tail(run, 500)
    assert sum("restoring the message store" in line for line in log) == 1
    assert maintenance_status() is None
    assert system_info().firmware_version == OLD_VERSION and msgstore.format_version() == "2.8.0"
    assert {k: msgcounts.store_counts().tables[k] for k in stored} == stored

    # 3. The install again: its start message lost, restores refused while it runs, its
    # worker killed in phase 5 and its Redis in phase 7. It ends succeeded.
    backup = backup_services.config_backup_create(user="admin", comment="before the install")
    etc_before = tree_snapshot(root / "etc")
    started = time.monotonic()
    run = install.install_start(user="admin")
    assert sent == [run.job_id]  # ...and never handed to the broker: the reconciler must
    sent.clear()
    wait_for_checkpoint(run, 2, timeout=30, interval=0.05)
    for path in ("/api/v1/backups/system/restore", f"/api/v1/backups/config/{backup.name}/restore"):
        status, body = _post(console, path, token)
        assert status == 409 and "install" in body["detail"].lower(), (path, status, body)
    assert tree_snapshot(root / "etc") == etc_before
    assert InstallRun.objects.get(pk=run.pk).state == InstallState.RUNNING
    wait_for_checkpoint(run, 5, timeout=30, interval=0.05)
    _restarted(console, "worker", _kill(console, "worker"))
    wait_for_checkpoint(run, 7, timeout=RECOVERY_S, interval=0.05)
    fault_over = _restarted(console, "redis", _kill(console, "redis"))
    run = wait_final(run.pk, timeout=RECOVERY_S)
    windows["install_b"] = (started, time.monotonic())
    assert time.monotonic() - fault_over < RECOVERY_S
    assert run.state == InstallState.SUCCEEDED, (run.state, run.error)
    assert run.job.restarts == 1  # the worker's death; a Redis blip leaves the job to its worker
    assert system_info().firmware_version == NEW_VERSION
    return windows
