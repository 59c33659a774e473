"""Return to the previous firmware (issue 18), run in this process against the real mail
service: what the upgrade keeps, the refusals (outside the period, a kept part missing), the
release after the period and its notices, a failed return rolled back to the newer firmware,
and the story and notice after a return.

Each test upgrades its own demo appliance here first (install_execute, a few seconds): a return
needs a real upgrade's kept parts, never a made-up one.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from appliance.config import configconvert
from appliance.firmware import firmware, updatelogs
from appliance.mail import msgcounts, msgstore
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from events.models import Event
from jobs.models import JobState
from tests.support.smtp import (
    SmtpServiceProcess,
    free_port,
    smtp_service,  # noqa: F401
)
from tests.upgrades.test_install import (  # noqa: F401
    NEW_VERSION,
    OLD_VERSION,
    roomy_preflight_disk,
)
from upgrades import install, returning, selectors, story
from upgrades.models import Download, InstallRun, InstallState, PhaseState
from upgrades.notifications import update_notices
from upgrades.story import Stage, update_story

pytestmark = [pytest.mark.integration]


def cpe_files(root: Path) -> dict[str, str]:
    """The configuration XML files, by name, with the SHA-256 of their bytes."""
    cpe = root / "etc" / "mailsec" / "cpe"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cpe.iterdir())}


def upgrade_here(admin_user, settings, smtp: SmtpServiceProcess) -> InstallRun:
    """The demo appliance upgraded to 2.8.1.0 in this process, its health check on ``smtp``."""
    settings.SMTP_PORT = smtp.port
    run = install.install_start(user=admin_user)
    assert install.install_execute(run.pk) == InstallState.SUCCEEDED
    run.refresh_from_db()
    return run


@pytest.fixture
def upgraded(
    ready_firmware: Download,
    smtp_service: SmtpServiceProcess,  # noqa: F811
    admin_user,
    settings,
) -> InstallRun:
    """A demo appliance upgraded to 2.8.1.0 in this process, its way back kept."""
    return upgrade_here(admin_user, settings, smtp_service)


@pytest.fixture
def return_until(upgraded: InstallRun) -> datetime:
    """When the upgraded appliance's way back is released: the tests move the clock around it."""
    until = returning.return_until(upgraded)
    assert until is not None
    return until


def return_here(admin_user) -> InstallRun:
    run = returning.return_start(user=admin_user)
    install.install_execute(run.pk)
    run.refresh_from_db()
    return run


def test_the_upgrade_keeps_its_way_back_and_the_return_puts_it_all_back(
    ready_firmware: Download,
    smtp_service: SmtpServiceProcess,  # noqa: F811
    admin_user,
    settings,
    appliance_root: Path,
) -> None:
    config_before = cpe_files(appliance_root)
    upgrade = upgrade_here(admin_user, settings, smtp_service)
    until = returning.return_until(upgrade)
    assert until is not None
    assert timedelta(days=6, hours=23) < until - timezone.now() <= timedelta(days=7)
    kept = updatelogs.return_dir(upgrade.pk) / "config-files.json"
    assert kept.is_file() and not updatelogs.install_workdir(upgrade.pk).exists()
    way = returning.return_available()
    assert way.available and (way.target, way.current) == (OLD_VERSION, NEW_VERSION), way.reason
    counts = msgcounts.store_counts(cached=False)

    run = return_here(admin_user)

    assert run.state == InstallState.SUCCEEDED, (run.phase, run.error)
    assert run.is_return and (run.version, run.from_version) == (OLD_VERSION, NEW_VERSION)
    assert [p.state for p in run.phases.order_by("number")] == [PhaseState.SUCCEEDED] * 10
    assert (
        run.job.state == JobState.SUCCEEDED and run.job.title == f"Return to firmware {OLD_VERSION}"
    )
    assert system_info().firmware_version == OLD_VERSION
    assert firmware.active_slot() == upgrade.details["previous_slot"]
    assert firmware.slot_bootable(upgrade.details["new_slot"])  # kept: installable again
    assert msgstore.format_version() == "2.8.0" and configconvert.config_format() == "2.8.0"
    assert cpe_files(appliance_root) == config_before  # byte for byte
    after = msgcounts.store_counts(cached=False)
    assert after.messages == counts.messages == run.messages_before == run.messages_after
    assert after.tables["messages"] == counts.tables["messages"]
    assert after.tables["bodies"] == counts.tables["bodies"]
    assert maintenance_status() is None
    assert not kept.exists() and not updatelogs.install_workdir(run.pk).exists()
    upgrade.refresh_from_db()
    assert upgrade.details["returned_by_run"] == run.pk
    assert Event.objects.filter(
        message=f"Return complete: firmware {OLD_VERSION} runs again (from {NEW_VERSION})"
    ).exists()
    # The story: back on 2.8.0.0, the same download installable again; one notice says so.
    story = update_story()
    assert story.stage == Stage.RETURNED and story.ready_version == NEW_VERSION
    assert f"returned from {NEW_VERSION}" in story.headline and "by admin" in story.headline
    assert f"Firmware {NEW_VERSION} can be installed again." in story.headline
    notices = [n.message for n in update_notices()]
    assert sum("returned from" in text for text in notices) == 1, notices
    assert not any("possible until" in text for text in notices)
    assert selectors.ready_download().version == NEW_VERSION
    assert not returning.return_available().available


