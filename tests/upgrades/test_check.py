"""Checking the update feed: offers and whether they apply, failures that are never silent."""

from __future__ import annotations

import socket

import pytest

from events.models import Event, Severity
from home.notifications import current_notices
from tests.upgrades import bundles
from upgrades import selectors, services
from upgrades.models import Download, DownloadState, DownloadTrigger, FirmwareOffer, UpdateCheck

pytestmark = pytest.mark.django_db


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_check_lists_the_offers_and_says_which_apply(firmware):
    newer = firmware.build("2.8.1.0", "2.8.0.0")
    same = firmware.build("2.8.0.0", "2.7.0.0", payload_bytes=4096)
    too_new = firmware.build("2.9.0.0", "2.8.1.0", payload_bytes=4096)
    firmware.publish(
        (newer, "2.8.1.0", "2.8.0.0"), (same, "2.8.0.0", "2.7.0.0"), (too_new, "2.9.0.0", "2.8.1.0")
    )

    check = services.update_check(trigger="user", user="admin")

    assert check.ok and check.offers_listed == 3
    assert check.newest_available == "2.8.1.0"
    labels = {
        v.offer.version: (v.downloadable, v.eligibility.label) for v in selectors.listed_offers()
    }
    assert labels == {
        "2.9.0.0": (False, "needs firmware 2.8.1.0 or later (installed: 2.8.0.0)"),
        "2.8.1.0": (True, "newer than the installed firmware"),
        "2.8.0.0": (False, "the installed firmware"),
    }
    offer = FirmwareOffer.objects.get(version="2.8.1.0")
    assert offer.url == firmware.server.url(newer.name)
    assert offer.sha256 == bundles.sha256_of(newer)
    assert Event.objects.filter(message="Firmware 2.8.1.0 is available").count() == 1
    assert Event.objects.get(message__startswith="Checked for firmware updates").username == "admin"


def test_offers_that_do_not_apply_cannot_be_downloaded(firmware):
    same = firmware.build("2.8.0.0", "2.7.0.0", payload_bytes=4096)
    firmware.offer(same, "2.8.0.0", "2.7.0.0")

    with pytest.raises(services.NothingToDownload, match="No newer firmware"):
        services.download_start(user="admin", trigger=DownloadTrigger.USER)
    with pytest.raises(services.NotDownloadable, match="it is the installed firmware"):
        services.download_start(user="admin", trigger=DownloadTrigger.USER, version="2.8.0.0")
    assert not Download.objects.exists()


def test_an_offer_seen_again_is_not_announced_twice(firmware):
    firmware.offer(firmware.build())
    services.update_check(trigger="schedule")

    assert Event.objects.filter(message="Firmware 2.8.1.0 is available").count() == 1
    assert FirmwareOffer.objects.count() == 1


def test_an_unreachable_feed_is_an_event_and_a_visible_message(settings, demo_appliance):
    settings.UPDATE_FEED_URL = f"http://127.0.0.1:{_closed_port()}/"

    check = services.update_check(trigger="schedule")

    assert not check.ok
    assert "The update feed is unreachable: the connection was refused" in check.error
    event = Event.objects.get(category="update")
    assert event.severity == Severity.WARNING
    assert event.message.startswith("Checking for firmware updates failed")
    assert any("Checking for firmware updates failed" in n.message for n in current_notices())


def test_a_missing_feed_is_reported_with_the_status(firmware, settings):
    settings.UPDATE_FEED_URL = firmware.server.url("nowhere/")

    check = services.update_check(trigger="user")

    assert "404 Not Found" in check.error


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"<html>maintenance</html>", "not valid JSON"),
        (b'{"format": 7, "bundles": []}', "format 7"),
        (b'{"format": 1, "bundles": [{"version": "2.8.1.0"}]}', 'lacks the field "min_version"'),
    ],
)
def test_a_malformed_feed_is_an_event_and_a_visible_message(firmware, content, reason):
    (firmware.directory / "feed.json").write_bytes(content)

    check = services.update_check(trigger="user", user="admin")

    assert not check.ok
    assert check.error.startswith("The update feed is malformed")
    assert reason in check.error
    assert Event.objects.filter(message__contains=reason, severity=Severity.WARNING).exists()
    assert UpdateCheck.objects.count() == 1


def test_offers_dropped_from_the_feed_are_no_longer_listed(firmware):
    firmware.offer(firmware.build())
    firmware.publish()

    services.update_check(trigger="user")

    assert selectors.listed_offers() == []


def test_automatic_downloads_start_when_a_check_finds_new_firmware(
    firmware, django_capture_on_commit_callbacks
):
    services.automatic_downloads_set(enabled=True, user="admin")
    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))

    with django_capture_on_commit_callbacks() as callbacks:
        services.update_check(trigger="schedule")

    download = Download.objects.get()
    assert download.trigger == DownloadTrigger.AUTOMATIC
    assert download.state == DownloadState.QUEUED
    assert len(callbacks) == 1  # the task is enqueued once the row is committed
    assert Event.objects.filter(message__contains="started (automatic firmware downloads)").exists()


def test_automatic_downloads_stay_off_by_default(firmware):
    firmware.offer(firmware.build())

    assert not Download.objects.exists()


def test_automatic_downloads_without_entitlement_say_why(firmware, vendor):
    from appliance.firmware import license as appliance_license
    from tests.upgrades.conftest import issue_license

    appliance_license.install_license(issue_license(vendor, days=-1))
    services.automatic_downloads_set(enabled=True, user="admin")
    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))

    services.update_check(trigger="schedule")

    assert not Download.objects.exists()
    event = Event.objects.get(
        message__startswith="Automatic download of firmware 2.8.1.0 did not start"
    )
    assert "update entitlement ended" in event.message


def test_downloads_need_a_license(firmware, demo_appliance):
    from appliance.system.paths import layout

    layout().license_file.unlink()
    firmware.offer(firmware.build())

    with pytest.raises(services.NotEntitled, match="No license is installed"):
        services.download_start(user="admin", trigger=DownloadTrigger.USER)


def test_downloads_need_an_unexpired_entitlement(firmware, vendor):
    from appliance.firmware import license as appliance_license
    from tests.upgrades.conftest import issue_license

    appliance_license.install_license(issue_license(vendor, days=-30))
    firmware.offer(firmware.build())

    with pytest.raises(services.NotEntitled, match="update entitlement ended on"):
        services.download_start(user="admin", trigger=DownloadTrigger.USER)


def test_feed_location_accepts_a_json_url_a_base_url_and_a_directory(tmp_path):
    assert services.feed_location("https://updates.example/lmi/feed.json") == (
        "https://updates.example/lmi/feed.json",
        "https://updates.example/lmi/feed.json",
    )
    assert services.feed_location("https://updates.example/lmi")[0] == (
        "https://updates.example/lmi/feed.json"
    )
    assert services.feed_location(str(tmp_path)) == (str(tmp_path / "feed.json"), str(tmp_path))
