"""Downloads on the job engine: the reconciler picks up those whose executor went away or whose
task was never queued."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Job, JobState
from jobs.reconciler import enqueue_grace, reconcile
from tests.support import enqueue as enqueues
from tests.upgrades.conftest import start_download
from upgrades import services
from upgrades.models import Download, DownloadState, DownloadTrigger

pytestmark = pytest.mark.django_db


def _held(download: Download, *, expires_in: float) -> None:
    Download.objects.filter(pk=download.pk).update(state=DownloadState.RUNNING)
    Job.objects.filter(pk=download.job_id).update(
        state=JobState.RUNNING,
        lease_owner="job:elsewhere:1:abc",
        lease_expires_at=timezone.now() + timedelta(seconds=expires_in),
        fence=1,
    )


def test_the_reconciler_resumes_a_download_whose_executor_went_silent(firmware, enqueued):
    firmware.offer(firmware.build())
    download = start_download()
    _held(download, expires_in=-5)

    assert reconcile().resumed == [download.job_id]

    assert enqueued == [download.job_id]
    job = Job.objects.get(pk=download.job_id)
    assert (job.state, job.restarts, job.lease_owner) == (JobState.QUEUED, 1, "")


def test_the_reconciler_leaves_a_live_download_alone(firmware, enqueued):
    firmware.offer(firmware.build())
    download = start_download()
    _held(download, expires_in=30)

    assert not reconcile()

    assert enqueued == []


def test_a_download_whose_task_could_not_be_queued_is_sent_by_the_reconciler(
    firmware, monkeypatch, django_capture_on_commit_callbacks
):
    firmware.offer(firmware.build())
    enqueues.broker_down(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        download = services.download_start(user="admin", trigger=DownloadTrigger.USER)
    assert len(callbacks) == 1  # the enqueue was tried, and refused
    assert (download.state, download.job.state) == (DownloadState.QUEUED, JobState.QUEUED)

    sent = enqueues.capture(monkeypatch, "jobs.run")  # the broker is back
    assert reconcile().enqueued == []  # within the grace a slow worker may still take it
    later = timezone.now() + enqueue_grace() + timedelta(seconds=1)
    assert reconcile(later).enqueued == [download.job_id]
    assert sent == [download.job_id]
