"""Upgrade the cluster at a time (issue 18): on Cluster Central with a joined member, a schedule
can be a rolling upgrade of Central and its members. Beat's schedule_due (called here as beat
calls it; a real beat is proven for the local schedule in tests/upgrades/test_schedule_beat.py)
starts the ClusterUpgrade once; its own checks at that moment (members reachable, Central's
preflight) refuse it with the reason, nothing installed anywhere. The Cluster page offers it only
on Central with members, to administrators, with CSRF."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from appliance.firmware import spool
from cluster import plumbing, rolling
from cluster.models import ClusterMember, ClusterUpgrade, NodeStep, ScheduledRollingUpgrade
from cluster.schedule import ROLLING_UPGRADE
from events.models import Event
from home.notifications import current_notices
from tests.support.feed_server import feed_server  # noqa: F401
from tests.upgrades.conftest import firmware, licensed, run_download, vendor  # noqa: F401
from tests.upgrades.test_install_views import roomy_disks  # noqa: F401 - autouse here too
from upgrades import schedule
from upgrades.models import Download, InstallRun, ScheduledInstall, ScheduleState

pytestmark = pytest.mark.django_db

NEW = "2.8.1.0"
PAGE = "/cluster/"
SET = "/updates/licensing/install/schedule/"
MOVE = "/updates/licensing/install/schedule/move/"
CANCEL = "/updates/licensing/install/schedule/cancel/"


@pytest.fixture
def now(clock) -> datetime:
    """The clock held at the real present (the license and bundle are dated from it)."""
    return clock.travel(clock.now().replace(second=0, microsecond=0))


@pytest.fixture
def ready(central: str, firmware) -> Download:  # noqa: F811
    """Cluster Central on 2.8.0.0 with firmware 2.8.1.0 downloaded and verified."""
    firmware.offer(firmware.build())
    download = run_download()
    assert download.state == "ready", download.error
    return download


@pytest.fixture
def cluster(ready: Download, joined) -> Download:
    """... and member1 joined, on 2.8.0.0."""
    joined("member1")
    return ready


def scheduled(user, at: datetime) -> ScheduledInstall:
    return schedule.schedule_set(at=at, user=user, kind=ROLLING_UPGRADE)


def node_install_requests(captured) -> list[str]:
    return [
        c.queue
        for c in captured
        if isinstance(c, plumbing.Outgoing) and c.task == "cluster.tasks.node_install_start"
    ]


# --- The service and beat -------------------------------------------------------------------------


def test_a_due_rolling_upgrade_starts_the_cluster_upgrade_once_for_two_beats(
    cluster, admin_user, now, clock
) -> None:
    made = scheduled(admin_user, now + timedelta(hours=1))
    assert (made.version, made.state) == (NEW, ScheduleState.PENDING)
    assert schedule.kind_of(made).name == ROLLING_UPGRADE
    assert Event.objects.filter(
        message__startswith=f"Rolling upgrade of the cluster to {NEW} scheduled for"
    ).exists()
    clock.shift(timedelta(minutes=59))
    assert schedule.schedule_due() is None and not ClusterUpgrade.objects.exists()

    clock.shift(timedelta(minutes=1, seconds=5))
    started = schedule.schedule_due()
    again = schedule.schedule_due()  # a second beat, or the same task redelivered

    assert started is not None and started.state == ScheduleState.STARTED
    assert again is None
    upgrade = ClusterUpgrade.objects.get()
    assert ScheduledRollingUpgrade.objects.get(schedule=made).upgrade == upgrade
    assert (upgrade.order, upgrade.version, upgrade.started_by) == (
        ["central", "member1"],
        NEW,
        "admin",
    )
    # Central first: its own install runs (preflight passed), member1 waits its turn.
    run = InstallRun.objects.get()
    assert upgrade.results["central"] == {
        **upgrade.results["central"],
        "state": NodeStep.INSTALLING,
        "run_id": run.pk,
    }
    assert upgrade.results["member1"]["state"] == NodeStep.PENDING
    assert Event.objects.filter(
        message__startswith=f"Scheduled rolling upgrade of the cluster to {NEW} at",
        message__endswith="started",
    ).exists()
    # Linked to its cluster upgrade, a later beat never takes it for a dead worker's claim.
    clock.shift(timedelta(minutes=30))
    assert schedule.schedule_due() is None
    made.refresh_from_db()
    assert made.state == ScheduleState.STARTED
    assert ClusterUpgrade.objects.count() == 1 and InstallRun.objects.count() == 1


def test_an_unreachable_member_at_that_moment_installs_nothing_and_says_why(
    cluster, admin_user, now, clock
) -> None:
    scheduled(admin_user, now + timedelta(hours=1))
    ClusterMember.objects.filter(node="member1").update(reachable=False)
    clock.shift(timedelta(hours=1, minutes=1))

    done = schedule.schedule_due()

    assert done is not None and done.state == ScheduleState.REFUSED
    assert "member1 is unreachable" in done.reason
    assert not ClusterUpgrade.objects.exists() and not InstallRun.objects.exists()
    assert Event.objects.filter(
        message__startswith=f"Scheduled rolling upgrade of the cluster to {NEW}",
        message__contains="did not start, nothing was installed: member1 is unreachable",
    ).exists()
    (notice,) = [n for n in current_notices() if "did not start" in n.message]
    assert notice.level == "warning"
    assert notice.message.startswith(f"The rolling upgrade of the cluster to {NEW} scheduled for")
    assert notice.link_url == "/cluster/#schedule"


def test_centrals_failing_preflight_at_that_moment_installs_nothing_anywhere(
    cluster, admin_user, now, clock, django_capture_on_commit_callbacks
) -> None:
    made = scheduled(admin_user, now + timedelta(hours=1))
    # The bundle is damaged in Central's spool after it was scheduled.
    path = spool.bundle_path(spool.bundle_id(cluster.version, cluster.sha256))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    clock.shift(timedelta(hours=1, minutes=1))

    with django_capture_on_commit_callbacks(execute=False) as captured:
        done = schedule.schedule_due()

    assert done is not None and done.state == ScheduleState.REFUSED
    assert done.reason.startswith("central: ") and "does not verify" in done.reason
    assert not InstallRun.objects.exists()
    assert node_install_requests(captured) == []  # no member was asked
    # The cluster upgrade it tried is linked, stopped at Central before any member.
    upgrade = ScheduledRollingUpgrade.objects.get(schedule=made).upgrade
    assert upgrade is not None and upgrade.stopped_node == "central"
    assert upgrade.results["member1"]["state"] == NodeStep.PENDING
    assert Event.objects.filter(message__contains="did not start, nothing was installed").exists()
    assert [n for n in current_notices() if "did not start" in n.message]


def test_a_claim_whose_worker_died_links_the_upgrade_it_started_or_is_refused(
    cluster, admin_user, now, clock
) -> None:
    first = scheduled(admin_user, now + timedelta(minutes=5))
    claimed_at = now + timedelta(minutes=5)
    ScheduledInstall.objects.filter(pk=first.pk).update(
        state=ScheduleState.STARTED, changed_at=claimed_at
    )
    clock.shift(timedelta(minutes=30))
    schedule.schedule_due()
    first.refresh_from_db()
    assert first.state == ScheduleState.REFUSED
    assert "worker stopped while starting the rolling upgrade" in first.reason

    # This time the worker died after starting the cluster upgrade, before linking it.
    second = scheduled(admin_user, timezone.now() + timedelta(minutes=5))
    clock.shift(timedelta(minutes=5))
    ScheduledInstall.objects.filter(pk=second.pk).update(
        state=ScheduleState.STARTED, changed_at=timezone.now()
    )
    upgrade = rolling.cluster_upgrade_start(user="admin", scheduled=True)
    clock.shift(timedelta(minutes=30))
    schedule.schedule_due()
    second.refresh_from_db()
    assert second.state == ScheduleState.STARTED
    assert ScheduledRollingUpgrade.objects.get(schedule=second).upgrade == upgrade


def test_it_refuses_to_schedule_a_rolling_upgrade_without_members(ready, admin_user, now) -> None:
    with pytest.raises(schedule.ScheduleRefused, match="No member has joined"):
        scheduled(admin_user, now + timedelta(hours=1))
    assert not ScheduledInstall.objects.exists()


def test_one_schedule_is_pending_whatever_it_starts(cluster, admin_user, now) -> None:
    schedule.schedule_set(at=now + timedelta(hours=1), user=admin_user)  # Central alone
    with pytest.raises(schedule.ScheduleRefused, match="already scheduled"):
        scheduled(admin_user, now + timedelta(hours=2))
    assert ScheduledInstall.objects.count() == 1 and not ScheduledRollingUpgrade.objects.exists()


def test_upgrading_the_cluster_now_replaces_the_scheduled_rolling_upgrade(
    cluster, admin_user, now
) -> None:
    made = scheduled(admin_user, now + timedelta(hours=3))
    upgrade = rolling.cluster_upgrade_start(user=admin_user)
    made.refresh_from_db()
    assert made.state == ScheduleState.CANCELLED
    assert f"(upgrade {upgrade.pk})" in made.reason and made.changed_by == "admin"
    assert Event.objects.filter(
        message__startswith=f"Scheduled rolling upgrade of the cluster to {NEW} cancelled"
    ).exists()


# --- The Cluster page -----------------------------------------------------------------------------


def _csrf(client) -> dict[str, str]:
    client.get(PAGE)
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def _post(client, url: str, data: dict | None = None):
    return client.post(url, {"kind": ROLLING_UPGRADE, **(data or {})}, **_csrf(client))


def _typed(moment: datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%dT%H:%M")


def test_the_cluster_page_offers_upgrade_the_cluster_at_only_on_central_with_members(
    ready, joined, admin_client, settings
) -> None:
    page = admin_client.get(PAGE).content.decode()
    assert 'data-testid="schedule"' not in page  # Central without members
    joined("member1")
    page = admin_client.get(PAGE).content.decode()
    assert "Upgrade the cluster at" in page and 'data-testid="schedule-set"' in page
    assert f'name="kind" value="{ROLLING_UPGRADE}"' in page
    assert 'type="datetime-local"' in page and 'data-testid="schedule-suggestion"' in page
    settings.CLUSTER_ROLE = "standalone"
    assert 'data-testid="schedule"' not in admin_client.get(PAGE).content.decode()


def test_an_administrator_schedules_moves_and_cancels_from_the_cluster_page(
    cluster, admin_client, now
) -> None:
    at = timezone.localtime(now + timedelta(hours=2))
    response = _post(admin_client, SET, {"at": _typed(at)})
    assert response.status_code == 302 and response["Location"] == "/cluster/#schedule"
    pending = ScheduledInstall.objects.get(state=ScheduleState.PENDING)
    assert pending.at == at and ScheduledRollingUpgrade.objects.filter(schedule=pending).exists()
    said = f"Rolling upgrade of the cluster to {NEW} scheduled for {schedule.local_text(at)}"
    page = admin_client.get(PAGE).content.decode()
    assert 'data-testid="schedule-pending"' in page and 'data-testid="schedule-banner"' in page
    assert f"Rolling upgrade of the cluster to {NEW} scheduled for" in page
    assert [n.message for n in current_notices() if "scheduled for" in n.message] == [
        f"{said} by admin."
    ]
    home = admin_client.get("/home/").content.decode()
    assert said in home and 'href="/cluster/#schedule"' in home

    later = at + timedelta(hours=1)
    assert _post(admin_client, MOVE, {"at": _typed(later)})["Location"] == "/cluster/#schedule"
    pending.refresh_from_db()
    assert pending.at == later

    _post(admin_client, CANCEL)
    pending.refresh_from_db()
    assert pending.state == ScheduleState.CANCELLED
    page = admin_client.get(PAGE).content.decode()
    assert 'data-testid="schedule-banner"' not in page and 'data-testid="schedule-set"' in page


def test_a_read_only_user_sees_the_rolling_schedule_but_cannot_change_it(
    cluster, admin_user, readonly_client, now
) -> None:
    scheduled(admin_user, now + timedelta(hours=2))
    page = readonly_client.get(PAGE).content.decode()
    assert f"Rolling upgrade of the cluster to {NEW} scheduled for" in page
    assert 'data-testid="schedule-cancel"' not in page and 'data-testid="schedule-move"' not in page
    for url in (SET, MOVE, CANCEL):
        assert _post(readonly_client, url, {"at": "2099-01-01T00:00"}).status_code == 403
    assert ScheduledInstall.objects.get().state == ScheduleState.PENDING


def test_changes_need_a_login_and_a_csrf_token(cluster, admin_client, client, now) -> None:
    data = {"kind": ROLLING_UPGRADE, "at": _typed(now + timedelta(hours=2))}
    assert client.post(SET, data).status_code == 302  # to the login page
    assert admin_client.post(SET, data).status_code == 403  # no CSRF token
    assert not ScheduledInstall.objects.exists()


@pytest.mark.browser
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_quietest_hour_schedules_the_rolling_upgrade_in_a_real_browser(
    cluster, admin_page, csp_errors: list[str]
) -> None:
    page = admin_page
    page.goto(PAGE)
    page.get_by_test_id("schedule-suggestion").wait_for()
    page.get_by_test_id("schedule-use-quiet").click()
    page.wait_for_url("**/cluster/#schedule")
    page.get_by_test_id("schedule-banner").wait_for()
    pending = ScheduledInstall.objects.get(state=ScheduleState.PENDING)
    assert schedule.kind_of(pending).name == ROLLING_UPGRADE
    banner = page.get_by_test_id("schedule-banner").inner_text()
    assert banner.startswith(f"Rolling upgrade of the cluster to {NEW} scheduled for")
    assert page.get_by_test_id("schedule-pending").is_visible()
    page.get_by_test_id("schedule-cancel").click()
    page.get_by_test_id("schedule-set").wait_for()
    assert page.get_by_test_id("schedule-banner").count() == 0
    assert ScheduledInstall.objects.get().state == ScheduleState.CANCELLED
    assert csp_errors == []
