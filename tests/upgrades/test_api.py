"""/api/v1/updates: status, check, download and cancel; read-only users can only read."""

from __future__ import annotations

import pytest

from tests.upgrades.conftest import start_download
from upgrades.models import Download, DownloadState

pytestmark = pytest.mark.django_db


def _post(client, route: str, auth: dict[str, str] | None = None, data: dict | None = None):
    return client.post(
        f"/api/v1/updates/{route}", data or {}, content_type="application/json", **(auth or {})
    )


def test_status_tells_installed_firmware_offers_download_and_license(client, firmware, admin_token):
    firmware.offer(firmware.build())
    download = start_download()
    Download.objects.filter(pk=download.pk).update(
        state=DownloadState.RUNNING, bytes_done=download.size // 4, rate=2048.0
    )

    status = client.get("/api/v1/updates", **admin_token).json()

    assert status["installed_version"] == "2.8.0.0"
    assert status["last_check"]["ok"] is True
    assert [(o["version"], o["downloadable"]) for o in status["offers"]] == [("2.8.1.0", True)]
    current = status["download"]
    assert current["state"] == "running"
    assert current["bytes_done"] == download.size // 4
    assert current["percent"] == 25.0
    assert current["rate_bytes_per_second"] == 2048
    assert current["eta_seconds"] == round((download.size - download.size // 4) / 2048)
    assert status["ready"] is None
    assert status["license"]["entitled"] is True
    assert status["license"]["customer"] == "Example Corp"
    assert status["automatic_downloads"] is False


def test_check_returns_the_new_status(client, firmware, admin_token):
    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))

    response = _post(client, "check", admin_token)

    assert response.status_code == 200
    assert response.json()["last_check"]["newest_available"] == "2.8.1.0"


def test_check_of_an_unreachable_feed_is_a_502_with_the_reason(
    client, demo_appliance, admin_token, settings, tmp_path
):
    settings.UPDATE_FEED_URL = str(tmp_path / "missing")

    response = _post(client, "check", admin_token)

    assert response.status_code == 502
    assert "The update feed is unreachable" in response.json()["detail"]


def test_download_is_accepted_then_a_second_one_conflicts(client, firmware, admin_token):
    firmware.offer(firmware.build())

    first = _post(client, "download", admin_token, {"version": "2.8.1.0"})
    second = _post(client, "download", admin_token)

    assert first.status_code == 202
    assert first.json()["download"]["state"] == "queued"
    assert first.json()["download"]["requested_by"] == "admin"
    assert second.status_code == 409
    assert "already in progress" in second.json()["detail"]


def test_download_without_a_body_takes_the_newest_firmware(client, firmware, admin_token):
    firmware.offer(firmware.build())

    response = client.generic("POST", "/api/v1/updates/download", b"", **admin_token)

    assert response.status_code == 202, response.content
    assert Download.objects.get().version == "2.8.1.0"


def test_download_refusals_have_their_own_status(client, firmware, admin_token):
    from appliance.system.paths import layout

    firmware.offer(firmware.build("2.8.0.0", "2.7.0.0", payload_bytes=4096), "2.8.0.0", "2.7.0.0")
    nothing = _post(client, "download", admin_token)
    firmware.offer(firmware.build())
    layout().license_file.unlink()
    unlicensed = _post(client, "download", admin_token)

    assert nothing.status_code == 400
    assert "No newer firmware" in nothing.json()["detail"]
    assert unlicensed.status_code == 403
    assert "valid license" in unlicensed.json()["detail"]


def test_cancel_cancels_and_then_has_nothing_to_cancel(client, firmware, admin_token):
    firmware.offer(firmware.build())
    start_download()

    first = _post(client, "cancel", admin_token)
    second = _post(client, "cancel", admin_token)

    assert first.status_code == 200
    assert first.json()["download"]["state"] == "cancelled"
    assert second.status_code == 409


def test_read_only_users_can_read_but_not_change(client, firmware, viewer_token, readonly_client):
    firmware.offer(firmware.build())
    download = start_download()

    assert client.get("/api/v1/updates", **viewer_token).status_code == 200
    for route in ("check", "download", "cancel"):
        response = _post(client, route, viewer_token)
        assert response.status_code == 403, route
        assert "read-only" in response.json()["detail"]
        assert _post(readonly_client, route).status_code == 403
    download.refresh_from_db()
    assert download.state == DownloadState.QUEUED


def test_the_openapi_description_lists_the_update_routes(admin_client):
    paths = admin_client.get("/api/v1/openapi.json").json()["paths"]

    assert {
        "/api/v1/updates",
        "/api/v1/updates/check",
        "/api/v1/updates/download",
        "/api/v1/updates/cancel",
    } <= set(paths)
