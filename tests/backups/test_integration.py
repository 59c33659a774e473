"""Create System Backup and Restore System Backup run in a real Celery worker."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import replace
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system import rescue
from appliance.system.facts import read_firmware_release, write_firmware_release
from backups import services
from events.models import Event
from jobs.models import FINAL_STATES, Job, JobState
from tests.backups.conftest import tree_bytes
from tests.support.services import start_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _finished(job_id: int, worker) -> Job:
    return wait_for(
        lambda: Job.objects.filter(pk=job_id, state__in=FINAL_STATES).first(),
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
    job = _finished(Job.objects.get().pk, celery_worker)

    assert job.state == JobState.SUCCEEDED, job.error
    assert job.bytes_done == job.bytes_total > 0
    info = rescue.system_backup_info()
    assert info is not None and info.created_at >= old.created_at
    assert job.details["firmware_version"] == info.firmware_version
    assert Event.objects.filter(message__startswith="System backup created").exists()
    html = client.get("/backup/system/").content.decode()
    assert 'data-testid="job-done"' in html and "hx-trigger" not in html


def test_a_system_restore_job_returns_the_appliance_to_the_image(
    celery_worker, demo_appliance, admin_user
):
    client = Client()
    client.force_login(admin_user)
    client.post("/backup/system/image/create/")
    created = _finished(Job.objects.get().pk, celery_worker)
    assert created.state == JobState.SUCCEEDED, created.error
    etc_before = tree_bytes(demo_appliance, "etc")

    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    write_firmware_release({**read_firmware_release(), "BUILD": "changed-after-the-backup"})
    assert tree_bytes(demo_appliance, "etc") != etc_before

    assert client.post("/backup/system/image/restore/").status_code == 302
    restore = Job.objects.exclude(pk=created.pk).get()
    restore = _finished(restore.pk, celery_worker)

    assert restore.state == JobState.SUCCEEDED, restore.error
    assert tree_bytes(demo_appliance, "etc") == etc_before
    assert read_smtp_settings().listen_port != 2626
    assert Event.objects.filter(message__startswith="System restored").exists()


def test_a_starting_worker_finishes_the_job_a_dead_worker_left_running(
    redis_settings, transactional_db, demo_appliance, tmp_path
):
    # Left running by a worker of this host whose process is gone: no need to wait out a lease.
    dead = subprocess.Popen(["true"])
    dead.wait()
    long_ago = timezone.now() - timedelta(minutes=5)
    lost = Job.objects.create(
        kind="system_backup",
        title="System backup",
        state=JobState.RUNNING,
        started_at=long_ago,
        lease_owner=f"job:{socket.gethostname()}:{dead.pid}:killed",
        lease_expires_at=timezone.now() + timedelta(minutes=1),
        fence=1,
    )
    worker = start_worker(redis_settings, demo_appliance, tmp_path)
    try:
        resumed = _finished(lost.pk, worker)
        assert resumed.state == JobState.SUCCEEDED, resumed.error
        assert resumed.restarts == 1
        job = services.system_backup_start(user="admin")  # the way is free again
        assert _finished(job.pk, worker).state == JobState.SUCCEEDED
    finally:
        worker.stop()
