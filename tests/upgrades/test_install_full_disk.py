"""A disk that fills up during the install: the rollback needs no new space, waits for space
where a step does need some, and finishes once it is freed, never leaving maintenance on.

The appliance root is a real, small filesystem (a tmpfs mounted for the test): while phase 7
waits at its checkpoint, the test fills it to the last byte, so the store's migration fails
with ENOSPC and the rollback meets the same full disk. The test frees the space only after
the rollback failed at least once; the run must then end rolled back on its own, with the
message store, the firmware level and mail acceptance as before.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.mail import msgcounts, msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from events.models import Event
from tests.support.services import wait_for
from tests.upgrades.test_install import (  # noqa: F401
    OLD_VERSION,
    RUN_TIMEOUT,
    install_workers,
    ready_firmware,
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
    ready_firmware: Download,  # noqa: F811
    install_workers,  # noqa: F811
    admin_user,
    appliance_root: Path,
) -> None:
    install_workers(LMI_INSTALL_PHASE_DELAY_MS="1500", LMI_INSTALL_PHASE_DELAY_PHASE="7")
    counts_before = msgcounts.store_counts()
    run = install.install_start(user=admin_user)
    wait_for_checkpoint(run, 7, timeout=RUN_TIMEOUT, interval=0.05)
    filler = _fill(appliance_root)

    failed = wait_for(
        lambda: (r := InstallRun.objects.get(pk=run.pk)).details.get("rollback_failures") and r,
        timeout=RUN_TIMEOUT,
        message="the rollback never met the full disk",
    )
    assert failed.state == InstallState.ROLLING_BACK  # retried, not abandoned
    assert maintenance_status() is not None  # mail held over the half-upgraded appliance
    headline = update_story().headline
    assert "the rollback keeps failing and is retried" in headline
    assert "the disk holding the appliance" in headline and "is full" in headline
    filler.unlink()  # the administrator frees space

    run = wait_final(run.pk)
    assert run.state == InstallState.ROLLED_BACK, (run.state, run.error)
    assert "the disk holding the appliance" in run.error and "is full" in run.error, run.error
    assert maintenance_status() is None
    assert system_info().firmware_version == OLD_VERSION
    assert msgstore.format_version() == "2.8.0"
    assert msgcounts.store_counts().checksum == counts_before.checksum
    assert Event.objects.filter(message__contains="failed, retrying in").exists()
