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
from appliance.mail import msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from tests.support.crash import EVERY_PHASE
from tests.support.smtp import (
    smtp_service,  # noqa: F401
)
from tests.upgrades.test_install import (  # noqa: F401
    INSTALL_OWN_LOG_ROWS,
    NEW_VERSION,
    killed_in_phase_then_resumed,
    roomy_preflight_disk,
)
from upgrades import install
from upgrades.models import Download

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("phase", EVERY_PHASE)
def test_worker_killed_inside_a_phase_resumes_to_success(
    phase: int,
    ready_firmware: Download,
    workers_on_mail,
    admin_user,
    appliance_root: Path,
) -> None:
    # The install's own test messages logged once each, even when phase 9 or 10 ran twice
    # (phase 9's health probe, phase 10's report).
    run = killed_in_phase_then_resumed(
        lambda: install.install_start(user=admin_user),
        phase,
        workers_on_mail,
        own_log_rows=INSTALL_OWN_LOG_ROWS,
    )
    assert system_info().firmware_version == NEW_VERSION
    assert msgstore.format_version() == "2.8.1"
    assert configconvert.config_format() == "2.8.1"
    assert maintenance_status() is None
    assert not (appliance_root / "var" / "spool" / "updates" / f"install-{run.pk}").exists()
