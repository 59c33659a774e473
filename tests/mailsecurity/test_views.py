"""The four pages and the planner: what each role sees, edits, validation and URL filters."""

from __future__ import annotations

import re
import subprocess
from html import unescape

import psutil
import pytest
from django.test import Client

from appliance.mail import demo_store, retention
from appliance.system import maintenance
from events.models import Category, Event
from jobs.models import Job, JobState
from mailsecurity.models import PURGE, PurgeTrigger

from .conftest import MailData

pytestmark = pytest.mark.django_db

STORES = "/mail-security/policy-objects/message-stores/"
OBJECTS = "/mail-security/policy-objects/"
TRACKING = "/mail-security/policy/message-tracking/"
MAINTENANCE = "/smtp/configuration/maintenance/"
MODE = "/smtp/configuration/maintenance/mode/"
RECLAIM = "/mail-security/reclaim/"
PAGES = [OBJECTS, STORES, TRACKING, MAINTENANCE, RECLAIM]


@pytest.fixture
def admin(admin_user) -> Client:
    """Logged in without CSRF checks, for tests about something else than CSRF."""
    client = Client()
    client.force_login(admin_user)
    return client


def post_with_csrf(client: Client, page: str, url: str, data: dict) -> object:
    """Post as a browser does: the token from the page's cookie in the form."""
    client.get(page)
    token = client.cookies["csrftoken"].value
    return client.post(url, {**data, "csrfmiddlewaretoken": token})


def _half_full(monkeypatch, free_fraction: float, total: int | None = None) -> None:
    """Make the disks report free_fraction free (and, optionally, a given size)."""
    real = psutil.disk_usage

    def usage(path):
        measured = real(path)
        size = total or measured.total
        free = int(size * free_fraction)
        return measured._replace(total=size, free=free, used=size - free)

    monkeypatch.setattr(psutil, "disk_usage", usage)


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_visitors_are_sent_to_login(client, url):
    response = client.get(url)

    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


@pytest.mark.parametrize("url", PAGES)
def test_both_roles_can_view_every_page_in_the_menu(
    demo_appliance, admin_client, readonly_client, url
):
    for client in (admin_client, readonly_client):
        response = client.get(url)
        assert response.status_code == 200, url
    if url != RECLAIM:
        assert f'href="{url}" class="active"' in response.content.decode()


def test_read_only_users_see_no_edit_controls(demo_appliance, readonly_client):
    for url in (STORES, TRACKING, MAINTENANCE):
        html = readonly_client.get(url).content.decode()
        assert 'type="number"' not in html, url
        assert '<button type="submit">Save' not in html and "Save retention" not in html
        assert 'data-testid="maintenance-form"' not in html
        assert 'data-testid="apply-form"' not in html
    assert 'data-testid="retention-days">90<' in readonly_client.get(MAINTENANCE).content.decode()


@pytest.mark.parametrize(
    ("url", "data"),
    [
        (STORES, {"store:1": "1"}),
        (TRACKING, {"retention_days": "1"}),
        (MAINTENANCE, {"retention_days": "1"}),
        (MODE, {"action": "enter"}),
        (RECLAIM, {"smtp_log": "1"}),
    ],
)
def test_read_only_users_cannot_change_anything(demo_appliance, readonly_user, url, data):
    client = Client()
    client.force_login(readonly_user)

    response = client.post(url, data)

    assert response.status_code == 403
    assert retention.retention_settings().smtp_log_days == 90
    assert retention.retention_settings().stores[0].retention_days == 30
    assert maintenance.maintenance_status() is None
    assert not Job.objects.filter(kind=PURGE).exists()


def test_a_post_without_the_csrf_token_is_refused(demo_appliance, admin_client):
    response = admin_client.post(MAINTENANCE, {"retention_days": "5"})

    assert response.status_code == 403
    assert retention.retention_settings().smtp_log_days == 90


