"""Saving a shorter retention runs the purge in a real Celery worker, and the page shows it; a
worker killed inside the purge is replaced and the purge finishes."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from appliance.mail import retention
from events.models import Event
from jobs.models import FINAL_STATES, Job, JobState
from mailsecurity.models import PURGE
from tests.support.services import launch_worker, start_worker, wait_for, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STORES = "/mail-security/policy-objects/message-stores/"


def _shorten_spam_quarantine(client: Client) -> None:
    spam = next(s for s in retention.retention_settings().stores if s.name == "Spam quarantine")
    data = {f"store:{s.id}": str(s.retention_days) for s in retention.retention_settings().stores}
    data[f"store:{spam.id}"] = "1"
    assert client.post(STORES, data).status_code == 302


def _finished(worker, timeout: float = 60) -> Job:
    return wait_for(
        lambda: Job.objects.filter(kind=PURGE, state__in=FINAL_STATES).first(),
        timeout=timeout,
        message=f"the worker did not finish the purge; its log:\n{worker.log()}",
    )


def test_a_shorter_retention_is_purged_by_the_worker_and_the_page_shows_the_result(
    celery_worker, demo_appliance, admin_user
):
    client = Client()
    client.force_login(admin_user)
    before = {store.name: store.message_count for store in retention.store_usage()}

    _shorten_spam_quarantine(client)

    job = _finished(celery_worker)
    assert job.state == JobState.SUCCEEDED, job.error
    deleted = job.details["messages_deleted"]
    after = {store.name: store.message_count for store in retention.store_usage()}
    assert deleted == before["Spam quarantine"] - after["Spam quarantine"] > 0
    assert after["Archive"] == before["Archive"]  # other stores keep their mail
    oldest = next(s for s in retention.store_usage() if s.name == "Spam quarantine").oldest
    assert oldest is None or (job.finished_at - oldest).total_seconds() <= 86_400 + 60
    event = Event.objects.get(message__startswith="Retention purge reclaimed")
    assert event.username == "admin" and event.details["job"] == job.pk
    assert f"{deleted} messages" in event.message

    html = client.get(STORES).content.decode()

    assert 'data-testid="job-state">Retention purge: Succeeded<' in html
    assert f'data-testid="purge-messages">{deleted}<' in html
    assert re.search(r'data-testid="purge-reclaimed">[\d.]+\xa0(bytes|KB|MB)', html)
    assert "hx-trigger" not in html.split('id="purge-status"')[1].split(">")[0]


def test_a_worker_killed_inside_the_purge_is_replaced_and_the_purge_finishes(
    redis_settings, transactional_db, demo_appliance, admin_user, tmp_path
):
    """SIGKILL the worker while it holds the purge; the next worker's start-up reconcile sees
    the holder's process gone and starts the purge again, which deletes what it should."""
    client = Client()
    client.force_login(admin_user)
    before = {store.name: store.message_count for store in retention.store_usage()}
    env = {**worker_env(redis_settings, demo_appliance), "LMI_JOB_PAUSE": f"{PURGE}:0:30000"}
    first = launch_worker("purger@test", env, tmp_path / "purger.log", "--concurrency", "1")
    try:
        _shorten_spam_quarantine(client)
        wait_for(
            lambda: Job.objects.filter(kind=PURGE, state=JobState.RUNNING).exists(),
            timeout=30,
            message=f"the worker did not take the purge; its log:\n{first.log()}",
        )
    finally:
        first.kill()
    second = start_worker(redis_settings, demo_appliance, tmp_path)
    try:
        job = _finished(second)
    finally:
        second.stop()

    assert job.state == JobState.SUCCEEDED, job.error
    assert job.restarts == 1
    after = {store.name: store.message_count for store in retention.store_usage()}
    assert job.details["messages_deleted"] == before["Spam quarantine"] - after["Spam quarantine"]
    assert after["Spam quarantine"] < before["Spam quarantine"]
    assert after["Archive"] == before["Archive"]
    assert Event.objects.filter(message__contains="Retention purge interrupted").exists()
