"""Install at a time (issue 18): the schedule service, the quietest hour, the pages, the API and
update-control. The beat and a real worker starting it are in test_schedule_beat.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from appliance.firmware import spool
from appliance.mail import msgstore
from events.models import Event
from home.notifications import current_notices
from tests.upgrades.conftest import update_control
from tests.upgrades.test_install_views import roomy_disks  # noqa: F401
from upgrades import schedule
from upgrades.models import (
    InstallRun,
    InstallTrigger,
    ScheduledInstall,
    ScheduleState,
)

pytestmark = pytest.mark.django_db

PAGE = "/updates/licensing/install/"
SET = "/updates/licensing/install/schedule/"
MOVE = "/updates/licensing/install/schedule/move/"
CANCEL = "/updates/licensing/install/schedule/cancel/"
API = "/api/v1/updates/install/schedule"


def _csrf(client) -> dict[str, str]:
    client.get(PAGE)
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def _post(client, url: str, data: dict | None = None):
    return client.post(url, data or {}, **_csrf(client))


@pytest.fixture
def now(clock) -> datetime:
    """The clock held at the real present (the license and bundle are dated from it)."""
    return clock.travel(clock.now().replace(second=0, microsecond=0))


# --- The service ----------------------------------------------------------------------------------


def test_it_schedules_the_downloaded_firmware_and_writes_an_event(ready, admin_user, now) -> None:
    at = now + timedelta(hours=3)
    made = schedule.schedule_set(at=at, user=admin_user)
    assert (made.version, made.at, made.state, made.requested_by) == (
        "2.8.1.0",
        at,
        ScheduleState.PENDING,
        "admin",
    )
    assert Event.objects.filter(message__startswith="Install of firmware 2.8.1.0 scheduled for")


def test_it_refuses_a_time_in_the_past(ready, admin_user, now) -> None:
    with pytest.raises(schedule.ScheduleRefused, match="in the past"):
        schedule.schedule_set(at=now - timedelta(minutes=1), user=admin_user)
    assert not ScheduledInstall.objects.exists()


def test_it_refuses_when_nothing_is_downloaded(demo_appliance: Path, admin_user, now) -> None:
    with pytest.raises(schedule.ScheduleRefused, match="No verified newer firmware"):
        schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)


def test_it_keeps_one_pending_schedule(ready, admin_user, now) -> None:
    schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)
    with pytest.raises(schedule.ScheduleRefused, match="already scheduled"):
        schedule.schedule_set(at=now + timedelta(hours=2), user=admin_user)
    assert ScheduledInstall.objects.count() == 1


def test_it_moves_and_cancels_the_pending_schedule(ready, admin_user, now) -> None:
    schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)
    moved = schedule.schedule_move(at=now + timedelta(hours=5), user=admin_user)
    assert moved.at == now + timedelta(hours=5) and moved.state == ScheduleState.PENDING
    with pytest.raises(schedule.ScheduleRefused, match="in the past"):
        schedule.schedule_move(at=now - timedelta(hours=1), user=admin_user)
    cancelled = schedule.schedule_cancel(user=admin_user)
    assert cancelled.state == ScheduleState.CANCELLED and cancelled.changed_by == "admin"
    with pytest.raises(schedule.ScheduleRefused, match="nothing to cancel"):
        schedule.schedule_cancel(user=admin_user)
    # Cancelled, it never starts.
    assert schedule.schedule_due(now=now + timedelta(days=1)) is None
    assert not InstallRun.objects.exists()


def test_nothing_starts_before_its_time(ready, admin_user, now, clock) -> None:
    schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)
    clock.shift(timedelta(minutes=59))
    assert schedule.schedule_due() is None
    assert not InstallRun.objects.exists()


def test_a_due_schedule_starts_the_install_once_however_many_beats_come(
    ready, admin_user, now, clock
) -> None:
    made = schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)
    clock.shift(timedelta(hours=1, seconds=5))
    started = schedule.schedule_due()
    assert started is not None and started.state == ScheduleState.STARTED
    run = InstallRun.objects.get()
    assert (started.run_id, run.trigger, run.requested_by) == (
        run.pk,
        InstallTrigger.SCHEDULE,
        "admin",
    )
    # A second beat (or the same task redelivered) finds nothing to claim.
    assert schedule.schedule_due() is None
    assert InstallRun.objects.count() == 1
    # A beat that read the row before the claim: its conditional update changes nothing.
    assert not ScheduledInstall.objects.filter(pk=made.pk, state=ScheduleState.PENDING).update(
        state=ScheduleState.STARTED
    )


def test_a_failing_preflight_at_that_moment_installs_nothing_and_says_why(
    ready, admin_user, now, clock
) -> None:
    schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)
    # The bundle is damaged in the spool after it was scheduled.
    path = spool.bundle_path(spool.bundle_id(ready.version, ready.sha256))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    clock.shift(timedelta(hours=1, minutes=1))

    done = schedule.schedule_due()

    assert done is not None and done.state == ScheduleState.REFUSED
    assert "does not verify" in done.reason
    assert not InstallRun.objects.exists()
    assert Event.objects.filter(message__contains="did not start, nothing was installed").exists()
    notices = [n for n in current_notices() if "did not start" in n.message]
    assert len(notices) == 1 and notices[0].level == "warning"


def test_install_now_supersedes_the_pending_schedule(ready, admin_user, now) -> None:
    from upgrades import install

    made = schedule.schedule_set(at=now + timedelta(hours=3), user=admin_user)
    run = install.install_start(user=admin_user, trigger=InstallTrigger.CONSOLE)
    made.refresh_from_db()
    assert made.state == ScheduleState.CANCELLED
    assert f"run {run.pk}" in made.reason and made.changed_by == "admin"
    assert schedule.schedule_pending() is None
    assert Event.objects.filter(message__contains="started now instead").exists()


def test_a_claim_whose_worker_died_is_settled_by_a_later_beat(ready, admin_user, now, clock):
    made = schedule.schedule_set(at=now + timedelta(minutes=5), user=admin_user)
    ScheduledInstall.objects.filter(pk=made.pk).update(
        state=ScheduleState.STARTED, changed_at=now + timedelta(minutes=5)
    )
    clock.shift(timedelta(minutes=30))
    schedule.schedule_due()
    made.refresh_from_db()
    assert made.state == ScheduleState.REFUSED and "worker stopped" in made.reason


def test_home_shows_the_schedule_in_place_of_ready_to_install(ready, admin_user, now) -> None:
    before = [n.message for n in current_notices()]
    assert any("ready to install" in m for m in before)
    schedule.schedule_set(at=now + timedelta(hours=2), user=admin_user)
    after = [n.message for n in current_notices()]
    assert not any("ready to install" in m for m in after)
    assert [m for m in after if "scheduled for" in m] == [
        f"Install of firmware 2.8.1.0 scheduled for {schedule.local_text(now + timedelta(hours=2))}"
        " by admin."
    ]


# --- The quietest hour ----------------------------------------------------------------------------


def _figures(root: Path, received_at: dict[int, int], *, days: int, end: datetime) -> None:
    """Made-up figures: for each of ``days`` days before ``end``, one minute in every hour with
    ``received_at[utc_hour]`` messages (50 when not given)."""
    conn = msgstore.connect(root)
    try:
        with conn:
            conn.execute("DELETE FROM processing_minute")
            rows = []
            last = int(end.timestamp()) // 3600 * 3600
            for start in range(last - days * 86400, last, 3600):
                hour = datetime.fromtimestamp(start, UTC).hour
                count = received_at.get(hour, 50)
                if count:
                    rows.append((start + 60, count, count, 0, 0, 0, 0, 1000 * count, 10 * count))
            conn.executemany(
                "INSERT INTO processing_minute (minute, received, delivered, quarantined, "
                "rejected, virus, spam, bytes, processing_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
    finally:
        conn.close()


def test_the_quietest_hour_is_the_one_with_least_mail_next_on_the_appliance_clock(
    demo_appliance: Path, clock, settings
) -> None:
    settings.TIME_ZONE = "Europe/Berlin"  # UTC+1 in March
    now = clock.travel(datetime(2026, 3, 10, 12, 30, tzinfo=UTC))
    _figures(demo_appliance, {3: 2, 4: 9, 13: 400}, days=7, end=now)

    quiet = schedule.quietest_hour()

    assert quiet is not None
    assert (quiet.hour, quiet.label, quiet.per_hour) == (4, "04:00-05:00", 2.0)
    assert quiet.at == datetime(2026, 3, 11, 3, 0, tzinfo=UTC)  # 04:00 in Berlin, tomorrow


def test_the_quietest_hour_counts_an_hour_without_mail_as_zero_and_prefers_the_soonest(
    demo_appliance: Path, clock
) -> None:
    now = clock.travel(datetime(2026, 3, 10, 12, 30, tzinfo=UTC))
    _figures(demo_appliance, {2: 0, 20: 0}, days=7, end=now)
    quiet = schedule.quietest_hour()
    assert quiet is not None and quiet.per_hour == 0
    assert (quiet.hour, quiet.at) == (20, datetime(2026, 3, 10, 20, 0, tzinfo=UTC))


def test_no_suggestion_without_figures(demo_appliance: Path, clock) -> None:
    now = clock.travel(datetime(2026, 3, 10, 12, 30, tzinfo=UTC))
    _figures(demo_appliance, dict.fromkeys(range(24), 0), days=7, end=now)
    assert schedule.quietest_hour() is None


# --- Pages ----------------------------------------------------------------------------------------


def test_the_install_page_offers_install_at_with_the_suggestion(ready, admin_client) -> None:
    page = admin_client.get(PAGE).content.decode()
    assert 'data-testid="install"' in page  # Install now, as before
    assert 'type="datetime-local"' in page and 'data-testid="schedule-set"' in page
    assert 'data-testid="schedule-suggestion"' in page and "schedule-use-quiet" in page


def test_an_administrator_schedules_moves_and_cancels_from_the_page(
    ready, admin_client, now
) -> None:
    at = timezone.localtime(now + timedelta(hours=2))
    response = _post(admin_client, SET, {"at": at.strftime("%Y-%m-%dT%H:%M")})
    assert response.status_code == 302
    pending = ScheduledInstall.objects.get(state=ScheduleState.PENDING)
    assert pending.at == at
    page = admin_client.get(PAGE).content.decode()
    assert 'data-testid="schedule-pending"' in page and 'data-testid="schedule-banner"' in page
    home = admin_client.get("/home/").content.decode()
    assert "scheduled for" in home

    later = at + timedelta(hours=1)
    _post(admin_client, MOVE, {"at": later.strftime("%Y-%m-%d %H:%M")})
    pending.refresh_from_db()
    assert pending.at == later

    _post(admin_client, CANCEL)
    pending.refresh_from_db()
    assert pending.state == ScheduleState.CANCELLED
    assert 'data-testid="schedule-banner"' not in admin_client.get(PAGE).content.decode()


def test_the_page_refuses_a_time_in_the_past_with_the_reason(ready, admin_client, now) -> None:
    past = timezone.localtime(now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    response = admin_client.post(SET, {"at": past}, follow=True, **_csrf(admin_client))
    assert "is in the past" in response.content.decode()
    assert not ScheduledInstall.objects.exists()


def test_a_read_only_user_sees_the_schedule_but_cannot_change_it(
    ready, admin_user, readonly_client, now
) -> None:
    schedule.schedule_set(at=now + timedelta(hours=2), user=admin_user)
    page = readonly_client.get(PAGE).content.decode()
    assert 'data-testid="schedule-pending"' in page
    assert 'data-testid="schedule-cancel"' not in page
    for url in (SET, MOVE, CANCEL):
        assert _post(readonly_client, url, {"at": "2099-01-01T00:00"}).status_code == 403
    assert ScheduledInstall.objects.get().state == ScheduleState.PENDING


def test_changes_need_a_login_and_a_csrf_token(ready, admin_client, client, now) -> None:
    at = (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M")
    assert client.post(SET, {"at": at}).status_code == 302  # to the login page
    assert admin_client.post(SET, {"at": at}).status_code == 403  # no CSRF token
    assert not ScheduledInstall.objects.exists()


# --- update-control and the API -------------------------------------------------------------------


@pytest.mark.usefixtures("cli_in_this_process")
def test_update_control_schedules_shows_and_cancels(ready, capsys, now) -> None:
    at = timezone.localtime(now + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M")
    code, out, _ = update_control(capsys, "-i", "fw", "--at", at)
    assert code == 0 and "scheduled for" in out
    code, out, _ = update_control(capsys, "-s")
    assert code == 0 and "Scheduled install:" in out and at in out
    code, out, _ = update_control(capsys, "-s", "--json")
    assert json.loads(out)["schedule"]["version"] == "2.8.1.0"
    code, out, _ = update_control(capsys, "--cancel-schedule")
    assert code == 0 and "cancelled" in out
    code, _, err = update_control(capsys, "--cancel-schedule")
    assert code == 1 and "nothing to cancel" in err
    code, _, err = update_control(capsys, "--at", at, "-s")
    assert code == 2 and "--at goes with -i fw" in err


@pytest.mark.usefixtures("cli_in_this_process")
def test_update_control_refuses_a_time_in_the_past(ready, capsys, now) -> None:
    at = timezone.localtime(now - timedelta(hours=3)).strftime("%Y-%m-%d %H:%M")
    code, _, err = update_control(capsys, "-i", "fw", "--at", at)
    assert code == 1 and "in the past" in err


def test_the_api_sets_reads_moves_and_cancels_the_schedule(
    ready, client, admin_token, viewer_token, now
) -> None:
    at = (now + timedelta(hours=2)).isoformat()
    assert client.get(API, **admin_token).status_code == 404
    assert client.post(API, {"at": at}, "application/json", **viewer_token).status_code == 403
    made = client.post(API, {"at": at}, "application/json", **admin_token)
    assert made.status_code == 201 and made.json()["state"] == "pending"
    later = (now + timedelta(hours=4)).isoformat()
    moved = client.post(API, {"at": later}, "application/json", **admin_token)
    assert moved.status_code == 200
    assert datetime.fromisoformat(moved.json()["at"]) == now + timedelta(hours=4)
    assert client.get(API, **viewer_token).json()["id"] == made.json()["id"]
    assert client.post(f"{API}/cancel", **viewer_token).status_code == 403
    assert client.post(f"{API}/cancel", **admin_token).json()["state"] == "cancelled"
    assert client.post(f"{API}/cancel", **admin_token).status_code == 409