def test_policy_objects_lists_the_file_macros_with_their_files(demo_appliance, admin_client):
    (demo_appliance / "etc/mailsec/lists/allowed_domains.txt").unlink()

    html = admin_client.get(OBJECTS).content.decode()

    macros = html.split('data-testid="macro-objects"')[1].split("<tbody>")[1].split("</table>")[0]
    # The same objects as the guide's own check on the file.
    grep = subprocess.run(
        ["grep", "-B", "1", "JChGSUxFL", "etc/mailsec/cpe/mailsec_policyobjects1_1.xml"],
        cwd=demo_appliance, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = re.findall(r"<name>(.*)</name>", grep)
    assert len(names) == 3 == macros.count("<tr>")
    for name in names:
        assert f"<td>{name}</td>" in macros
    assert "/etc/mailsec/lists/blocked_senders.txt" in macros
    assert "Blocked senders" in macros and "Confidential keywords" in macros
    assert macros.count("Present") == 2 and macros.count("Missing") == 1
    assert "The file does not exist." in macros
    size = (demo_appliance / "etc/mailsec/lists/blocked_senders.txt").stat().st_size
    assert f"{size}\xa0bytes" in macros
    everything = html.split('data-testid="policy-objects"')[1]
    assert "Executive addresses" in everything and "2 entries: ceo@example.com" in everything
    assert "20.0\xa0MB" in everything  # Maximum message size


def test_message_stores_shows_size_count_oldest_and_retention(demo_appliance, admin_client):
    response = admin_client.get(STORES)
    html = response.content.decode()

    stores = retention.store_usage()
    assert sum(store.message_count for store in stores) == 200
    for store in stores:
        assert store.name in html
        assert f'name="store:{store.id}"' in html
        assert f'value="{store.retention_days}"' in html
    assert re.search(r'data-testid="store-count">\d+<', html)
    assert "ago)" in html


def test_counts_of_thousands_are_grouped_on_the_stores_page_and_home(demo_appliance, admin_client):
    demo_store.fill_demo(messages=2000)
    spam = next(s.message_count for s in retention.store_usage() if s.name == "Spam quarantine")
    assert spam >= 1000
    html = admin_client.get(STORES).content.decode()
    assert f'data-testid="store-count">{spam:,}<' in html
    home = admin_client.get("/home/").content.decode()
    assert 'data-testid="store-messages">2,200<' in home  # the demo's 200 and these 2,000


def test_an_administrator_shortens_a_store_retention_and_a_purge_starts(
    demo_appliance, admin_client, enqueued, django_capture_on_commit_callbacks
):
    spam = retention.retention_settings().stores[0]
    data = {f"store:{s.id}": str(s.retention_days) for s in retention.retention_settings().stores}
    data[f"store:{spam.id}"] = "7"

    with django_capture_on_commit_callbacks(execute=True):
        response = post_with_csrf(admin_client, STORES, STORES, data)

    assert response.status_code == 302 and response["Location"] == STORES
    assert retention.retention_settings().store(spam.id).retention_days == 7
    run = Job.objects.get(kind=PURGE)
    assert enqueued == [run.pk] and run.requested_by == "admin"
    event = Event.objects.get(category=Category.MAIL, message__contains="retention changed")
    assert event.message == "Message store Spam quarantine retention changed from 30 days to 7 days"
    assert Event.objects.filter(category=Category.MAIL, message="Retention purge started").exists()
    page = admin_client.get(STORES).content.decode()
    assert "retention changed from 30 days to 7 days" in page
    assert "A retention purge has started" in page
    # While the run is active the status panel polls its partial.
    assert (
        'hx-get="/mail-security/reclaim/purge/?since=' in page and 'hx-trigger="every 2s"' in page
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Keep at least 1 day."),
        ("-3", "Keep at least 1 day."),
        ("3651", "Keep at most 3650 days"),
        ("seven", "Enter a whole number of days."),
        ("", "Enter the number of days to keep."),
    ],
)
def test_invalid_retention_values_are_explained_and_nothing_is_saved(
    demo_appliance, admin, value, message
):
    stores = retention.retention_settings().stores
    data = {f"store:{s.id}": str(s.retention_days) for s in stores}
    data[f"store:{stores[1].id}"] = value

    response = admin.post(STORES, data)

    assert response.status_code == 400
    html = unescape(response.content.decode())
    assert 'data-testid="form-errors"' in html
    assert f"Virus quarantine: {message}" in html
    for url in (TRACKING, MAINTENANCE):
        response = admin.post(url, {"retention_days": value})
        assert response.status_code == 400
        assert message in unescape(response.content.decode())
    assert retention.retention_settings() == retention.RetentionSettings(
        stores=stores, smtp_log_days=90, tracking_log_days=90
    )
    assert not Event.objects.filter(message__contains="retention").exists()
    assert not Job.objects.filter(kind=PURGE).exists()


def test_the_smtp_log_retention_is_saved_on_the_maintenance_page(demo_appliance, admin, enqueued):
    response = admin.post(MAINTENANCE, {"retention_days": "30"})

    assert response.status_code == 302
    assert retention.retention_settings().smtp_log_days == 30
    run = Job.objects.get(kind=PURGE)
    assert "SMTP log: 90 days to 30 days" in run.details["reason"]
    assert Event.objects.get(message__contains="retention changed").category == Category.SMTP
    assert 'value="30"' in admin.get(MAINTENANCE).content.decode()


