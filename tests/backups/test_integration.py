"""Create System Backup and Restore System Backup run in a real Celery worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from django.test import Client

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system import rescue
from appliance.system.facts import read_firmware_release, write_firmware_release
from backups import services, system_image
from backups.models import SYSTEM_BACKUP, SYSTEM_RESTORE
from events.models import Event
from jobs.models import FINAL_STATES, Job, JobState
from tests.backups.conftest import tree_bytes
from tests.support.services import launch_worker, start_worker, wait_for, worker_env

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
    panel = html[html.index('id="system-backup"') :]
    assert 'data-testid="job-done"' in panel and "hx-trigger" not in panel[: panel.index(">")]


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


def _finished_by_a_new_worker(job: Job, redis_settings, root, tmp_path) -> Job:
    """Start a worker, let it finish the job its killed predecessor left: succeeded, restarted
    once."""
    worker = start_worker(redis_settings, root, tmp_path)
    try:
        job = _finished(job.pk, worker)
    finally:
        worker.stop()
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.restarts == 1
    return job


def _killed_while_writing(worker, start: Callable[[], Job]) -> Job:
    """Start a system job, wait until ``worker`` writes its image, then SIGKILL the worker."""
    try:
        job = start()
        wait_for(
            lambda: Job.objects.filter(pk=job.pk, step=1, bytes_done__gt=0).exists(),
            timeout=30,
            message=f"the worker did not start writing; its log:\n{worker.log()}",
        )
    finally:
        worker.kill()
    return job


@pytest.mark.parametrize("kind", [SYSTEM_BACKUP, SYSTEM_RESTORE])
def test_a_worker_killed_mid_image_is_replaced_and_the_job_starts_again_from_scratch(
    kind, redis_settings, transactional_db, demo_appliance, admin_user, tmp_path
):
    """SIGKILL the worker after the first file of the image (or of the restore) is written; the
    previous image is intact meanwhile, and the next worker's start-up reconcile starts the job
    again from scratch, to success."""
    rescue.system_backup_create()
    image = rescue.system_backup_info()
    etc_before = tree_bytes(demo_appliance, "etc")
    env = {**worker_env(redis_settings, demo_appliance), "LMI_JOB_PAUSE": f"{kind}:1:30000"}
    first = launch_worker("imager@test", env, tmp_path / "imager.log", "--concurrency", "1")

    def start() -> Job:
        if kind == SYSTEM_BACKUP:
            return system_image.system_backup_start(user=admin_user)
        write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
        return system_image.system_restore_start(user=admin_user)

    job = _killed_while_writing(first, start)
    assert rescue.system_backup_info() == image  # the previous image is whole
    job = _finished_by_a_new_worker(job, redis_settings, demo_appliance, tmp_path)
    assert Event.objects.filter(message__contains="interrupted: its worker stopped").exists()
    if kind == SYSTEM_BACKUP:
        info = rescue.system_backup_info()
        assert info is not None and info.created_at >= image.created_at
        assert job.details["sha256"] == info.sha256
    else:
        assert tree_bytes(demo_appliance, "etc") == etc_before
        assert read_smtp_settings().listen_port != 2626


@pytest.mark.parametrize(("step", "outcome"), [(1, JobState.ROLLED_BACK), (2, JobState.SUCCEEDED)])
def test_a_configuration_restore_killed_midway_is_finished_or_undone_from_its_journal(
    step, outcome, redis_settings, transactional_db, demo_appliance, monkeypatch, tmp_path
):
    """SIGKILL the process restoring while it stages the new files (step 1) or puts them in
    place (step 2, past the commit point): the reconciler sees the holder gone and a worker
    finishes the restore from its journal, or undoes it; never a half-restored configuration."""
    from tests.support.crash import killed_at_step, taken_over

    header = services.config_backup_create(user="admin")
    etc_backup = tree_bytes(demo_appliance, "etc")
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    etc_changed = tree_bytes(demo_appliance, "etc")
    job = killed_at_step(
        "from backups import services\n"
        f"services.config_backup_restore(user='admin', name={header.name!r})",
        worker_env(redis_settings, demo_appliance),
        "config_restore",
        step,
    )
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING  # its holder is gone

    job = taken_over(job, monkeypatch)
    assert job.state == outcome, job.error
    assert tree_bytes(demo_appliance, "etc") == (
        etc_backup if outcome == JobState.SUCCEEDED else etc_changed
    )
    assert not list(demo_appliance.rglob("*.lmirestore-*"))  # no staged file or old copy left
    assert Event.objects.filter(message__contains="the process restoring it stopped").exists()
    services.config_backup_restore(user="admin", name=header.name)  # the way is free again
    assert tree_bytes(demo_appliance, "etc") == etc_backup


def test_a_configuration_backup_killed_midway_is_undone_and_leaves_no_partial_file(
    redis_settings, transactional_db, demo_appliance, monkeypatch
):
    """SIGKILL the process making a configuration backup: the reconciler sees its holder gone
    and a worker undoes it (a write cut short leaves only a temporary file, which goes); the
    backups are as they were, and the next backup is made at once."""
    from appliance.config import configbackup
    from appliance.system.paths import layout
    from tests.support.crash import killed_at_step, taken_over

    before = [header.name for header in configbackup.backup_list()]
    job = killed_at_step(
        "from backups import services\nservices.config_backup_create(user='admin')",
        worker_env(redis_settings, demo_appliance),
        "config_backup",
        1,
    )
    # What a write cut short leaves (atomic_open's temporary file next to the archive).
    directory = layout(demo_appliance).config_backups_dir
    partial = directory / ".lmi-config-20261205.lmibak.abc123.tmp"
    directory.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half an archive")

    job = taken_over(job, monkeypatch, how="rolling_back")
    assert job.state == JobState.ROLLED_BACK, job.error
    assert not partial.exists()
    assert [header.name for header in configbackup.backup_list()] == before
    assert Event.objects.filter(message__startswith="Configuration backup undone").exists()
    made = services.config_backup_create(user="admin")  # the way is free again
    assert made.name in [header.name for header in configbackup.backup_list()]


def _image_dirs(root) -> set[str]:
    from appliance.system.paths import layout

    return {p.name for p in layout(root).rescue_dir.iterdir() if p.name.startswith("image-")}


def test_a_system_backup_started_again_after_its_worker_died_sweeps_what_the_kill_left(
    redis_settings, transactional_db, demo_appliance, admin_user, tmp_path
):
    """SIGKILL the worker while the new image is half written in a directory of its own: the
    old image stays current, and the job, started again by the next worker, removes the half
    image (under the rescue partition's lock) before it writes a whole one; one image is left."""
    image = rescue.system_backup_info()
    before = _image_dirs(demo_appliance)
    env = {
        **worker_env(redis_settings, demo_appliance),
        "LMI_JOB_PAUSE": "system_backup:tar-started:30000",
    }
    first = launch_worker("imager@test", env, tmp_path / "imager.log", "--concurrency", "1")
    job = _killed_while_writing(first, lambda: system_image.system_backup_start(user=admin_user))
    [half] = _image_dirs(demo_appliance) - before
    assert rescue.system_backup_info() == image  # the old image is current, whole
    assert rescue.system_backup_verify()
    job = _finished_by_a_new_worker(job, redis_settings, demo_appliance, tmp_path)
    assert job.details["leftovers_removed"] == [half]
    assert Event.objects.filter(
        message__startswith="System backup created",
        message__endswith="(1 leftover of an interrupted backup removed)",
    ).exists()
    info = rescue.system_backup_info()
    assert info is not None and job.details["sha256"] == info.sha256
    assert rescue.system_backup_verify()
    [left] = _image_dirs(demo_appliance)
    assert left not in before | {half}


def drop_from_image(root, name: str) -> None:
    """The image without one member, its manifest matching (as the demo made it before it wrote
    its firmware level first)."""
    import hashlib
    import io
    import json
    import tarfile

    from appliance.system.paths import layout

    the_layout = layout(root)
    buffer = io.BytesIO()
    with (
        tarfile.open(the_layout.system_backup_tar) as source,
        tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as target,
    ):
        for member in source:
            if member.name != name:
                target.addfile(member, source.extractfile(member) if member.isreg() else None)
    data = buffer.getvalue()
    the_layout.system_backup_tar.write_bytes(data)
    manifest = json.loads(the_layout.system_backup_manifest.read_text())
    manifest.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    the_layout.system_backup_manifest.write_text(json.dumps(manifest))


def test_an_image_without_a_firmware_level_is_refused_at_the_start_and_by_the_restore(
    celery_worker, demo_appliance, admin_user
):
    """Asking for the restore is refused, naming what is missing, with no job; a job that got
    past that (the image changed after the check) fails in the worker before anything changed."""
    import os

    from appliance.system.paths import layout
    from events.models import Severity
    from jobs import engine as jobs_engine
    from jobs.models import APPLIANCE_GROUP

    drop_from_image(demo_appliance, "etc/firmware-release")
    assert rescue.system_backup_verify()  # whole and matching its manifest, yet incomplete
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    etc_before = tree_bytes(demo_appliance, "etc")
    active_before = os.readlink(layout(demo_appliance).active_system)
    client = Client()
    client.force_login(admin_user)

    html = client.post("/backup/system/image/restore/", follow=True).content.decode()

    assert "lacks what an appliance needs: the firmware level (etc/firmware-release)" in html
    assert not Job.objects.exists()
    refused = Event.objects.get(message__startswith="System restore refused")
    assert refused.severity == Severity.ERROR and "etc/firmware-release" in refused.message

    job = jobs_engine.start(
        SYSTEM_RESTORE,
        title="System restore",
        user=admin_user,
        conflict_group=APPLIANCE_GROUP,
    )
    job = _finished(job.pk, celery_worker)
    assert job.state == JobState.FAILED
    assert "the firmware level (etc/firmware-release)" in job.error
    assert tree_bytes(demo_appliance, "etc") == etc_before
    assert read_smtp_settings().listen_port == 2626
    assert os.readlink(layout(demo_appliance).active_system) == active_before
