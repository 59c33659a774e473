"""Updates > Updates & Licensing: the page, Check now, Download, Cancel, settings, licenses."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from appliance.firmware import license as appliance_license
from events.models import Event
from jobs.models import Job, JobState
from tests.upgrades import bundles
from tests.upgrades.conftest import issue_license, run_download, start_download
from tests.upgrades.test_story import set_firmware
from upgrades import services
from upgrades.cli_output import cli_user
from upgrades.models import Download, DownloadState, UpdateSettings

pytestmark = pytest.mark.django_db

PAGE = "/updates/licensing/"


def _csrf(client) -> dict[str, str]:
    client.get(PAGE)
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def _post(client, url: str, data: dict | None = None):
    return client.post(url, data or {}, follow=True, **_csrf(client))


def test_the_page_shows_offers_release_notes_and_the_license(admin_client, firmware):
    firmware.publish(
        (firmware.build("2.8.1.0"), "2.8.1.0", "2.8.0.0"),
        (firmware.build("2.8.0.0", "2.7.0.0", payload_bytes=4096), "2.8.0.0", "2.7.0.0"),
    )
    services.update_check(trigger="user", user="admin")

    html = admin_client.get(PAGE).content.decode()

    assert 'data-testid="download-2.8.1.0"' in html
    assert 'data-testid="download-2.8.0.0"' not in html
    assert "the installed firmware" in html
    assert "Firmware 2.8.1.0: bug fixes and SLES 11." in html
    assert "Example Corp" in html and "Entitled to updates" in html
    assert "Firmware 2.8.1.0 is available" in html
    assert 'data-testid="check-now"' in html


def test_after_the_install_the_last_check_says_its_offer_is_installed_not_available(
    admin_client, firmware
):
    """The check ran before the install; its result must not tell the old story beside the
    page's "Up to date" (issue 14: one update story)."""
    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))
    services.update_check(trigger="cli", user=cli_user())
    set_firmware("2.8.1.0")

    html = admin_client.get(PAGE).content.decode()

    assert "Firmware 2.8.1.0 was available; it is installed now" in html
    assert "Firmware 2.8.1.0 is available" not in html
    assert f", by {cli_user()}</dd>" in html  # not "(update-control, root (update-control))"


def test_check_now_shows_the_result(admin_client, firmware):
    firmware.publish((firmware.build(), "2.8.1.0", "2.8.0.0"))

    response = _post(admin_client, "/updates/licensing/check/")

    assert "Firmware 2.8.1.0 is available." in response.content.decode()
    assert Event.objects.filter(username="admin", message__startswith="Checked for").exists()


def test_check_now_shows_an_unreachable_feed(admin_client, demo_appliance, settings, tmp_path):
    settings.UPDATE_FEED_URL = str(tmp_path / "gone")

    html = _post(admin_client, "/updates/licensing/check/").content.decode()

    assert "The update feed is unreachable: no such file" in html
    assert 'class="check-failed"' in html


def test_download_creates_the_download_and_enqueues_it_on_commit(
    admin_client, firmware, django_capture_on_commit_callbacks
):
    firmware.offer(firmware.build())

    with django_capture_on_commit_callbacks() as callbacks:
        response = _post(admin_client, "/updates/licensing/download/", {"version": "2.8.1.0"})

    download = Download.objects.get()
    assert download.state == DownloadState.QUEUED and download.requested_by == "admin"
    assert len(callbacks) == 1
    html = response.content.decode()
    assert "Started the download of firmware 2.8.1.0." in html
    assert 'hx-trigger="every 1s"' in html  # the progress panel polls while it is active


def test_a_second_download_is_refused_with_a_message(admin_client, firmware):
    firmware.offer(firmware.build())
    start_download()

    html = _post(
        admin_client, "/updates/licensing/download/", {"version": "2.8.1.0"}
    ).content.decode()

    assert "already in progress" in html
    assert Download.objects.count() == 1


def test_download_without_a_license_says_so(admin_client, firmware):
    from appliance.system.paths import layout

    firmware.offer(firmware.build())
    layout().license_file.unlink()

    html = _post(
        admin_client, "/updates/licensing/download/", {"version": "2.8.1.0"}
    ).content.decode()

    assert "Firmware downloads need a valid license" in html
    assert "No license is installed" in html
    assert not Download.objects.exists()


def test_the_progress_partial_shows_bytes_percent_rate_and_time_left(admin_client, firmware):
    firmware.offer(firmware.build())
    download = start_download()
    Download.objects.filter(pk=download.pk).update(state=DownloadState.RUNNING)
    # The page shows the download's job: the one progress of every kind of long work.
    Job.objects.filter(pk=download.job_id).update(
        state=JobState.RUNNING, bytes_done=download.size // 2, rate=1024 * 1024
    )

    html = admin_client.get("/updates/licensing/download/progress/").content.decode()

    assert 'data-testid="job-percent">50%, step 1 of 2' in html
    assert "1.0\xa0MB/s" in html
    assert 'data-testid="job-eta">1 s' in html
    assert 'hx-trigger="every 1s"' in html
    assert 'data-testid="cancel"' in html


