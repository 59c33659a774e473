"""Updates > Install > Rehearse: the button, its panel, and the figures beside the estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from jobs.models import Job
from jobs.tasks import run_job
from tests.support import enqueue as enqueues
from tests.upgrades.test_install import ready_firmware  # noqa: F401
from upgrades import rehearsal
from upgrades.models import Download

START = "/updates/licensing/install/rehearse/"
PANEL = "/updates/licensing/install/rehearse/panel/"
INSTALL = "/updates/licensing/install/"


def _post(client: Client, url: str):
    client.get(INSTALL)
    return client.post(url, {}, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)


def test_rehearse_queues_the_job_for_the_worker_and_the_panel_follows_it(
    ready_firmware: Download,  # noqa: F811
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
    ready_firmware: Download,  # noqa: F811
    admin_client: Client,
) -> None:
    page = admin_client.get(INSTALL).content.decode()
    assert 'data-testid="rehearsal-none"' in page and 'data-testid="rehearse"' in page
    job = rehearsal.rehearsal_start(user="admin", enqueue=False)
    run_job(job.pk)
    job.refresh_from_db()
    downtime = job.details["report"]["downtime_s"]

    page = admin_client.get(INSTALL).content.decode()

    assert 'data-testid="rehearsal-last" data-state="succeeded"' in page
    assert f"about {downtime:.1f} s of downtime measured on a snapshot" in page  # the checklist


def test_a_read_only_user_sees_the_panel_but_cannot_rehearse(
    ready_firmware: Download,  # noqa: F811
    readonly_client: Client,
) -> None:
    assert 'data-testid="rehearse"' not in readonly_client.get(INSTALL).content.decode()
    response = _post(readonly_client, START)
    assert response.status_code == 403
    assert not Job.objects.filter(kind=rehearsal.REHEARSE_KIND).exists()


def test_rehearse_needs_post_a_csrf_token_and_a_login(
    ready_firmware: Download,  # noqa: F811
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