def test_the_tracking_log_retention_is_saved_and_the_search_is_kept(
    demo_appliance, admin, enqueued
):
    url = TRACKING + "?verdict=spam"
    response = admin.post(url, {"retention_days": "120"})

    assert response.status_code == 302 and response["Location"] == url
    assert retention.retention_settings().tracking_log_days == 120
    assert not Job.objects.filter(kind=PURGE).exists()  # longer: nothing to purge


def test_a_purge_already_running_goes_round_again_instead_of_a_second_run(
    demo_appliance, admin, enqueued
):
    running = Job.objects.create(
        kind=PURGE, title="Retention purge", trigger=PurgeTrigger.SCHEDULE,
        state=JobState.RUNNING, conflict_group=PURGE,
    )  # fmt: skip

    admin.post(MAINTENANCE, {"retention_days": "10"})

    running.refresh_from_db()
    assert running.again_requested and Job.objects.filter(kind=PURGE).count() == 1
    assert "it will purge again" in admin.get(MAINTENANCE).content.decode()


def test_administrators_enter_and_leave_maintenance_mode(demo_appliance, admin_client):
    page = admin_client.get(MAINTENANCE).content.decode()
    assert "Enter maintenance mode" in page

    response = post_with_csrf(
        admin_client, MAINTENANCE, MODE, {"action": "enter", "reason": "Disk swap"}
    )

    assert response.status_code == 302
    state = maintenance.maintenance_status()
    assert state is not None and state.reason == "Disk swap" and state.by == "admin"
    page = admin_client.get(MAINTENANCE).content.decode()
    assert "Leave maintenance mode" in page and "Disk swap" in page

    post_with_csrf(admin_client, MAINTENANCE, MODE, {"action": "leave"})

    assert maintenance.maintenance_status() is None
    messages = list(Event.objects.filter(category=Category.SMTP).values_list("message", flat=True))
    assert messages == [
        "Maintenance mode left: mail is accepted again",
        "Maintenance mode entered: mail is deferred with 421 (Disk swap)",
    ]


def test_a_bad_maintenance_request_is_explained(demo_appliance, admin):
    response = admin.post(MODE, {"action": "reboot"})

    assert response.status_code == 400
    assert "Select a valid choice" in response.content.decode()
    assert maintenance.maintenance_status() is None


def test_the_tracking_search_keeps_its_filters_in_the_url_and_pages(demo_appliance, admin):
    html = admin.get(TRACKING, {"verdict": "spam", "limit": "10"}).content.decode()

    rows = re.findall(r'data-entry-id="(\d+)"', html)
    assert len(rows) == 10
    assert html.count("verdict-spam") == 10
    older = unescape(re.search(r'href="([^"]+)"[^>]*data-testid="older"', html).group(1))
    assert "verdict=spam" in older and "limit=10" in older and "after=" in older
    second = admin.get(older).content.decode()
    more = re.findall(r'data-entry-id="(\d+)"', second)
    assert len(more) == 10 and not set(rows) & set(more)
    assert 'data-testid="newer"' in second
    assert '<option value="spam" selected>' in second


def test_the_tracking_search_finds_one_sender(demo_appliance, admin, mail: MailData):
    mail.tracking(0.1, sender="Rare.Sender@partner.example.net", subject="Quarterly figures")
    mail.commit()

    html = admin.get(TRACKING, {"sender": "rare.sender@PARTNER.example.net"}).content.decode()

    assert re.findall(r'data-entry-id="(\d+)"', html) != []
    assert "Quarterly figures" in html and html.count("data-entry-id") == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sender": "not an address"}, "is not an email address"),
        ({"verdict": "bad"}, "Select a valid choice"),
        ({"since": "yesterday"}, "is not a date and time"),
        ({"since": "2026-02-01T00:00", "until": "2026-01-01T00:00"}, "later than From"),
        ({"after": "%%%"}, "This page link is damaged"),
        ({"limit": "many"}, "Page size must be a number"),
    ],
)
def test_invalid_search_parameters_give_a_message_not_an_error(
    demo_appliance, admin, params, message
):
    response = admin.get(TRACKING, params)

    assert response.status_code == 400
    html = unescape(response.content.decode())
    assert 'data-testid="filter-errors"' in html and message in html


def test_pages_below_half_free_link_to_the_reclaim_planner(demo_appliance, admin, monkeypatch):
    _half_full(monkeypatch, 0.3)

    for url in (STORES, TRACKING, MAINTENANCE):
        html = admin.get(url).content.decode()
        assert 'data-testid="disk-notice"' in html and 'href="/mail-security/reclaim/"' in html
    resources = admin.get("/home/resources/").content.decode()
    assert 'href="/mail-security/reclaim/"' in resources


