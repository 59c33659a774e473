"""Install: the preflight checklist, the progress page and its partial, the banner, the
read-only configuration during maintenance, the DHCP pin, and /api/v1/updates/install."""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from django.utils import timezone
from django.utils.html import escape

from appliance.system import network
from events.models import Event
from tests.upgrades.conftest import install_run_row
from upgrades import install
from upgrades.models import (
    PHASE_NAMES,
    Download,
    InstallPhase,
    InstallRun,
    InstallState,
    PhaseState,
    UpdateSettings,
)

pytestmark = pytest.mark.django_db

CHECKLIST = "/updates/licensing/install/"
START = "/updates/licensing/install/start/"
API = "/api/v1/updates/install"


def _csrf(client) -> dict[str, str]:
    client.get("/updates/licensing/")
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def _post(client, url: str, data: dict | None = None, **kw):
    return client.post(url, data or {}, **_csrf(client), **kw)


@pytest.fixture(autouse=True)
def roomy_disks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 50% rule against this machine's real free bytes, on disks made to look 60% free.

    The test machine's disk may well be more than half full, and a real disk cannot be emptied
    on demand; psutil is the one substitute allowed (appliance.firmware.preflight's docstring).
    The free bytes stay the real ones, so "space for the upgrade" is still measured honestly.
    """
    real = psutil.disk_usage

    def usage(path: str) -> Any:
        measured = real(path)
        total = min(measured.total, int(measured.free / 0.6))
        return SimpleNamespace(
            total=total, used=total - measured.free, free=measured.free, percent=40.0
        )

    monkeypatch.setattr(psutil, "disk_usage", usage)


def make_run(
    state: str = InstallState.RUNNING,
    phase: int = 4,
    *,
    download: Download | None = None,
    error: str = "",
) -> InstallRun:
    """A run as the engine leaves it in ``state`` at ``phase`` (rows only: for rendering)."""
    now = timezone.now()
    final = state not in (InstallState.QUEUED, InstallState.RUNNING, InstallState.ROLLING_BACK)
    run = install_run_row(
        state,
        phase,
        download=download,
        requested_by="admin",
        trigger="console",
        started_at=now - timedelta(seconds=60),
        finished_at=now if final else None,
        error=error,
    )
    for number, name in PHASE_NAMES.items():
        if number < phase or (state == InstallState.SUCCEEDED and number == phase):
            phase_state, done, total = PhaseState.SUCCEEDED, 10, 10
        elif number == phase and not final:
            phase_state, done, total = PhaseState.RUNNING, 3, 10
        else:
            phase_state, done, total = PhaseState.PENDING, 0, 0
        InstallPhase.objects.create(
            run=run,
            number=number,
            name=name,
            state=phase_state,
            done=done,
            total=total,
            started_at=now - timedelta(seconds=10) if phase_state != PhaseState.PENDING else None,
            finished_at=now if phase_state == PhaseState.SUCCEEDED else None,
        )
    return run


# --- The checklist ---------------------------------------------------------------------------


def test_the_checklist_shows_every_check_with_its_value_and_advice(admin_client, ready):
    checks = install.install_preflight(user="admin")

    html = admin_client.get(CHECKLIST).content.decode()

    assert checks, "the preflight returned no checks"
    for check in checks:
        assert f'data-testid="check-{check.key}"' in html
        assert f'data-status="{check.status}"' in html
        assert escape(check.title) in html
    assert {"firmware", "disk-msgstore", "dhcp", "rescue", "downtime"} <= {c.key for c in checks}
    # eth0 of the demo appliance is on DHCP: one click pins it.
    assert 'data-testid="pin-eth0"' in html
    assert 'data-testid="backup-download"' in html
    assert "Warning" in html and "Pass" in html


def test_install_is_enabled_when_no_check_fails(admin_client, ready):
    checks = install.install_preflight(user="admin")
    assert not [c for c in checks if c.status == "fail"], checks

    html = admin_client.get(CHECKLIST).content.decode()

    button = html.split('data-testid="install"')[1].split(">")[0]
    assert "disabled" not in button


def test_a_failed_check_disables_install_and_the_post_is_refused_with_the_reason(
    admin_client, demo_appliance
):
    # Nothing has been downloaded: the bundle check fails.
    failed = [c for c in install.install_preflight(user="admin") if c.status == "fail"]
    assert failed

    html = admin_client.get(CHECKLIST).content.decode()
    button = html.split('data-testid="install"')[1].split(">")[0]
    assert "disabled" in button
    assert 'data-testid="install-blocked"' in html

    response = _post(admin_client, START, follow=True)

    page = response.content.decode()
    assert "The install did not start" in page
    assert escape(failed[0].title) in page
    assert not InstallRun.objects.exists()


def test_read_only_users_see_the_checklist_with_no_button_and_a_note(readonly_client, ready):
    html = readonly_client.get(CHECKLIST).content.decode()

    assert 'data-testid="checklist"' in html and "eth0: 192.0.2.25/24" in html
    for testid in ("install", "pin-eth0", "backup-download"):
        assert f'data-testid="{testid}"' not in html, testid
    assert "an administrator starts the install" in html


@pytest.mark.parametrize(
    "url",
    [
        START,
        "/updates/licensing/install/1/abort/",
        "/updates/licensing/install/pin/",
        "/updates/licensing/install/unpin/",
        "/updates/licensing/install/backup/",
    ],
)
def test_read_only_users_cannot_change_anything(readonly_client, ready, url):
    response = _post(readonly_client, url, {"interface": "eth0"})

    assert response.status_code == 403
    assert not InstallRun.objects.exists()
    assert network.read_interface("eth0").mode == "dhcp"


def test_install_starts_the_run_and_shows_its_progress(admin_client, ready):
    response = _post(admin_client, START, follow=True)

    run = InstallRun.objects.get()
    assert response.redirect_chain[-1][0] == f"/updates/licensing/install/{run.pk}/"
    assert run.trigger == "console" and run.requested_by == "admin"
    html = response.content.decode()
    assert 'data-testid="install-phases"' in html
    for number in range(1, 11):
        assert f'data-testid="phase-{number}"' in html


def test_a_second_install_is_refused_while_one_is_active(admin_client, ready):
    active = make_run(InstallState.RUNNING, 2, download=ready)

    response = _post(admin_client, START, follow=True)

    assert response.redirect_chain[-1][0] == f"/updates/licensing/install/{active.pk}/"
    assert InstallRun.objects.count() == 1


# --- The progress page and its partial ---------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "phase", "expected"),
    [
        (InstallState.QUEUED, 1, "waiting for the worker"),
        (InstallState.RUNNING, 2, "Abort"),
        (InstallState.RUNNING, 7, "7 of 10"),
        (InstallState.ROLLING_BACK, 7, "Rolling back to the previous firmware"),
        (InstallState.SUCCEEDED, 10, "Upgrade complete: firmware 2.8.1.0"),
        (InstallState.ROLLED_BACK, 9, "failed and was rolled back"),
        (InstallState.FAILED, 9, "needs attention"),
        (InstallState.ABORTED, 2, "was aborted"),
    ],
)
def test_the_progress_page_and_partial_render_every_state(
    admin_client, demo_appliance, state, phase, expected
):
    run = make_run(state, phase, error="the health check failed: no SMTP listener")

    page = admin_client.get(f"/updates/licensing/install/{run.pk}/")
    partial = admin_client.get(f"/updates/licensing/install/{run.pk}/progress/")

    assert page.status_code == partial.status_code == 200
    for html in (page.content.decode(), partial.content.decode()):
        assert expected in html
        assert f'data-state="{state}"' in html
        assert "admin (Console)" in html
        assert html.count('data-testid="phase-state"') == 10
    if state in (InstallState.ROLLED_BACK, InstallState.FAILED):
        assert "no SMTP listener" in partial.content.decode()


def test_the_partial_is_polled_only_while_the_run_is_active(admin_client, demo_appliance):
    run = make_run(InstallState.RUNNING, 5)
    polled = admin_client.get(f"/updates/licensing/install/{run.pk}/progress/").content.decode()
    assert 'hx-trigger="every 1s"' in polled
    assert 'data-testid="install-eta"' in polled

    InstallRun.objects.filter(pk=run.pk).update(
        state=InstallState.SUCCEEDED, phase=10, finished_at=timezone.now()
    )
    done = admin_client.get(f"/updates/licensing/install/{run.pk}/progress/").content.decode()

    assert "hx-trigger" not in done and "hx-get" not in done
    assert "Upgrade complete: firmware 2.8.1.0" in done
    assert "/system/events/?category=update" in done


def test_abort_is_offered_in_phases_1_and_2_only(admin_client, demo_appliance):
    early = make_run(InstallState.RUNNING, 2)
    page = admin_client.get(f"/updates/licensing/install/{early.pk}/").content.decode()
    assert 'data-testid="install-abort"' in page

    InstallRun.objects.filter(pk=early.pk).update(phase=3)
    page = admin_client.get(f"/updates/licensing/install/{early.pk}/").content.decode()
    assert 'data-testid="install-abort"' not in page


def test_abort_asks_first_then_requests_the_stop(admin_client, readonly_client, demo_appliance):
    run = make_run(InstallState.RUNNING, 2)
    url = f"/updates/licensing/install/{run.pk}/abort/"
    assert readonly_client.get(url).status_code == 200
    assert "an administrator aborts an install" in readonly_client.get(url).content.decode()

    page = admin_client.get(url).content.decode()

    assert "keeps running firmware 2.8.0.0, untouched" in page
    assert 'data-testid="install-abort-confirm"' in page
    run.refresh_from_db()
    assert not run.abort_requested  # looking aborts nothing
    _post(admin_client, url)
    run.refresh_from_db()
    assert run.abort_requested
    progress = admin_client.get(f"/updates/licensing/install/{run.pk}/").content.decode()
    assert 'data-testid="install-aborting"' in progress


def test_abort_after_phase_2_is_refused_with_a_clear_message(admin_client, demo_appliance):
    run = make_run(InstallState.RUNNING, 6)

    response = _post(admin_client, f"/updates/licensing/install/{run.pk}/abort/", follow=True)

    assert response.status_code == 200
    assert "flash-error" in response.content.decode()
    run.refresh_from_db()
    assert run.state == InstallState.RUNNING and not run.abort_requested


def test_an_unknown_run_is_404(admin_client, demo_appliance):
    assert admin_client.get("/updates/licensing/install/999/").status_code == 404
    assert admin_client.get("/updates/licensing/install/999/progress/").status_code == 404


# --- Every page shows the install; configuration is read-only in maintenance ------------------


def test_every_page_shows_the_active_install_with_a_link(
    admin_client, readonly_client, demo_appliance
):
    assert 'data-testid="install-banner"' not in admin_client.get("/home/").content.decode()
    run = make_run(InstallState.RUNNING, 4)

    for client in (admin_client, readonly_client):
        for url in ("/home/", "/system/events/", "/updates/licensing/"):
            html = client.get(url).content.decode()
            assert 'data-testid="install-banner"' in html, url
            assert f"/updates/licensing/install/{run.pk}/" in html
            # It follows the install rather than keep the phase the page was loaded in.
            assert f'hx-get="/updates/licensing/install/{run.pk}/banner/"' in html, url
    assert "configuration is read-only" in html


def test_a_page_loaded_before_an_install_learns_of_it_from_its_watching_slot(
    admin_client, readonly_client, client, demo_appliance
):
    watch = "/updates/licensing/install/banner/?after=0"  # no run yet when the page was made
    html = admin_client.get("/system/events/").content.decode()
    slot = html[html.index('id="install-banner-slot"') :]
    assert f'hx-get="{watch}" hx-trigger="every 10s"' in slot[: slot.index(">")]
    html = admin_client.get(watch).content.decode()
    assert 'data-testid="install-banner"' not in html and f'hx-get="{watch}"' in html
    assert admin_client.get(watch.replace("0", "x")).status_code == 200  # a bad value: 0

    run = make_run(InstallState.RUNNING, 4)  # started elsewhere: the CLI, a schedule
    for reader in (admin_client, readonly_client):
        html = reader.get(watch).content.decode()
        assert "Firmware 2.8.1.0 is being installed: phase 4 of 10." in html
        assert "configuration is read-only" in html
        # From now on it follows that run every 2 s, as on a page loaded during it.
        assert f'hx-get="/updates/licensing/install/{run.pk}/banner/"' in html
        assert 'hx-trigger="every 2s"' in html
    assert client.get(watch).status_code == 302  # a login first, as everywhere
    # The progress page shows the run itself: no banner, and no slot that would bring one.
    html = admin_client.get(f"/updates/licensing/install/{run.pk}/").content.decode()
    slot = html[html.index('id="install-banner-slot"') :]
    assert "hx-get" not in slot[: slot.index(">")]

    # An install that began and ended between two looks (a demo install takes 5 s) is said to
    # have ended, once; a page made after it watches for newer runs only.
    InstallRun.objects.filter(pk=run.pk).update(
        state=InstallState.SUCCEEDED, phase=10, finished_at=timezone.now()
    )
    html = admin_client.get(watch).content.decode()
    assert "The install of firmware 2.8.1.0 has ended: succeeded." in html
    assert "hx-get" not in html and "Reload this page" in html
    html = admin_client.get("/system/events/").content.decode()
    assert f'hx-get="/updates/licensing/install/banner/?after={run.pk}"' in html
    html = admin_client.get(f"/updates/licensing/install/banner/?after={run.pk}").content.decode()
    assert "has ended" not in html and 'hx-trigger="every 10s"' in html


def test_the_banner_follows_the_install_and_says_once_that_it_ended(
    admin_client, client, demo_appliance
):
    run = make_run(InstallState.RUNNING, 4)
    url = f"/updates/licensing/install/{run.pk}/banner/"
    assert "phase 4 of 10" in admin_client.get(url).content.decode()

    InstallRun.objects.filter(pk=run.pk).update(phase=6)
    html = admin_client.get(url).content.decode()
    assert "Firmware 2.8.1.0 is being installed: phase 6 of 10." in html
    assert 'hx-trigger="every 2s"' in html
    InstallRun.objects.filter(pk=run.pk).update(state=InstallState.ROLLING_BACK)
    assert "installed: rolling back, phase 6 of 10." in admin_client.get(url).content.decode()

    InstallRun.objects.filter(pk=run.pk).update(
        state=InstallState.SUCCEEDED, phase=10, finished_at=timezone.now()
    )
    html = admin_client.get(url).content.decode()
    assert 'data-testid="install-banner-ended"' in html and "has ended: succeeded" in html
    assert "hx-get" not in html and "Reload this page" in html
    assert client.get(url).status_code == 302  # a login first, as everywhere


def test_the_story_line_follows_the_install_until_it_ends(admin_client, client, demo_appliance):
    run = make_run(InstallState.RUNNING, 4)
    html = admin_client.get("/updates/licensing/install/").content.decode()
    story = html[html.index('id="update-story"') :]
    assert 'hx-get="/updates/licensing/story/"' in story[: story.index(">")]

    InstallRun.objects.filter(pk=run.pk).update(phase=7)
    assert "phase 7 of 10" in admin_client.get("/updates/licensing/story/").content.decode()

    InstallRun.objects.filter(pk=run.pk).update(
        state=InstallState.SUCCEEDED, phase=10, finished_at=timezone.now()
    )
    html = admin_client.get("/updates/licensing/story/").content.decode()
    assert "hx-get" not in html and 'data-stage="installing"' not in html
    assert client.get("/updates/licensing/story/").status_code == 302  # a login first


def test_configuration_changes_are_refused_while_the_install_holds_maintenance(
    admin_client, demo_appliance
):
    run = make_run(InstallState.RUNNING, 5)

    response = _post(
        admin_client,
        "/updates/licensing/settings/",
        {"automatic_downloads": "on"},
        HTTP_REFERER="http://testserver/updates/licensing/",
        follow=True,
    )

    assert "read-only while firmware 2.8.1.0 is being installed" in response.content.decode()
    assert response.redirect_chain[-1][0] == "/updates/licensing/"
    assert not UpdateSettings.objects.filter(automatic_downloads=True).exists()
    api = admin_client.post(
        "/api/v1/updates/check", content_type="application/json", **_csrf(admin_client)
    )
    assert api.status_code == 409
    assert "read-only" in api.json()["detail"]
    # The install's own page stays usable, and so does logging out.
    abort = _post(admin_client, f"/updates/licensing/install/{run.pk}/abort/")
    assert abort.status_code == 302
    assert _post(admin_client, "/accounts/logout/").status_code == 302


@pytest.mark.parametrize("phase", [1, 2, 10])
def test_configuration_stays_writable_outside_phases_3_to_9(admin_client, demo_appliance, phase):
    make_run(InstallState.RUNNING, phase)

    response = _post(admin_client, "/updates/licensing/settings/", {"automatic_downloads": "on"})

    assert response.status_code == 302
    assert UpdateSettings.objects.get().automatic_downloads is True


# --- The checklist's fixes: DHCP pin, configuration backup -----------------------------------


def test_pinning_a_dhcp_interface_makes_its_lease_static_and_writes_an_event(
    admin_client, demo_appliance
):
    response = _post(admin_client, "/updates/licensing/install/pin/", {"interface": "eth0"})

    assert response.status_code == 302
    eth0 = network.read_interface("eth0")
    assert (eth0.mode, eth0.cidr, eth0.pinned_from_dhcp) == ("static", "192.0.2.25/24", True)
    assert Event.objects.filter(message__contains="eth0 pinned to its DHCP address").exists()

    # After the upgrade the reminder links to a one-click return to DHCP.
    done = make_run(InstallState.SUCCEEDED, 10)
    page = admin_client.get(f"/updates/licensing/install/{done.pk}/").content.decode()
    assert 'data-testid="unpin-reminder"' in page
    html = admin_client.get(CHECKLIST).content.decode()
    assert 'data-testid="unpin-eth0"' in html
    _post(admin_client, "/updates/licensing/install/unpin/", {"interface": "eth0"})
    assert network.read_interface("eth0").mode == "dhcp"
    assert Event.objects.filter(message__contains="eth0 returned to DHCP").exists()


def test_pinning_asks_first_and_looking_changes_nothing(admin_client, readonly_client, ready):
    checklist = admin_client.get(CHECKLIST).content.decode()
    form = checklist.split('data-testid="pin-eth0"')[0].rsplit("<form", 1)[1]
    assert 'method="get"' in form and 'value="eth0"' in form

    page = admin_client.get("/updates/licensing/install/pin/?interface=eth0").content.decode()

    assert "keeps 192.0.2.25/24 as a static address" in page
    assert 'data-testid="pin-confirm"' in page and 'name="interface" value="eth0"' in page
    assert network.read_interface("eth0").mode == "dhcp"
    other = admin_client.get("/updates/licensing/install/pin/?interface=eth1").content.decode()
    assert 'data-testid="confirm-refusal"' in other and 'data-testid="pin-confirm"' not in other
    read_only = readonly_client.get("/updates/licensing/install/pin/?interface=eth0")
    assert 'data-testid="pin-confirm"' not in read_only.content.decode()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("eth1", "is not on DHCP"),
        ("../../etc/passwd", "There is no interface named"),
        ("", "There is no interface named"),
    ],
)
def test_pinning_refuses_what_is_not_a_dhcp_interface_and_changes_nothing(
    admin_client, demo_appliance, name, message
):
    before = {i.name: i for i in network.list_interfaces()}

    response = _post(
        admin_client, "/updates/licensing/install/pin/", {"interface": name}, follow=True
    )

    assert message in response.content.decode()
    assert {i.name: i for i in network.list_interfaces()} == before


def test_unpin_refuses_an_interface_made_static_by_hand(admin_client, demo_appliance):
    response = _post(
        admin_client, "/updates/licensing/install/unpin/", {"interface": "eth1"}, follow=True
    )

    assert "made static by hand" in response.content.decode()
    assert network.read_interface("eth1").mode == "static"


def test_download_configuration_backup_creates_one_and_downloads_it(admin_client, demo_appliance):
    response = _post(admin_client, "/updates/licensing/install/backup/")

    assert response.status_code == 302
    download = admin_client.get(response["Location"])
    assert download.status_code == 200
    assert "attachment" in download["Content-Disposition"]


# --- /api/v1/updates/install ---------------------------------------------------------------


def test_api_preflight_lists_the_checks(admin_client, ready):
    body = admin_client.get(f"{API}/preflight").json()

    assert body["ok"] is True
    assert {"firmware", "dhcp", "rescue"} <= {check["key"] for check in body["checks"]}
    assert all(set(check) >= {"status", "value", "advice"} for check in body["checks"])


def test_api_start_is_refused_with_409_when_a_check_fails(admin_client, demo_appliance):
    response = admin_client.post(API, content_type="application/json", **_csrf(admin_client))

    assert response.status_code == 409
    assert response.json()["detail"]
    assert not InstallRun.objects.exists()


def test_api_start_follow_and_abort(admin_client, ready):
    started = admin_client.post(API, content_type="application/json", **_csrf(admin_client))

    assert started.status_code == 202, started.content
    run = started.json()
    assert run["trigger"] == "api" and run["state"] == "queued"
    assert [phase["number"] for phase in run["phases"]] == list(range(1, 11))
    followed = admin_client.get(f"{API}/{run['id']}").json()
    assert followed["id"] == run["id"]

    aborted = admin_client.post(f"{API}/{run['id']}/abort", **_csrf(admin_client))
    assert aborted.status_code == 200, aborted.content


def test_api_refuses_changes_from_read_only_users(readonly_client, ready):
    run = make_run(InstallState.RUNNING, 1, download=ready)
    csrf = _csrf(readonly_client)

    assert readonly_client.get(f"{API}/preflight").status_code == 200
    assert readonly_client.get(f"{API}/{run.pk}").status_code == 200
    assert readonly_client.post(API, content_type="application/json", **csrf).status_code == 403
    assert readonly_client.post(f"{API}/{run.pk}/abort", **csrf).status_code == 403
    run.refresh_from_db()
    assert not run.abort_requested


def test_api_abort_after_phase_2_is_409_and_unknown_runs_404(admin_client, demo_appliance):
    run = make_run(InstallState.RUNNING, 6)
    csrf = _csrf(admin_client)

    assert admin_client.post(f"{API}/{run.pk}/abort", **csrf).status_code == 409
    assert admin_client.get(f"{API}/999").status_code == 404
    assert admin_client.post(f"{API}/999/abort", **csrf).status_code == 404
    body = json.loads(admin_client.get(f"{API}/{run.pk}").content)
    assert body["phase"] == 6 and body["can_abort"] is False


def test_pages_offer_no_change_while_the_install_holds_maintenance(admin_client, demo_appliance):
    """The page agrees with the middleware: no editable retention, no Save, while read-only."""
    stores = "/mail-security/policy-objects/message-stores/"
    assert 'class="retention-input' in admin_client.get(stores).content.decode()
    make_run(InstallState.RUNNING, 5)

    html = admin_client.get(stores).content.decode()

    assert 'data-testid="install-banner"' in html and "configuration is read-only" in html
    assert 'class="retention-input' not in html and "Save retention" not in html
