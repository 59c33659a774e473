"""A disk that fills up during the install, under live mail: the rollback needs no new space,
waits for space where a step does need some, and finishes once it is freed, never leaving
maintenance on, and no message answered 250 is lost.

The appliance root is a real, small filesystem (a tmpfs mounted for the test), served by
`make run`'s launcher (worker, beat, Redis, mail service) while a client sends mail all along.
While phase 7 waits at its checkpoint, the test fills the filesystem to the last byte, so the
store's migration fails with ENOSPC and the rollback meets the same full disk. The test frees
the space only after the rollback failed at least once; the run must then end rolled back on
its own, with the stored messages, the firmware level and mail acceptance as before, every 250
in the SMTP log once, and mail refused (4xx, never 5xx) only inside the install's window.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.mail import msgcounts, msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from events.models import Event
from tests.support.launcher import launched_console
from tests.support.mailload import mail_flowing, outside
from tests.support.services import wait_for
from tests.upgrades.test_install import (  # noqa: F401
    OLD_VERSION,
    RUN_TIMEOUT,
    roomy_preflight_disk,
    wait_final,
    wait_for_checkpoint,
)
from upgrades import install
from upgrades.models import Download, InstallRun, InstallState
from upgrades.story import update_story

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISK_MB = 128  # the spool keeps the bundle and a 64 MB margin


@pytest.fixture
def appliance_root(tmp_path: Path, settings) -> Iterator[Path]:
    """The appliance root on its own small filesystem (a tmpfs), so that it can really fill."""
    root = tmp_path / "appliance"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(root)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a small filesystem cannot be mounted here: {mounted.stderr.strip()}")
    settings.APPLIANCE_ROOT = root
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _fill(root: Path) -> Path:
    """Write until the filesystem refuses a byte more; the file that holds it all."""
    filler = root / "filler"
    chunk = b"\0" * (1024 * 1024)
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:  # the last partial megabyte, a kilobyte at a time
                out.write(chunk[:1024])
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    assert os.statvfs(root).f_bavail == 0
    return filler


def test_a_disk_that_fills_up_in_phase_7_rolls_back_once_space_is_freed(
    ready_firmware: Download,
    enqueued: list[int],  # handed to the launcher's Redis below
    tmp_path: Path,
    appliance_root: Path,
) -> None:
    with launched_console(
        tmp_path,
        appliance_root,
        LMI_INSTALL_PHASE_DELAY_MS="1500",
        LMI_INSTALL_PHASE_DELAY_PHASE="7",
        LMI_JOBS_RECONCILE_SECONDS="1",
    ) as console:
        before = msgcounts.store_counts()
        stored = {k: before.tables[k] for k in ("messages", "bodies", "message_stores")}
        with mail_flowing(console.smtp_port) as load:
            started = time.monotonic()
            run = install.install_start(user="admin")
            console.send_task("jobs.run", enqueued.pop())
            wait_for_checkpoint(run, 7, timeout=RUN_TIMEOUT, interval=0.05)
            filler = _fill(appliance_root)

            failed = wait_for(
                lambda: (
                    (r := InstallRun.objects.get(pk=run.pk)).details.get("rollback_failures") and r
                ),
                timeout=RUN_TIMEOUT,
                message=f"the rollback never met the full disk:\n{console.tail()}",
            )
            assert failed.state == InstallState.ROLLING_BACK  # retried, not abandoned
            assert maintenance_status() is not None  # mail held over the half-upgraded appliance
            headline = update_story().headline
            assert "the rollback keeps failing and is retried" in headline
            assert "the disk holding the appliance" in headline and "is full" in headline
            filler.unlink()  # the administrator frees space

            run = wait_final(run.pk)
            ended = time.monotonic()
            time.sleep(0.5)  # some mail after the install too

    assert run.state == InstallState.ROLLED_BACK, (run.state, run.error)
    assert "the disk holding the appliance" in run.error and "is full" in run.error, run.error
    assert maintenance_status() is None
    assert system_info().firmware_version == OLD_VERSION
    assert msgstore.format_version() == "2.8.0"
    assert Event.objects.filter(message__contains="failed, retrying in").exists()
    # Mail: never a 5xx or a dropped connection, 4xx only while the install held it, and
    # every 250 in the SMTP log once (the failed install's health check never ran).
    assert load.failed == [] and load.down == [], (load.failed, load.down)
    assert load.refused and outside(load.refused, (started, ended)) == []
    after = msgcounts.store_counts()
    assert after.smtp_log == before.smtp_log + load.accepted
    assert {k: after.tables[k] for k in stored} == stored
