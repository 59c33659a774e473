"""Saving a shorter retention runs the purge in a real Celery worker, and the page shows it."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from appliance.mail import retention
from events.models import Event
from mailsecurity.models import PurgeRun, PurgeState
from tests.support.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STORES = "/mail-security/policy-objects/message-stores/"


def test_a_shorter_retention_is_purged_by_the_worker_and_the_page_shows_the_result(
    celery_worker, demo_appliance, admin_user
):
    client = Client()
    client.force_login(admin_user)
    before = {store.name: store.message_count for store in retention.store_usage()}
    spam = next(s for s in retention.retention_settings().stores if s.name == "Spam quarantine")
    data = {f"store:{s.id}": str(s.retention_days) for s in retention.retention_settings().stores}
    data[f"store:{spam.id}"] = "1"

    response = client.post(STORES, data)

    assert response.status_code == 302
    run = wait_for(
        lambda: PurgeRun.objects.filter(
            state__in=[PurgeState.SUCCEEDED, PurgeState.FAILED]
        ).first(),
        timeout=60,
        message=f"the worker did not finish the purge; its log:\n{celery_worker.log()}",
    )
    assert run.state == PurgeState.SUCCEEDED, run.error
    after = {store.name: store.message_count for store in retention.store_usage()}
    assert run.messages_deleted == before["Spam quarantine"] - after["Spam quarantine"] > 0
    assert after["Archive"] == before["Archive"]  # other stores keep their mail
    oldest = next(s for s in retention.store_usage() if s.name == "Spam quarantine").oldest
    assert oldest is None or (run.finished_at - oldest).total_seconds() <= 86_400 + 60
    event = Event.objects.get(message__startswith="Retention purge reclaimed")
    assert event.username == "admin" and event.details["run"] == run.pk
    assert f"{run.messages_deleted} messages" in event.message

    html = client.get(STORES).content.decode()

    assert 'data-testid="purge-state">Succeeded<' in html
    assert f'data-testid="purge-messages">{run.messages_deleted}<' in html
    assert re.search(r'data-testid="purge-reclaimed">[\d.]+\xa0(bytes|KB|MB)', html)
    assert "hx-trigger" not in html.split('id="purge-status"')[1].split(">")[0]


def test_a_starting_worker_resumes_the_purge_its_killed_predecessor_left_running(
    redis_settings, transactional_db, demo_appliance, tmp_path
):
    """The worker that ran a purge died (a row left running under its name); when it starts
    again, the purge is started again and finishes, instead of ending 'failed'."""
    from django.conf import settings
    from django.utils import timezone

    from mailsecurity.models import PurgeTrigger
    from tests.support.services import launch_worker, worker_env

    hostname = f"purger@{settings.NODE_NAME}"
    lost = PurgeRun.objects.create(
        trigger=PurgeTrigger.RETENTION,
        state=PurgeState.RUNNING,
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        executor=hostname,
    )
    worker = launch_worker(
        hostname,
        worker_env(redis_settings, demo_appliance),
        tmp_path / "purger.log",
        "--concurrency",
        "1",
    )
    try:
        run = wait_for(
            lambda: PurgeRun.objects.filter(
                pk=lost.pk, state__in=[PurgeState.SUCCEEDED, PurgeState.FAILED]
            ).first(),
            timeout=60,
            message=f"the starting worker did not resume the purge; its log:\n{worker.log()}",
        )
    finally:
        worker.stop()
    assert run.state == PurgeState.SUCCEEDED, run.error
    assert run.restarts == 1 and run.executor == hostname
    assert Event.objects.filter(message__contains="Retention purge interrupted").exists()
