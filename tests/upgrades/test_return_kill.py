"""SIGKILL the worker inside every phase of Return to 2.8.0.0; a new worker must finish it.

As tests/upgrades/test_install_kill.py does for the install: the demo appliance is upgraded
first (in this process, a few seconds), then a real worker runs the return with a pause inside
phase N only (LMI_INSTALL_PHASE_DELAY_MS), is killed whole with SIGKILL while it sits there,
and a fresh worker is started; the job engine's reconciler hands the return to it at once.
Asserted: the return ends SUCCEEDED, phase N was started twice and every other phase once, each
completed once, and the appliance is 2.8.0.0 with every message and the previous configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import configconvert
from appliance.firmware import updatelogs
from appliance.mail import msgcounts, msgmigrate, msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from tests.support.crash import EVERY_PHASE
from tests.support.smtp import (
    SmtpServiceProcess,
    smtp_service,  # noqa: F401
)
from tests.upgrades.test_install import (  # noqa: F401
    NEW_VERSION,
    OLD_VERSION,
    differences,
    killed_in_phase_then_resumed,
    roomy_preflight_disk,
    tree_digest,
    wait_final,
    wait_for_checkpoint,
)
from tests.upgrades.test_return_services import (  # noqa: F401
    cpe_files,
    upgrade_here,
    upgraded,
)
from upgrades import install, returning
from upgrades.models import Download, InstallRun, InstallState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("phase", EVERY_PHASE)
def test_worker_killed_inside_a_return_phase_resumes_to_success(
    phase: int,
    ready_firmware: Download,
    smtp_service: SmtpServiceProcess,  # noqa: F811
    workers_on_mail,
    admin_user,
    settings,
    appliance_root: Path,
) -> None:
    config_before = cpe_files(appliance_root)
    upgrade_here(admin_user, settings, smtp_service)
    run = killed_in_phase_then_resumed(
        lambda: returning.return_start(user=admin_user),
        phase,
        workers_on_mail,
        own_log_rows=1,  # the return's one health probe
    )
    assert system_info().firmware_version == OLD_VERSION
    assert msgstore.format_version() == "2.8.0"
    assert configconvert.config_format() == "2.8.0"
    assert cpe_files(appliance_root) == config_before
    assert maintenance_status() is None
    assert not updatelogs.install_workdir(run.pk).exists()


def test_abort_in_phase_2_of_a_return_leaves_the_newer_firmware_untouched(
    upgraded: InstallRun,  # noqa: F811
    worker_paused_at,
    admin_user,
    appliance_root: Path,
) -> None:
    worker_paused_at(phase=2, ms=3000)
    tree_before = tree_digest(appliance_root)
    counts_before = msgcounts.store_counts(cached=False)
    run = returning.return_start(user=admin_user)
    wait_for_checkpoint(run, 2, timeout=60)
    install.install_abort(user=admin_user, run_id=run.pk)

    run = wait_final(run.pk)
    assert run.state == InstallState.ABORTED, (run.state, run.error)
    assert system_info().firmware_version == NEW_VERSION
    assert msgstore.format_version() == "2.8.1" and configconvert.config_format() == "2.8.1"
    assert differences(tree_before, tree_digest(appliance_root)) == []
    assert msgcounts.store_counts(cached=False).checksum == counts_before.checksum
    assert not msgmigrate.partial_path(direction=msgmigrate.BACK).exists()
    assert returning.return_available().available  # it can be started again
