"""The one update story (upgrades.story): each stage of an update's life, in the order an
administrator meets them, and the notice Home shows for it (one at a time, never stacked)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from appliance.system.facts import read_firmware_release, write_firmware_release
from tests.upgrades.conftest import run_download, start_download
from tests.upgrades.test_install_views import make_run
from upgrades.models import Download, DownloadState, InstallRun, InstallState
from upgrades.notifications import update_notices
from upgrades.story import Stage, update_story

pytestmark = pytest.mark.django_db


def set_firmware(version: str) -> None:
    write_firmware_release({**read_firmware_release(), "FIRMWARE_VERSION": version})


def story_notices() -> list[tuple[str, str]]:
    return [(notice.level, notice.message) for notice in update_notices()]


def test_the_stages_from_available_to_rolled_back(firmware):
    assert update_story().stage == Stage.UP_TO_DATE
    assert update_story().headline == "Up to date: firmware 2.8.0.0."
    assert story_notices() == []

    firmware.offer(firmware.build())
    assert (update_story().stage, update_story().version) == (Stage.AVAILABLE, "2.8.1.0")

    download = start_download()
    Download.objects.filter(pk=download.pk).update(
        state=DownloadState.RUNNING, bytes_done=download.size // 4
    )
    story = update_story()
    assert (story.stage, story.percent, story.ready_version) == (Stage.DOWNLOADING, 25.0, None)
    assert story_notices() == [("info", "Downloading firmware 2.8.1.0: 25%")]
    Download.objects.filter(pk=download.pk).delete()

    ready = run_download()
    story = update_story()
    assert (story.stage, story.ready_version) == (Stage.DOWNLOADED, "2.8.1.0")
    assert story_notices() == [("info", "Firmware 2.8.1.0 is ready to install.")]

    run = make_run(InstallState.RUNNING, 4, download=ready)
    story = update_story()
    assert (story.stage, story.phase, story.run_id) == (Stage.INSTALLING, 4, run.pk)
    assert story_notices() == [("info", story.headline)]  # one notice, not "ready" as well

    InstallRun.objects.filter(pk=run.pk).update(state=InstallState.ROLLING_BACK, error="disk")
    assert (update_story().stage, update_story().level) == (Stage.ROLLING_BACK, "warning")

    InstallRun.objects.filter(pk=run.pk).update(
        state=InstallState.ROLLED_BACK, finished_at=run.started_at + timedelta(minutes=1)
    )
    story = update_story()
    assert (story.stage, story.reason, story.level) == (Stage.ROLLED_BACK, "disk", "warning")
    assert story.ready_version == "2.8.1.0"  # the same bundle can be tried again
    [(level, message)] = story_notices()
    assert level == "warning" and "was rolled back" in message and message.endswith("disk")


def test_a_bundle_downloaded_after_a_rollback_becomes_the_story(firmware):
    firmware.offer(firmware.build())
    make_run(InstallState.ROLLED_BACK, 7, error="health check failed")
    assert update_story().stage == Stage.ROLLED_BACK

    run_download()  # finished after the rollback

    assert update_story().stage == Stage.DOWNLOADED


def test_a_failed_install_needs_attention_until_something_newer_happens(demo_appliance):
    make_run(InstallState.FAILED, 8, error="the rollback could not restore the store")
    story = update_story()
    assert (story.stage, story.level) == (Stage.FAILED, "error")
    assert story_notices() == [
        ("error", f"{story.headline} the rollback could not restore the store")
    ]


def test_installed_is_told_for_a_day_on_home_and_always_on_the_pages(demo_appliance, clock):
    run = make_run(InstallState.SUCCEEDED, 10)
    set_firmware("2.8.1.0")
    story = update_story()
    assert story.stage == Stage.INSTALLED and story.ready_version is None
    assert story.headline.startswith("Up to date: firmware 2.8.1.0 installed on ")
    assert story.headline.endswith(" by admin.")
    assert story_notices() == [("info", "Upgrade complete: firmware 2.8.1.0.")]

    clock.travel(run.finished_at + timedelta(days=2))
    assert update_story().stage == Stage.INSTALLED
    assert story_notices() == []


def test_the_offer_of_the_running_firmware_reads_installed(firmware):
    from upgrades.selectors import offer_eligibility

    assert offer_eligibility("2.8.1.0", "2.8.0.0", "2.8.1.0").label == "the installed firmware"
    assert offer_eligibility("2.8.0.0", "2.7.0.0", "2.8.1.0").label.startswith("not newer")