def test_pages_at_half_free_or_more_show_no_notice(demo_appliance, admin, monkeypatch):
    _half_full(monkeypatch, 0.6)

    assert 'data-testid="disk-notice"' not in admin.get(STORES).content.decode()


def test_the_planner_says_honestly_when_no_retention_can_reach_half_free(
    demo_appliance, admin, monkeypatch
):
    _half_full(monkeypatch, 0.30, total=252 * 10**9)

    html = unescape(admin.get(RECLAIM).content.decode())

    assert "cannot reach 50% free" in html
    assert 'data-testid="apply-form"' not in html
    assert re.search(r'data-testid="free-at-floor">30\.\d%', html)
    assert 'data-testid="shortfall">' in html


def test_the_planner_proposes_retentions_and_applies_them_in_one_click(
    demo_appliance, admin_client, monkeypatch, enqueued, django_capture_on_commit_callbacks
):
    store_bytes = retention.age_distribution().used_bytes
    # A disk just big enough that half of it needs a fifth of the store freed.
    total = int(store_bytes / 0.2)
    free = total // 2 - store_bytes // 5
    _half_full(monkeypatch, free / total, total)

    html = unescape(admin_client.get(RECLAIM).content.decode())

    assert "Reachable" in html and 'data-testid="apply-form"' in html
    proposed = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="(\d+)">', html))
    before = retention.retention_settings()
    shortened = {k for k, v in proposed.items() if k.startswith("store:")
                 and int(v) < before.store(int(k[6:])).retention_days}  # fmt: skip
    assert shortened

    with django_capture_on_commit_callbacks(execute=True):
        response = post_with_csrf(admin_client, RECLAIM, RECLAIM, proposed)

    assert response.status_code == 302
    after = retention.retention_settings()
    for key in shortened:
        assert after.store(int(key[6:])).retention_days == int(proposed[key])
    run = Job.objects.get(kind=PURGE)
    assert run.trigger == PurgeTrigger.PLANNER and enqueued == [run.pk]


def test_the_planner_refuses_a_tampered_plan(demo_appliance, admin, monkeypatch):
    response = admin.post(RECLAIM, {"smtp_log": "0", "tracking_log": "abc"})

    assert response.status_code == 400
    assert "The plan could not be applied" in unescape(response.content.decode())
    assert not Job.objects.filter(kind=PURGE).exists()


def test_the_purge_partial_polls_only_while_a_purge_is_active(db, admin):
    assert "No purge has run yet" in admin.get("/mail-security/reclaim/purge/").content.decode()
    run = Job.objects.create(
        kind=PURGE, title="Retention purge", state=JobState.RUNNING,
        trigger=PurgeTrigger.RETENTION, details={"messages_deleted": 1234},
    )  # fmt: skip

    active = admin.get("/mail-security/reclaim/purge/").content.decode()

    assert "hx-trigger" in active and 'data-testid="purge-messages">1234<' in active
    Job.objects.filter(pk=run.pk).update(state=JobState.SUCCEEDED, details={
        "bytes_reclaimed": 5 * 2**20, "store_bytes_before": 10 * 2**20,
        "store_bytes_after": 5 * 2**20, "disk_free_before": 1, "disk_free_after": 5 * 2**20,
    })  # fmt: skip
    done = admin.get("/mail-security/reclaim/purge/").content.decode()
    assert "hx-trigger" not in done
    assert 'data-testid="purge-reclaimed">5.0\xa0MB' in done


def test_pages_explain_a_missing_appliance_instead_of_failing(admin):
    for url in PAGES:
        response = admin.get(url)
        assert response.status_code == 200, url
        assert 'class="error"' in response.content.decode()


def test_the_purge_panel_offers_new_figures_only_for_a_purge_that_ended_after_the_page(
    demo_appliance, admin_client
):
    from datetime import timedelta

    from django.utils import timezone

    finished = timezone.now()
    Job.objects.create(
        kind=PURGE, title="Retention purge", trigger=PurgeTrigger.RETENTION,
        state=JobState.SUCCEEDED, finished_at=finished,
    )  # fmt: skip

    def panel(loaded_at) -> str:
        return admin_client.get(
            "/mail-security/reclaim/purge/", {"since": loaded_at.isoformat()}
        ).content.decode()

    assert 'data-testid="purge-reload"' in panel(finished - timedelta(seconds=5))
    assert 'data-testid="purge-reload"' not in panel(finished + timedelta(seconds=5))
