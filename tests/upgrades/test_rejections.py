"""Bad bundles are refused before anything uses them: the file is deleted, the reason logged.

Each one is served over real HTTP and listed in the feed with its real size and SHA-256 (unless
the test is about the feed's digest), so the defence under test is the one that must hold.
"""

from __future__ import annotations

import pytest

from appliance.firmware import spool
from events.models import Event, Severity
from tests.upgrades import bundles
from tests.upgrades.conftest import run_download
from upgrades.models import Download, DownloadState

pytestmark = pytest.mark.django_db


def _assert_rejected(download: Download, reason: str) -> Event:
    assert download.state == DownloadState.FAILED
    assert download.rejected
    assert reason in download.error
    assert not spool.part_path(spool.bundle_id(download.version, download.sha256)).exists()
    assert not spool.record_path(spool.bundle_id(download.version, download.sha256)).exists()
    assert not spool.bundle_path(spool.bundle_id(download.version, download.sha256)).exists()
    left = [p.name for p in spool.spool_dir().iterdir() if p.name != "XPU"]
    assert left == []  # nothing left to install
    event = Event.objects.get(message__startswith=f"Firmware {download.version} was rejected")
    assert event.severity == Severity.ERROR
    assert reason in event.message
    return event


def test_it_rejects_a_tampered_payload(firmware):
    path = firmware.build()
    bundles.tamper_payload(path)
    firmware.offer(path)  # the feed's digest is of the tampered file: the signature must hold

    download = run_download()

    _assert_rejected(download, "does not match the SHA-256 in its signed manifest")


def test_it_rejects_a_file_whose_digest_differs_from_the_feed(firmware):
    path = firmware.build()
    firmware.offer(path)
    bundles.tamper_payload(path)  # changed on the server after the feed was written

    download = run_download()

    _assert_rejected(download, "does not match the update feed's")


def test_it_rejects_a_truncated_bundle(firmware):
    path = firmware.build()
    bundles.truncate(path, path.stat().st_size - 4096)
    firmware.offer(path)

    download = run_download()

    _assert_rejected(download, "The bundle file is incomplete")


def test_it_rejects_an_unsigned_bundle_as_soon_as_its_header_is_in(firmware):
    path = firmware.build(payload_bytes=3 * 1024 * 1024)
    bundles.unsign(path)
    firmware.offer(path)
    firmware.server.rate = 1024 * 1024  # a few seconds for the whole file

    download = run_download()

    _assert_rejected(download, "not signed")
    assert download.bytes_done < download.size  # stopped early, not after the whole file


def test_it_rejects_a_bundle_signed_with_a_key_it_does_not_trust(firmware):
    stranger = bundles.new_vendor()
    path = bundles.build(stranger, firmware.directory / "lmi-firmware-2.8.1.0.bundle")
    firmware.offer(path)

    download = run_download()

    _assert_rejected(download, "signed by a key this console does not trust")


def test_it_rejects_a_signed_manifest_claiming_an_oversized_payload(firmware):
    path = bundles.signed_by_hand(
        firmware.vendor,
        firmware.directory / "lmi-firmware-2.8.1.0.bundle",
        bundles.random_bytes(4096),
        payload_size=9 * 1024**3,
    )
    firmware.offer(path)

    download = run_download()

    _assert_rejected(download, "accepts at most")


def test_it_rejects_a_server_sending_more_than_the_feed_lists(firmware):
    path = firmware.build()
    firmware.offer(path)
    with path.open("ab") as handle:  # the server's copy grew after the feed was written
        handle.write(b"\0" * 4096)

    download = run_download()

    _assert_rejected(download, "the server offers")


def test_it_rejects_a_system_image_with_a_path_escaping_member(firmware):
    path = bundles.signed_by_hand(
        firmware.vendor, firmware.directory / "lmi-firmware-2.8.1.0.bundle", bundles.escaping_tar()
    )
    firmware.offer(path)

    download = run_download()

    event = _assert_rejected(download, "..")
    assert "outside" in event.message or ".." in event.message


def test_it_rejects_a_bundle_that_is_not_the_version_the_feed_named(firmware):
    path = firmware.build(version="2.8.2.0", min_version="2.8.0.0")
    firmware.offer(path, version="2.8.1.0")

    download = run_download()

    _assert_rejected(download, "the signed bundle is firmware 2.8.2.0")


def test_it_rejects_a_signed_bundle_that_does_not_apply_to_this_firmware(firmware):
    path = firmware.build(version="2.8.1.0", min_version="2.8.1.0")
    firmware.offer(path, version="2.8.1.0", min_version="2.8.0.0")  # the feed lies

    download = run_download()

    _assert_rejected(download, "needs firmware 2.8.1.0 or later")


def test_an_automatic_download_does_not_fetch_a_rejected_bundle_again(firmware):
    from upgrades import services

    path = firmware.build()
    bundles.unsign(path)
    firmware.offer(path)
    run_download()
    services.automatic_downloads_set(enabled=True, user="admin")

    services.update_check(trigger="schedule")

    assert Download.objects.count() == 1
