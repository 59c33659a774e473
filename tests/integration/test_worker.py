"""The console's Celery tasks run in a real worker against a real Redis."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from events.models import Category, Event
from events.services import event_write
from events.tasks import events_prune
from tests.support.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_worker_prunes_expired_events_and_records_it(celery_worker, settings):
    old = timezone.now() - timedelta(days=settings.EVENT_RETENTION_DAYS + 5)
    Event.objects.bulk_create(
        Event(created_at=old, category=Category.SYSTEM, node="central", message=f"old {i}")
        for i in range(25)
    )
    kept = event_write(category=Category.SYSTEM, message="recent")

    events_prune.delay()

    summary = wait_for(
        lambda: Event.objects.filter(message__startswith="Deleted 25 events").first(),
        message=f"the worker did not prune; its log:\n{celery_worker.log()}",
    )
    assert summary.details == {"deleted": 25}
    assert not Event.objects.filter(message__startswith="old ").exists()
    assert Event.objects.filter(pk=kept.pk).exists()


def test_healthz_reports_the_worker_up_and_then_down_when_it_is_killed(celery_worker, client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok", "database": "up", "redis": "up", "worker": "up"
    }  # fmt: skip

    celery_worker.kill()

    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["worker"] == "down"
    assert response.json()["redis"] == "up"


def test_the_worker_samples_resources_for_the_graphs(celery_worker):
    from home.models import ResourceSample
    from home.tasks import resources_sample

    resources_sample.delay()

    sample = wait_for(
        ResourceSample.objects.first,
        message=f"no sample; the worker's log:\n{celery_worker.log()}",
    )
    assert 0 <= sample.cpu_percent <= 100
    assert 0 < sample.memory_percent < 100
