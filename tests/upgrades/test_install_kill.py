"""SIGKILL the worker inside every phase of the install; a new worker must finish the run.

Each test starts a real worker with a pause inside every phase (LMI_INSTALL_PHASE_DELAY_MS, a
checkpoint placed after the phase's first side effect where it has several), waits until phase
N sits at its checkpoint, kills the whole worker (main process and pool child) with SIGKILL,
and starts a fresh one. The job engine's reconciler, at the fresh worker's start, sees the
holder's process gone and hands the install's job to it at once (on_dead resume). Asserted:
the run ends SUCCEEDED (never a third state), phase N was started exactly twice and every
other phase once, every phase completed exactly once, and no message was lost or changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import configconvert
from appliance.mail import msgcounts, msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from tests.support.crash import EVERY_PHASE
from tests.support.smtp import (
    SmtpServiceProcess,
    smtp_service,  # noqa: F401
)
from tests.upgrades.test_install import (  # noqa: F401
    NEW_VERSION,
    completed_events,
    install_workers,
    ready_firmware,
    roomy_preflight_disk,
    wait_final,
    wait_for_checkpoint,
)
from upgrades import install
from upgrades.models import Download, InstallState

DELAY_MS = "800"
LEASE = "6"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("phase", EVERY_PHASE)
def test_worker_killed_inside_a_phase_resumes_to_success(
    phase: int,
    ready_firmware: Download,  # noqa: F811
    smtp_service: SmtpServiceProcess,  # noqa: F811
    install_workers,  # noqa: F811
    admin_user,
    appliance_root: Path,
) -> None:
    env = {"LMI_SMTP_PORT": str(smtp_service.port), "LMI_INSTALL_LEASE_SECONDS": LEASE}
    # The pause only where the kill lands: the other phases run at full speed.
    first = install_workers(
        LMI_INSTALL_PHASE_DELAY_MS=DELAY_MS, LMI_INSTALL_PHASE_DELAY_PHASE=str(phase), **env
    )
    before = msgcounts.store_counts()
    run = install.install_start(user=admin_user)

    wait_for_checkpoint(run, phase, timeout=90, interval=0.05)
    first.kill()
    install_workers(**env)

    run = wait_final(run.pk)
    assert run.state == InstallState.SUCCEEDED, (run.state, run.error)
    run.job.refresh_from_db()
    assert (run.job.state, run.job.restarts, run.job.lease_owner) == ("succeeded", 1, "")
    attempts = dict(run.phases.values_list("number", "attempts"))
    assert attempts == {n: 2 if n == phase else 1 for n in range(1, 11)}
    assert completed_events(run) == {n: 1 for n in range(1, 11)}
    assert system_info().firmware_version == NEW_VERSION
    assert msgstore.format_version() == "2.8.1"
    assert configconvert.config_format() == "2.8.1"
    assert maintenance_status() is None
    after = msgcounts.store_counts()
    assert after.messages == before.messages == run.messages_after
    assert after.tables["messages"] == before.tables["messages"]
    assert after.tables["bodies"] == before.tables["bodies"]
    # Exactly one health probe was tracked, even when phase 9 ran twice... unless the kill
    # fell after the probe (it cannot: phase 9's checkpoint is before the health check).
    assert after.smtp_log == before.smtp_log + 1
    assert not (appliance_root / "var" / "spool" / "updates" / f"install-{run.pk}").exists()
