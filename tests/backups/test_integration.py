"""Create System Backup and Restore System Backup run in a real Celery worker."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system import rescue
from appliance.system.facts import read_firmware_release, write_firmware_release
from backups import services
from backups.models import FINAL_STATES, SystemBackupJob, SystemJobKind, SystemJobState
from events.models import Event
from tests.backups.conftest import tree_bytes
from tests.support.services import start_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _finished(job_id: int, worker) -> SystemBackupJob:
    return wait_for(
        lambda: SystemBackupJob.objects.filter(pk=job_id, state__in=FINAL_STATES).first(),
        timeout=90,
        message=f"the worker did not finish the job; its log:\n{worker.log()}",
    )


def test_a_system_backup_job_runs_to_succeeded_in_the_worker(
    celery_worker, demo_appliance, admin_user
):
    client = Client()
    client.force_login(admin_user)
    old = rescue.system_backup_info()

    assert client.post("/backup/system/image/create/").status_code == 302
    job = _finished(SystemBackupJob.objects.get().pk, celery_worker)

    assert job.state == SystemJobState.SUCCEEDED, job.error
    assert job.bytes_done == job.bytes_total > 0
    info = rescue.system_backup_info()
    assert info is not None and info.created_at >= old.created_at
    assert job.firmware_version == info.firmware_version
    assert Event.objects.filter(message__startswith="System backup created").exists()
    html = client.get("/backup/system/").content.decode()
    assert 'data-testid="job-done"' in html and "hx-trigger" not in html


def test_a_system_restore_job_returns_the_appliance_to_the_image(
    celery_worker, demo_appliance, admin_user
):
    client = Client()
    client.force_login(admin_user)
    client.post("/backup/system/image/create/")
    created = _finished(SystemBackupJob.objects.get().pk, celery_worker)
    assert created.state == SystemJobState.SUCCEEDED, created.error
    etc_before = tree_bytes(demo_appliance, "etc")

    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    write_firmware_release({**read_firmware_release(), "BUILD": "changed-after-the-backup"})
    assert tree_bytes(demo_appliance, "etc") != etc_before

    assert client.post("/backup/system/image/restore/").status_code == 302
    restore = SystemBackupJob.objects.exclude(pk=created.pk).get()
    restore = _finished(restore.pk, celery_worker)

    assert restore.state == SystemJobState.SUCCEEDED, restore.error
    assert tree_bytes(demo_appliance, "etc") == etc_before
    assert read_smtp_settings().listen_port != 2626
    assert Event.objects.filter(message__startswith="System restored").exists()


def test_a_starting_worker_finishes_the_job_a_dead_worker_left_running(
    redis_settings, transactional_db, demo_appliance, tmp_path
):
    long_ago = timezone.now() - services.STALE_AFTER - timedelta(seconds=5)
    lost = SystemBackupJob.objects.create(
        kind=SystemJobKind.CREATE,
        state=SystemJobState.RUNNING,
        started_at=long_ago,
        heartbeat_at=long_ago,
        executor="celery@a-worker-that-was-killed",
    )
    worker = start_worker(redis_settings, demo_appliance, tmp_path)
    try:
        resumed = _finished(lost.pk, worker)
        assert resumed.state == SystemJobState.SUCCEEDED, resumed.error
        assert resumed.restarts == 1
        job = services.system_backup_start(user="admin")  # the way is free again
        assert _finished(job.pk, worker).state == SystemJobState.SUCCEEDED
    finally:
        worker.stop()
