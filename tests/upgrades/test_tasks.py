"""The Celery interface: the job engine's reconciler picks up downloads whose executor went away."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.reconciler import reconcile
from tests.support import enqueue as enqueues
from tests.upgrades.conftest import start_download
from upgrades import services, tasks
from upgrades.models import Download, DownloadState

pytestmark = pytest.mark.django_db


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:
    return enqueues.capture(monkeypatch, "upgrades.tasks.download_run")


def test_the_reconciler_re_enqueues_a_download_whose_executor_went_silent(firmware, enqueued):
    firmware.offer(firmware.build())
    download = start_download()
    silent_since = timezone.now() - timedelta(seconds=services.LEASE_SECONDS + 5)
    Download.objects.filter(pk=download.pk).update(
        state=DownloadState.RUNNING, lease_owner="gone", heartbeat_at=silent_since
    )

    assert reconcile().recovered["download"] == [download.pk]

    assert enqueued == [download.pk]


def test_the_reconciler_leaves_a_live_download_alone(firmware, enqueued):
    firmware.offer(firmware.build())
    download = start_download()
    Download.objects.filter(pk=download.pk).update(
        state=DownloadState.RUNNING, lease_owner="alive", heartbeat_at=timezone.now()
    )

    assert reconcile().recovered["download"] == []

    assert enqueued == []


def test_a_starting_worker_re_enqueues_every_active_download(firmware, enqueued, monkeypatch):
    checks: list[bool] = []
    monkeypatch.setattr(tasks.update_check, "delay", lambda: checks.append(True))
    firmware.offer(firmware.build())
    download = start_download()

    tasks.on_worker_start()

    assert enqueued == [download.pk]
    assert checks == []  # the feed was checked a moment ago


def test_a_download_whose_task_could_not_be_queued_fails_visibly(firmware, monkeypatch):
    enqueues.broker_down(monkeypatch)
    firmware.offer(firmware.build())
    download = start_download()

    services._enqueue(download.pk)

    download.refresh_from_db()
    assert download.state == DownloadState.FAILED
    assert "the task queue cannot be reached" in download.error