def test_a_return_that_fails_rolls_back_to_the_newer_firmware_exactly(
    upgraded: InstallRun,
    admin_user,
    settings,
    appliance_root: Path,
) -> None:
    upgrade = upgraded
    config_before = cpe_files(appliance_root)
    counts = msgcounts.store_counts(cached=False)
    settings.SMTP_PORT = free_port()  # nobody answers: the health check in phase 9 fails

    run = return_here(admin_user)

    assert run.state == InstallState.ROLLED_BACK, (run.phase, run.error)
    assert "health check" in run.error
    assert system_info().firmware_version == NEW_VERSION
    assert firmware.active_slot() == upgrade.details["new_slot"]
    assert msgstore.format_version() == "2.8.1" and configconvert.config_format() == "2.8.1"
    assert cpe_files(appliance_root) == config_before
    assert msgcounts.store_counts(cached=False).checksum == counts.checksum
    assert maintenance_status() is None
    assert update_story().stage == Stage.ROLLED_BACK
    # Nothing of the way back was used up: it can be tried again.
    assert returning.return_available().available


def test_a_return_is_refused_outside_its_period_and_without_a_kept_part(
    upgraded: InstallRun, return_until: datetime, admin_user, clock
) -> None:
    clock.travel(return_until + timedelta(minutes=1))
    with pytest.raises(returning.NothingToReturn, match="retention period ended"):
        returning.return_start(user=admin_user)

    clock.travel(return_until - timedelta(days=2))
    shutil.rmtree(updatelogs.return_dir(upgraded.pk))
    with pytest.raises(returning.NothingToReturn, match="configuration kept for the way back"):
        returning.return_start(user=admin_user)
    assert not InstallRun.objects.filter(direction="return").exists()


def test_a_removed_previous_system_refuses_the_return(
    upgraded: InstallRun,
    admin_user,
    settings,
) -> None:
    upgrade = upgraded
    firmware.slot_remove(upgrade.details["previous_slot"])
    way = returning.return_available()
    assert not way.available and "is gone" in way.reason
    with pytest.raises(returning.NothingToReturn, match="is gone"):
        returning.return_start(user=admin_user)


def test_the_way_back_is_announced_warned_a_day_before_and_released_after_its_period(
    upgraded: InstallRun,
    return_until: datetime,
    admin_user,
    settings,
    appliance_root: Path,
    clock,
) -> None:
    upgrade = upgraded
    slot = upgrade.details["previous_slot"]
    # One notice after the other, never stacked: the upgrade's own on its first day, then
    # the way back's, then the warning in the last day.
    firmware_notices = [n.message for n in update_notices() if "irmware" in n.message]
    assert firmware_notices == [f"Upgrade complete: firmware {NEW_VERSION}."]
    clock.travel(return_until - timedelta(days=3))
    notices = [n for n in update_notices() if "irmware" in n.message]
    assert [(n.level, n.message) for n in notices] == [
        ("info", f"Return to firmware {OLD_VERSION} possible until {story.when(return_until)}.")
    ]
    clock.travel(return_until - timedelta(hours=20))
    warnings = [n for n in update_notices() if "is released on" in n.message]
    assert [n.level for n in warnings] == ["warning"]
    assert returning.return_release_due() == []  # not yet

    clock.travel(return_until + timedelta(minutes=5))
    assert returning.return_release_due() == [upgrade.pk]

    assert not (appliance_root / "system" / slot).exists()
    assert firmware.slot_image(slot) is None
    assert not updatelogs.return_dir(upgrade.pk).exists()
    upgrade.refresh_from_db()
    assert upgrade.details["released_bytes"] > 0 and upgrade.details["released_slot"] == slot
    event = Event.objects.get(message__startswith=f"The way back to firmware {OLD_VERSION} was")
    assert event.details["bytes_freed"] == upgrade.details["released_bytes"]
    assert returning.return_release_due() == []  # once
    assert not any("released on" in n.message for n in update_notices())
    assert "was released" in returning.return_available().reason
    assert system_info().firmware_version == NEW_VERSION  # the running system untouched
