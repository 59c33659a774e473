"""Updates > Install > Rehearse: the button, Cancel, its panel, the figures beside the estimate,
and /api/v1/updates/rehearsal."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from appliance.system import snapshot
from events.models import Event
from jobs import engine as jobs_engine
from jobs import leases
from jobs.models import Job, JobState
from jobs.tasks import run_job
from tests.support import enqueue as enqueues
from tests.support.trees import tree_snapshot
from tests.upgrades.conftest import rehearse_here
from upgrades import rehearsal
from upgrades.models import Download

START = "/updates/licensing/install/rehearse/"
PANEL = "/updates/licensing/install/rehearse/panel/"
INSTALL = "/updates/licensing/install/"


def _post(client: Client, url: str):
    client.get(INSTALL)
    return client.post(url, {}, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)


def test_rehearse_queues_the_job_for_the_worker_and_the_panel_follows_it(
    ready_firmware: Download,
    admin_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = enqueues.capture(monkeypatch, "jobs.run")

    response = _post(admin_client, START)

    assert response.status_code == 302 and response["Location"] == INSTALL + "#rehearsal"
    job = Job.objects.get(kind=rehearsal.REHEARSE_KIND)
    assert sent == [job.pk] and job.requested_by == "admin"
    panel = admin_client.get(PANEL).content.decode()
    assert 'data-testid="rehearsal-active"' in panel and 'hx-trigger="every 1s"' in panel
    assert 'data-testid="rehearse"' not in panel  # no second one while it runs

    run_job(job.pk)
    panel = admin_client.get(PANEL).content.decode()
    assert "hx-get" not in panel  # polled only while it runs
    assert 'data-testid="rehearsal-downtime"' in panel
    assert "mailsec_config2_0.xml" in panel  # the configuration diff
    assert "blocked_senders.txt" in panel  # the $(FILE) objects it met


def test_the_install_page_shows_the_panel_and_the_last_rehearsal_beside_the_estimate(
    ready_firmware: Download,
    admin_client: Client,
) -> None:
    page = admin_client.get(INSTALL).content.decode()
    assert 'data-testid="rehearsal-none"' in page and 'data-testid="rehearse"' in page
    job = rehearse_here()
    downtime = job.details["report"]["downtime_s"]

    page = admin_client.get(INSTALL).content.decode()

    assert 'data-testid="rehearsal-last" data-state="succeeded"' in page
    assert f"about {downtime:.1f} s of downtime measured on a snapshot" in page  # the checklist


def test_a_read_only_user_sees_the_panel_but_cannot_rehearse(
    ready_firmware: Download,
    readonly_client: Client,
) -> None:
    assert 'data-testid="rehearse"' not in readonly_client.get(INSTALL).content.decode()
    response = _post(readonly_client, START)
    assert response.status_code == 403
    assert not Job.objects.filter(kind=rehearsal.REHEARSE_KIND).exists()


def test_rehearse_needs_post_a_csrf_token_and_a_login(
    ready_firmware: Download,
    admin_client: Client,
) -> None:
    assert admin_client.get(START).status_code == 405
    assert admin_client.post(START).status_code == 403  # no CSRF token
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.get(PANEL).status_code == 302
    assert anonymous.post(START).status_code in (302, 403)
    assert not Job.objects.filter(kind=rehearsal.REHEARSE_KIND).exists()


def test_rehearse_without_a_downloaded_firmware_says_what_to_do(
    demo_appliance: Path, admin_client: Client
) -> None:
    response = _post(admin_client, START)
    assert response.status_code == 302
    page = admin_client.get(INSTALL).content.decode()
    assert "The rehearsal did not start: No verified newer firmware is downloaded" in page


# --- Cancel ---------------------------------------------------------------------------------

CANCEL = "/updates/licensing/install/rehearse/cancel/"
API = "/api/v1/updates/rehearsal"


def test_cancel_ends_a_queued_rehearsal_at_once_through_the_job_engine(
    ready_firmware: Download,
    admin_client: Client,
) -> None:
    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    panel = admin_client.get(PANEL).content.decode()
    assert 'data-testid="rehearsal-cancel"' in panel

    response = _post(admin_client, CANCEL)

    assert response.status_code == 302 and response["Location"] == INSTALL + "#rehearsal"
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert Event.objects.filter(message__contains="cancelled before it started").exists()
    page = admin_client.get(INSTALL).content.decode()
    assert "was cancelled" in page and 'data-testid="rehearse"' in page


def test_cancel_stops_a_running_rehearsal_at_its_next_step_and_leaves_the_tree_as_it_was(
    ready_firmware: Download,
    admin_client: Client,
    appliance_root: Path,
) -> None:
    before = tree_snapshot(appliance_root)
    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    lease = jobs_engine.claim(job.pk, leases.executor_name("job"))  # as the worker takes it
    assert lease is not None

    _post(admin_client, CANCEL)

    job.refresh_from_db()
    assert job.state == JobState.RUNNING and job.cancel_requested
    panel = admin_client.get(PANEL).content.decode()
    assert 'data-testid="rehearsal-cancelling"' in panel
    assert 'data-testid="rehearsal-cancel"' not in panel
    with lease.keep_alive():
        rehearsal.rehearsal_job_run(lease)
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED, job.error
    assert not snapshot.scratch_path().exists()
    assert tree_snapshot(appliance_root) == before


def test_cancel_is_refused_to_read_only_users_and_needs_post_csrf_and_login(
    ready_firmware: Download,
    admin_client: Client,
    readonly_client: Client,
) -> None:
    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    assert 'data-testid="rehearsal-cancel"' not in readonly_client.get(PANEL).content.decode()
    assert _post(readonly_client, CANCEL).status_code == 403
    assert admin_client.get(CANCEL).status_code == 405
    assert admin_client.post(CANCEL).status_code == 403  # no CSRF token
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.post(CANCEL).status_code in (302, 403)
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and not job.cancel_requested


def test_cancel_without_a_running_rehearsal_says_so(
    ready_firmware: Download,
    admin_client: Client,
) -> None:
    _post(admin_client, CANCEL)
    assert "No rehearsal is running." in admin_client.get(INSTALL).content.decode()


# --- /api/v1/updates/rehearsal --------------------------------------------------------------


def test_api_starts_follows_and_cancels_a_rehearsal(
    ready_firmware: Download,
    client: Client,
    admin_token: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = enqueues.capture(monkeypatch, "jobs.run")
    assert client.get(API, **admin_token).status_code == 404

    started = client.post(API, **admin_token)

    assert started.status_code == 202, started.content
    body = started.json()
    job = Job.objects.get(kind=rehearsal.REHEARSE_KIND)
    assert body["id"] == job.pk and body["state"] == "queued" and body["cancellable"] is True
    assert job.trigger == "api" and sent == [job.pk]
    assert client.get(API, **admin_token).json()["id"] == job.pk
    assert client.post(API, **admin_token).status_code == 409  # one at a time

    cancelled = client.post(f"{API}/cancel", **admin_token)

    assert cancelled.status_code == 200, cancelled.content
    assert cancelled.json()["state"] == "cancelled"
    assert client.post(f"{API}/cancel", **admin_token).status_code == 409


def test_api_returns_the_last_rehearsal_with_its_report(
    ready_firmware: Download,
    client: Client,
    viewer_token: dict[str, str],
) -> None:
    job = rehearse_here()

    body = client.get(API, **viewer_token).json()

    assert body["id"] == job.pk and body["state"] == "succeeded"
    assert body["report"]["version"] == "2.8.1.0" and body["report"]["downtime_s"] > 0


def test_api_refuses_start_and_cancel_to_a_read_only_token(
    ready_firmware: Download,
    client: Client,
    viewer_token: dict[str, str],
) -> None:
    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    assert client.post(API, **viewer_token).status_code == 403
    assert client.post(f"{API}/cancel", **viewer_token).status_code == 403
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and not job.cancel_requested
    assert Job.objects.filter(kind=rehearsal.REHEARSE_KIND).count() == 1
