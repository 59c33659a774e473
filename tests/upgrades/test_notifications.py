"""Home shows what the guide promises: available, downloading, ready to install."""

from __future__ import annotations

import pytest

from home.notifications import current_notices
from tests.upgrades.conftest import run_download, start_download
from upgrades.models import Download, DownloadState

pytestmark = pytest.mark.django_db


def _messages() -> list[str]:
    return [notice.message for notice in current_notices()]


def test_nothing_is_said_before_the_feed_was_checked(demo_appliance):
    from upgrades.notifications import update_notices

    assert update_notices() == []


def test_available_firmware_is_announced_with_its_release_notes(firmware):
    firmware.offer(firmware.build())

    [notice] = [n for n in current_notices() if "2.8.1.0" in n.message]

    assert (
        notice.message == "Firmware 2.8.1.0 is available. Firmware 2.8.1.0: bug fixes and SLES 11."
    )
    assert notice.link_url == "/updates/licensing/"


def test_the_download_shows_its_progress_then_ready_to_install(firmware, client, admin_user):
    firmware.offer(firmware.build())
    download = start_download()
    Download.objects.filter(pk=download.pk).update(
        state=DownloadState.RUNNING, bytes_done=download.size * 45 // 100
    )

    assert "Downloading firmware 2.8.1.0: 45%" in _messages()
    assert not [m for m in _messages() if "is available" in m]

    Download.objects.filter(pk=download.pk).update(state=DownloadState.QUEUED, bytes_done=0)
    from upgrades import downloader

    downloader.download_execute(download.pk)

    assert "Firmware 2.8.1.0 is ready to install." in _messages()
    client.force_login(admin_user)
    assert (
        "Firmware 2.8.1.0 is ready to install."
        in client.get("/home/notifications/").content.decode()
    )


def test_a_failed_download_is_a_warning_with_the_reason(firmware):
    from tests.upgrades import bundles

    path = firmware.build()
    bundles.unsign(path)
    firmware.offer(path)
    run_download()

    warnings = [n for n in current_notices() if n.level == "warning"]

    assert any(
        "The download of firmware 2.8.1.0 failed" in n.message and "not signed" in n.message
        for n in warnings
    )


def test_without_entitlement_the_notice_says_a_license_is_needed(firmware):
    from appliance.system.paths import layout

    firmware.offer(firmware.build())
    layout().license_file.unlink()

    [notice] = [n for n in current_notices() if "2.8.1.0" in n.message]

    assert notice.level == "warning"
    assert "needs a valid license: No license is installed." in notice.message