def test_the_progress_partial_stops_polling_once_ready(admin_client, firmware):
    firmware.offer(firmware.build())
    run_download()

    html = admin_client.get("/updates/licensing/download/progress/").content.decode()

    assert "Firmware 2.8.1.0 is ready to install." in html
    assert 'data-testid="download-percent">100%' in html
    assert "hx-trigger" not in html
    assert 'data-testid="install-entry"' in html  # the way on to the preflight checklist
    # The page's story line is replaced with it, so it cannot stay at "Downloading: 0%".
    story = html[html.index('id="update-story"') :]
    assert 'hx-swap-oob="true"' in story[: story.index(">")]
    assert story[story.index(">") + 1 :].startswith("Firmware 2.8.1.0 is ready to install.</p>")


def test_the_page_tells_the_update_story_once(admin_client, firmware):
    """The story leads the page; the notices beside it do not repeat it."""
    firmware.offer(firmware.build())
    html = admin_client.get(PAGE).content.decode()
    assert html.count("Firmware 2.8.1.0 is available.") == 1

    run_download()
    html = admin_client.get(PAGE).content.decode()
    assert html.count("is ready to install.") == 2  # the story line, and the download panel's
    assert "is available." not in html


def test_cancel_cancels_the_active_download(admin_client, firmware):
    firmware.offer(firmware.build())
    download = start_download()

    html = _post(admin_client, "/updates/licensing/cancel/").content.decode()

    download.refresh_from_db()
    assert download.state == DownloadState.CANCELLED
    assert "was cancelled" in html


def test_automatic_downloads_toggle_writes_an_event(admin_client, demo_appliance):
    _post(admin_client, "/updates/licensing/settings/", {"automatic_downloads": "on"})

    assert UpdateSettings.objects.get().automatic_downloads
    assert Event.objects.get(message="Automatic firmware downloads turned on").username == "admin"

    _post(admin_client, "/updates/licensing/settings/", {})

    assert not UpdateSettings.objects.get().automatic_downloads


def test_uploading_a_valid_license_installs_it(admin_client, demo_appliance, vendor):
    upload = SimpleUploadedFile("license.json", issue_license(vendor, days=30))

    html = _post(
        admin_client, "/updates/licensing/license/", {"license_file": upload}
    ).content.decode()

    assert "License installed for Example Corp" in html
    assert appliance_license.license_status().entitled
    assert Event.objects.get(message__startswith="License installed").username == "admin"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda v: issue_license(v).replace(b"Example Corp", b"Examp1e Corp"),
            "altered after it was issued",
        ),
        (lambda v: issue_license(bundles.new_vendor()), "key this console does not trust"),
        (lambda v: issue_license(v, serial="ZZ99999"), "issued for serial ZZ99999"),
        (lambda v: b"not a license", "not valid JSON"),
    ],
    ids=["tampered", "foreign-key", "other-appliance", "garbage"],
)
def test_a_bad_license_file_is_refused_with_the_reason(
    admin_client, demo_appliance, vendor, make, message
):
    upload = SimpleUploadedFile("license.json", make(vendor))

    html = _post(
        admin_client, "/updates/licensing/license/", {"license_file": upload}
    ).content.decode()

    assert "The license file was refused" in html
    assert message in html
    assert not appliance_license.license_status().valid
    assert Event.objects.filter(
        message__startswith="A license file was refused", username="admin"
    ).exists()


def test_an_expired_license_installs_but_says_downloads_stay_refused(
    admin_client, demo_appliance, vendor
):
    upload = SimpleUploadedFile("license.json", issue_license(vendor, days=-3))

    html = _post(
        admin_client, "/updates/licensing/license/", {"license_file": upload}
    ).content.decode()

    assert "update entitlement ended on" in html
    assert "Update entitlement ended" in html


def test_read_only_users_see_no_buttons_and_cannot_change_anything(readonly_client, firmware):
    firmware.offer(firmware.build())
    download = start_download()

    html = readonly_client.get(PAGE).content.decode()

    for testid in (
        "check-now",
        "download-2.8.1.0",
        "cancel",
        "license-upload",
        "automatic-downloads",
    ):
        assert f'data-testid="{testid}"' not in html
    for url in ("check/", "download/", "cancel/", "settings/", "license/"):
        response = readonly_client.post(f"/updates/licensing/{url}", **_csrf(readonly_client))
        assert response.status_code == 403, url
    download.refresh_from_db()
    assert download.state == DownloadState.QUEUED


def test_the_views_refuse_read_only_users_even_past_the_middleware(rf, readonly_user, firmware):
    from upgrades import views

    firmware.offer(firmware.build())
    request = rf.post("/updates/licensing/download/", {"version": "2.8.1.0"})
    request.user = readonly_user

    assert views.download(request).status_code == 403
    assert not Download.objects.exists()


def test_the_page_works_without_an_appliance(admin_client):
    html = admin_client.get(PAGE).content.decode()

    assert "Updates &amp; Licensing" in html
    assert "No license is installed" in html or "cannot be read" in html
