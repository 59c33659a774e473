"""Backup & Restore services: the round trip, the schedule, console settings, system jobs."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from appliance.config import configbackup
from appliance.config.backupformat import BackupRejected, WrongPassphrase
from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.system.paths import layout
from backups import services, system_image
from backups.models import BackupSettings
from events.models import Category, Event, Severity
from jobs.models import Job, JobState
from jobs.reconciler import reconcile
from jobs.tasks import run_job
from tests.backups.conftest import tree_bytes
from tests.support import enqueue as enqueues
from tests.support.clock import Clock
from tests.support.jobs import appliance_job_running
from upgrades.models import UpdateSettings
from upgrades.services import automatic_downloads_set

pytestmark = pytest.mark.django_db

SECRET = "correct horse battery"


def _configuration(root) -> dict[str, bytes]:
    return {**tree_bytes(root, "etc", "mailsec"), **tree_bytes(root, "etc", "sysconfig")}


@pytest.mark.parametrize("passphrase", [None, SECRET])
def test_restore_gives_back_the_exact_configuration_and_console_settings(
    demo_appliance, admin_user, passphrase
):
    services.backup_settings_set(
        user=admin_user, scheduled_enabled=True, scheduled_hour=4, keep_last=12
    )
    automatic_downloads_set(enabled=False, user=admin_user)
    before = _configuration(demo_appliance)
    header = services.config_backup_create(
        user=admin_user, comment="before the change", passphrase=passphrase
    )
    assert header.encrypted is bool(passphrase)

    smtp = read_smtp_settings()
    write_smtp_settings(replace(smtp, listen_port=2626, next_hop="relay.example.com"))
    automatic_downloads_set(enabled=True, user=admin_user)
    services.backup_settings_set(
        user=admin_user, scheduled_enabled=False, scheduled_hour=9, keep_last=3
    )
    assert _configuration(demo_appliance) != before

    items = services.config_backup_diff(name=header.name, passphrase=passphrase)
    assert {item.section for item in items} >= {"Console settings"}
    assert any("2626" in f"{item.before}{item.after}" for item in items), items

    result = services.config_backup_restore(
        user=admin_user, name=header.name, passphrase=passphrase
    )

    assert result.files_written >= 1
    assert _configuration(demo_appliance) == before
    assert UpdateSettings.objects.get(pk=1).automatic_downloads is False
    schedule = BackupSettings.objects.get(pk=1)
    assert (schedule.scheduled_enabled, schedule.scheduled_hour, schedule.keep_last) == (
        True,
        4,
        12,
    )
    restored = Event.objects.filter(category=Category.BACKUP, message__contains="restored").get()
    assert restored.username == "admin"
    assert services.config_backup_diff(name=header.name, passphrase=passphrase) == []


def test_the_passphrase_is_never_in_an_event(demo_appliance, admin_user):
    header = services.config_backup_create(user=admin_user, passphrase=SECRET)
    with pytest.raises(WrongPassphrase):
        services.config_backup_restore(user=admin_user, name=header.name, passphrase="wrong one!")
    services.config_backup_restore(user=admin_user, name=header.name, passphrase=SECRET)

    for event in Event.objects.all():
        assert SECRET not in event.message and SECRET not in str(event.details)
        assert "wrong one!" not in event.message and "wrong one!" not in str(event.details)


def test_a_wrong_passphrase_changes_nothing_and_says_so(demo_appliance, admin_user):
    header = services.config_backup_create(user=admin_user, passphrase=SECRET)
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2727))
    before = _configuration(demo_appliance)

    with pytest.raises(WrongPassphrase) as refused:
        services.config_backup_restore(user=admin_user, name=header.name, passphrase="not it!!")

    assert "passphrase is wrong" in str(refused.value)
    assert _configuration(demo_appliance) == before
    failed = Event.objects.get(category=Category.BACKUP, severity=Severity.ERROR)
    assert "failed" in failed.message and header.name in failed.message


def test_a_short_passphrase_is_refused(demo_appliance, admin_user):
    with pytest.raises(services.BadPassphrase):
        services.config_backup_create(user=admin_user, passphrase="short")
    assert configbackup.backup_list() == []


def test_restore_of_an_absent_backup_is_a_clear_error(demo_appliance, admin_user):
    with pytest.raises(services.BackupNotFound):
        services.config_backup_restore(user=admin_user, name="nothing-here.lmibak")


def test_console_settings_of_a_backup_are_checked_before_anything(db):
    assert services.console_settings_parse({}) == {}
    assert services.console_settings_parse(
        {"update_settings": {"automatic_downloads": True}, "future": {"x": 1}}
    ) == {"automatic_downloads": True}
    for hostile in (
        {"backup_settings": {"keep_last": 0}},
        {"backup_settings": {"scheduled_hour": 24}},
        {"backup_settings": {"scheduled_hour": True}},
        {"update_settings": {"automatic_downloads": "yes"}},
        {"update_settings": []},
        [],
    ):
        with pytest.raises(BackupRejected):
            services.console_settings_parse(hostile)


def test_the_scheduled_backup_runs_once_a_day_from_its_hour_and_prunes(
    demo_appliance, clock: Clock
):
    clock.travel(datetime(2027, 12, 31, 23, 30, tzinfo=UTC))  # the last hour of a year
    hour = timezone.localtime().hour
    BackupSettings.objects.create(pk=1, scheduled_enabled=True, scheduled_hour=hour, keep_last=2)

    first = services.scheduled_backup_run()
    assert first is not None and first.trigger == "scheduled"
    assert services.scheduled_backup_run() is None  # the day is taken

    for _ in range(3):  # later days
        BackupSettings.objects.filter(pk=1).update(last_scheduled_on=None)
        assert services.scheduled_backup_run() is not None
    scheduled = [h for h in configbackup.backup_list() if h.trigger == "scheduled"]
    assert len(scheduled) == 2


def test_the_scheduled_backup_waits_for_its_hour_and_respects_off(demo_appliance, clock: Clock):
    clock.travel(datetime(2028, 2, 29, 22, 30, tzinfo=UTC))
    now = timezone.localtime()
    BackupSettings.objects.create(pk=1, scheduled_enabled=True, scheduled_hour=now.hour + 1)
    assert services.scheduled_backup_run() is None
    BackupSettings.objects.filter(pk=1).update(scheduled_enabled=False, scheduled_hour=0)
    assert services.scheduled_backup_run() is None
    assert configbackup.backup_list() == []


def test_manual_backups_are_never_pruned_by_the_schedule(demo_appliance, admin_user):
    manual = services.config_backup_create(user=admin_user, comment="keep me")
    BackupSettings.objects.create(pk=1, scheduled_hour=0, keep_last=1)
    for _ in range(2):
        BackupSettings.objects.filter(pk=1).update(last_scheduled_on=None)
        services.scheduled_backup_run()
    names = [h.name for h in configbackup.backup_list()]
    assert manual.name in names and len(names) == 2


def test_backup_before_install_is_marked_and_kept_apart(demo_appliance, admin_user):
    header = services.config_backup_before_install(user=admin_user)
    assert header.trigger == "pre-install"
    assert Event.objects.filter(message__contains="Before firmware install").exists()


def test_one_system_job_at_a_time(demo_appliance, admin_user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        job = system_image.system_backup_start(user=admin_user)
    assert job.state == JobState.QUEUED and job.kind == "system_backup" and len(callbacks) == 1

    with pytest.raises(services.JobInProgress, match="already in progress"):
        system_image.system_restore_start(user=admin_user)
    assert Job.objects.count() == 1


def test_no_restore_or_system_backup_runs_under_an_install(
    demo_appliance, admin_user, client, admin_token
):
    """Every job that changes the appliance excludes the others: during an install a system
    restore, a configuration restore and a system backup are refused, naming the install."""
    header = services.config_backup_create(user=admin_user)
    appliance_job_running("install", "Install of firmware 2.8.1.0")
    etc_before = tree_bytes(demo_appliance, "etc")
    named = r"Install of firmware 2\.8\.1\.0 is already in progress, started by admin"

    with pytest.raises(services.JobInProgress, match=named):
        system_image.system_restore_start(user=admin_user)
    with pytest.raises(services.JobInProgress, match=named):
        system_image.system_backup_start(user=admin_user)
    with pytest.raises(services.JobInProgress, match=named):
        services.config_backup_restore(user=admin_user, name=header.name)
    answer = client.post("/api/v1/backups/system/restore", **admin_token)
    assert answer.status_code == 409 and "Install of firmware 2.8.1.0" in answer.json()["detail"]
    answer = client.post(
        f"/api/v1/backups/config/{header.name}/restore",
        {},
        content_type="application/json",
        **admin_token,
    )
    assert answer.status_code == 409, answer.content
    assert "Install of firmware 2.8.1.0" in answer.json()["detail"]

    assert list(Job.objects.exclude(kind="config_backup").values_list("kind", flat=True)) == [
        "install"
    ]
    assert tree_bytes(demo_appliance, "etc") == etc_before


def test_restore_without_an_image_is_refused(appliance_root, admin_user):
    with pytest.raises(services.NoSystemBackup):
        system_image.system_restore_start(user=admin_user)
    assert not Job.objects.exists()


def _system_job(kind: str = "system_backup") -> Job:
    return Job.objects.create(kind=kind, title="System job", requested_by="admin")


def test_the_job_runs_to_succeeded_with_every_byte_counted(demo_appliance, admin_user):
    job = _system_job()

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.bytes_done == job.bytes_total > 0 and job.percent == 100
    assert job.details["firmware_version"]
    assert not job.lease_owner
    run_job(job.pk)  # a second delivery does nothing
    assert Job.objects.get(pk=job.pk).finished_at == job.finished_at


def test_a_failing_job_says_why(appliance_root, admin_user):
    job = _system_job()

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.error
    assert Event.objects.filter(severity=Severity.ERROR, category=Category.BACKUP).exists()


def test_a_job_whose_worker_stopped_is_started_again_then_given_up(db, monkeypatch):
    sent = enqueues.capture(monkeypatch, "jobs.run")
    now = timezone.now()
    lost = Job.objects.create(
        kind="system_backup",
        title="System backup",
        state=JobState.RUNNING,
        started_at=now - timedelta(minutes=10),
        lease_owner="job:elsewhere:1:abc",
        lease_expires_at=now - timedelta(seconds=1),
        fence=1,
    )
    for restart in (1, 2):
        assert reconcile(now).restarted == [lost.pk]
        lost.refresh_from_db()
        assert (lost.state, lost.restarts, lost.lease_owner) == (JobState.QUEUED, restart, "")
        assert sent[-1] == lost.pk
        Job.objects.filter(pk=lost.pk).update(  # it runs, and its worker dies again
            state=JobState.RUNNING,
            lease_owner="job:elsewhere:1:abc",
            lease_expires_at=now - timedelta(seconds=1),
        )
    assert reconcile(now).failed == [lost.pk]
    lost.refresh_from_db()
    assert lost.state == JobState.FAILED and "given up" in lost.error
    assert Event.objects.filter(
        category=Category.BACKUP, message__contains="started again (restart 1 of 2)"
    ).exists()


def test_a_tampered_system_image_fails_the_restore_job_and_changes_nothing(demo_appliance):
    tar = layout(demo_appliance).system_backup_tar
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    etc_before = tree_bytes(demo_appliance, "etc")
    job = _system_job("system_restore")

    run_job(job.pk)

    job.refresh_from_db()
    assert job.state == JobState.FAILED and "checksum" in job.error
    assert tree_bytes(demo_appliance, "etc") == etc_before
