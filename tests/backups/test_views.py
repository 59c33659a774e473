"""Backup & Restore > System: list, create, download, upload, compare, restore, delete, schedule,
the system backup panel; read-only users see it all and change nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from appliance.config import backupformat, configbackup
from appliance.config.store import read_smtp_settings, write_smtp_settings
from backups import services
from backups.models import BackupSettings
from events.models import Category, Event, Severity
from jobs.models import Job, JobState
from jobs.tasks import run_job
from tests.backups import archives
from tests.backups.conftest import PAGE, backup_files, csrf, post, tree_bytes

pytestmark = pytest.mark.django_db

SECRET = "correct horse battery"


def _make(admin_user, **kw) -> backupformat.BackupHeader:
    return services.config_backup_create(user=admin_user, **kw)


def _upload(client, data: bytes, name: str = "backup.lmibak"):
    return post(
        client, "/backup/system/config/upload/", {"backup_file": SimpleUploadedFile(name, data)}
    )


def test_the_page_lists_backups_and_shows_the_system_image(
    admin_client, demo_appliance, admin_user
):
    header = _make(admin_user, comment="before the upgrade", passphrase=SECRET)

    html = admin_client.get(PAGE).content.decode()

    assert "Manage Configuration Backups" in html and "Manage System Backup" in html
    assert f'data-testid="backup-{header.name}"' in html
    assert "before the upgrade" in html and header.firmware_version in html
    assert 'data-testid="image-state">Present' in html
    assert "A firmware upgrade overwrites the system backup image" in html
    assert 'data-testid="create-and-download"' in html
    assert 'data-testid="create-backup"' in html and 'data-testid="system-create"' in html


def test_create_without_a_passphrase(admin_client, demo_appliance):
    html = post(
        admin_client, "/backup/system/config/create/", {"comment": "plain"}
    ).content.decode()

    [header] = configbackup.backup_list()
    assert header.comment == "plain" and not header.encrypted and header.created_by == "admin"
    assert f"Configuration backup {header.name} created." in html
    assert Event.objects.filter(category=Category.BACKUP, message__contains="created").exists()


def test_create_with_a_passphrase_encrypts(admin_client, demo_appliance):
    data = {"comment": "secret", "passphrase": SECRET, "passphrase_again": SECRET}
    html = post(admin_client, "/backup/system/config/create/", data).content.decode()

    [header] = configbackup.backup_list()
    assert header.encrypted and "(encrypted)" in html
    assert SECRET.encode() not in configbackup.backup_path(header.name).read_bytes()


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (SECRET, SECRET + "x", "The two passphrases differ"),
        ("short", "short", "at least 8 characters"),
    ],
)
def test_create_refuses_passphrases_that_differ_or_are_short(
    admin_client, demo_appliance, first, second, message
):
    data = {"comment": "x", "passphrase": first, "passphrase_again": second}
    html = post(admin_client, "/backup/system/config/create/", data).content.decode()

    assert message in html
    assert configbackup.backup_list() == []


def test_download_gives_the_file_byte_for_byte(admin_client, demo_appliance, admin_user):
    header = _make(admin_user)

    response = admin_client.get(f"/backup/system/config/{header.name}/download/")

    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="{header.name}"'
    assert (
        b"".join(response.streaming_content) == configbackup.backup_path(header.name).read_bytes()
    )


def test_download_of_an_unknown_or_hostile_name_is_404(admin_client, demo_appliance):
    assert admin_client.get("/backup/system/config/nope.lmibak/download/").status_code == 404
    assert admin_client.get("/backup/system/config/..%2Fetc/download/").status_code == 404


def test_create_and_download_in_one_click(admin_client, demo_appliance):
    response = post(admin_client, "/backup/system/config/create-download/", follow=False)

    [header] = configbackup.backup_list()
    assert response["Content-Disposition"] == f'attachment; filename="{header.name}"'
    assert (
        b"".join(response.streaming_content) == configbackup.backup_path(header.name).read_bytes()
    )


def test_upload_of_a_good_backup_keeps_it(admin_client, demo_appliance, admin_user):
    header = _make(admin_user, comment="from elsewhere")
    data = configbackup.backup_path(header.name).read_bytes()
    configbackup.backup_delete(header.name)

    html = _upload(admin_client, data).content.decode()

    [kept] = configbackup.backup_list()
    assert "uploaded." in html and kept.comment == "from elsewhere" and kept.trigger == "upload"
    assert configbackup.backup_path(kept.name).read_bytes() == data


HOSTILE = {
    "wrong type": (lambda good: b"%PDF-1.4 not a backup at all", "not an LMI configuration backup"),
    "truncated": (lambda good: good[: len(good) // 2], "truncated"),
    "tampered checksum": (archives.tampered, ""),
    "XXE": (lambda good: archives.with_xml(good, archives.XXE), ""),
    "billion laughs": (lambda good: archives.with_xml(good, archives.BILLION_LAUGHS), ""),
    "not well formed XML": (lambda good: archives.with_xml(good, b"<a><b></a>"), ""),
    "dot-dot path": (lambda good: archives.with_member(good, "files/../../etc/passwd"), ".."),
    "absolute path": (lambda good: archives.with_member(good, "/etc/passwd"), "absolute"),
    "symlink": (archives.with_symlink, "link"),
    "unexpected member": (lambda good: archives.with_member(good, "evil.sh"), "not part of"),
    "newer firmware": (archives.newer_firmware, "9.9.9.9"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_upload_is_refused_with_a_clear_message_and_nothing_kept(
    admin_client, demo_appliance, admin_user, kind
):
    good_header = _make(admin_user)
    good = configbackup.backup_path(good_header.name).read_bytes()
    configbackup.backup_delete(good_header.name)
    build, expected = HOSTILE[kind]
    before = tree_bytes(demo_appliance, "etc")

    html = _upload(admin_client, build(good), name="evil.lmibak").content.decode()

    assert "The file was refused:" in html
    assert expected in html
    assert backup_files(demo_appliance) == []
    assert tree_bytes(demo_appliance, "etc") == before
    refused = Event.objects.filter(severity=Severity.ERROR, message__contains="refused")
    assert refused.exists()


def test_an_oversized_upload_is_refused(admin_client, demo_appliance, monkeypatch):
    monkeypatch.setattr(configbackup, "MAX_BACKUP_BYTES", 1024)

    html = _upload(admin_client, b"LMIBAK1\n" + b"\0" * 4096).content.decode()

    assert "too large" in html and backup_files(demo_appliance) == []


def test_compare_shows_the_differences_by_section(admin_client, demo_appliance, admin_user):
    header = _make(admin_user)
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))

    html = admin_client.get(f"/backup/system/config/{header.name}/compare/").content.decode()

    assert 'data-testid="diff-item"' in html and "2626" in html


def test_compare_of_an_encrypted_backup_asks_the_passphrase(
    admin_client, demo_appliance, admin_user
):
    header = _make(admin_user, passphrase=SECRET)
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    url = f"/backup/system/config/{header.name}/compare/"

    assert 'data-testid="passphrase-form"' in admin_client.get(url).content.decode()
    wrong = post(admin_client, url, {"passphrase": "not the one"}).content.decode()
    assert "passphrase is wrong" in wrong
    right = post(admin_client, url, {"passphrase": SECRET}).content.decode()
    assert "2626" in right and 'data-testid="diff-item"' in right


def test_restore_confirm_page_then_restore(admin_client, demo_appliance, admin_user):
    header = _make(admin_user)
    before = tree_bytes(demo_appliance, "etc", "mailsec")
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    url = f"/backup/system/config/{header.name}/restore/"

    page = admin_client.get(url).content.decode()
    assert "2626" in page and 'data-testid="restore-submit"' in page

    html = post(admin_client, url, {"action": "restore"}).content.decode()

    assert f"Configuration backup {header.name} restored" in html
    assert tree_bytes(demo_appliance, "etc", "mailsec") == before


def test_restore_with_a_wrong_passphrase_changes_nothing(admin_client, demo_appliance, admin_user):
    header = _make(admin_user, passphrase=SECRET)
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    before = tree_bytes(demo_appliance, "etc")
    url = f"/backup/system/config/{header.name}/restore/"

    html = post(admin_client, url, {"action": "restore", "passphrase": "not the one"}).content
    html = html.decode()

    assert "The backup was not restored, nothing changed" in html
    assert "passphrase is wrong" in html
    assert tree_bytes(demo_appliance, "etc") == before
    failed = Event.objects.get(severity=Severity.ERROR, category=Category.BACKUP)
    assert "not the one" not in str(failed.details) and "not the one" not in failed.message


def test_restore_preview_of_an_encrypted_backup_shows_the_differences(
    admin_client, demo_appliance, admin_user
):
    header = _make(admin_user, passphrase=SECRET)
    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    url = f"/backup/system/config/{header.name}/restore/"

    html = post(admin_client, url, {"action": "preview", "passphrase": SECRET}).content.decode()

    assert "2626" in html and 'data-testid="restore-submit"' in html
    assert read_smtp_settings().listen_port == 2626  # a preview restores nothing


def test_delete(admin_client, demo_appliance, admin_user):
    header = _make(admin_user)

    html = post(admin_client, f"/backup/system/config/{header.name}/delete/").content.decode()

    assert f"Configuration backup {header.name} deleted." in html
    assert configbackup.backup_list() == []


def test_schedule_settings(admin_client, demo_appliance):
    data = {"scheduled_hour": "5", "keep_last": "14"}  # the checkbox unticked: off
    html = post(admin_client, "/backup/system/config/schedule/", data).content.decode()

    row = BackupSettings.objects.get(pk=1)
    assert (row.scheduled_enabled, row.scheduled_hour, row.keep_last) == (False, 5, 14)
    assert "Scheduled configuration backups: off." in html
    assert '<label for="id_scheduled_hour">at hour (UTC)</label>' in html  # the beat's clock

    bad = post(
        admin_client, "/backup/system/config/schedule/", {"scheduled_hour": "24", "keep_last": "91"}
    )
    assert BackupSettings.objects.get(pk=1).scheduled_hour == 5
    assert "less than or equal to 23" in bad.content.decode()


def test_system_create_starts_a_job_and_the_panel_polls(
    admin_client, demo_appliance, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        html = post(admin_client, "/backup/system/image/create/").content.decode()

    job = Job.objects.get()
    assert job.state == JobState.QUEUED and len(callbacks) == 1
    assert "Creating the system backup image." in html
    assert 'hx-trigger="every 1s"' in html
    partial = admin_client.get("/backup/system/image/").content.decode()
    assert 'hx-trigger="every 1s"' in partial and "Queued" in partial

    again = post(admin_client, "/backup/system/image/restore/").content.decode()
    assert "already in progress" in again
    assert Job.objects.count() == 1


def test_the_panel_stops_polling_when_the_job_ended(admin_client, demo_appliance):
    job = Job.objects.create(kind="system_backup", title="System backup", requested_by="admin")
    run_job(job.pk)

    partial = admin_client.get("/backup/system/image/").content.decode()

    assert "hx-trigger" not in partial and 'data-testid="job-done"' in partial


def test_read_only_users_see_everything_and_change_nothing(
    readonly_client, demo_appliance, admin_user
):
    header = _make(admin_user)
    html = readonly_client.get(PAGE).content.decode()
    assert f'data-testid="backup-{header.name}"' in html
    assert 'data-testid="create-backup"' not in html and 'data-testid="system-create"' not in html
    assert 'data-testid="delete"' not in html
    assert "Daily at 02:00 UTC, keeping the last 7." in html
    assert readonly_client.get(f"/backup/system/config/{header.name}/download/").status_code == 200
    assert readonly_client.get(f"/backup/system/config/{header.name}/compare/").status_code == 200

    token = csrf(readonly_client)
    for url, data in [
        ("/backup/system/config/create/", {"comment": "x"}),
        ("/backup/system/config/create-download/", {}),
        ("/backup/system/config/upload/", {}),
        ("/backup/system/config/schedule/", {"scheduled_hour": "1", "keep_last": "1"}),
        (f"/backup/system/config/{header.name}/restore/", {"action": "restore"}),
        (f"/backup/system/config/{header.name}/delete/", {}),
        ("/backup/system/image/create/", {}),
        ("/backup/system/image/restore/", {}),
    ]:
        assert readonly_client.post(url, data, **token).status_code == 403, url
    assert [h.name for h in configbackup.backup_list()] == [header.name]
    assert list(Job.objects.values_list("kind", flat=True)) == ["config_backup"]  # the fixture's


def test_login_is_required(demo_appliance):
    client = Client()
    for url in (PAGE, "/backup/system/image/", "/backup/system/config/x.lmibak/download/"):
        response = client.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"], url


def _altered_upload(client, admin_user) -> str:
    """A backup made here, one list address added and its checksums recomputed, uploaded."""
    made = _make(admin_user)
    data = configbackup.backup_path(made.name).read_bytes()
    header, members = archives.split(data)
    members["files/etc/mailsec/lists/blocked_senders.txt"] += b"partner@example.net\n"
    _upload(client, archives.join(header, members))
    return next(h.name for h in configbackup.backup_list() if h.trigger == "upload")


def test_an_unverified_backup_lists_its_files_and_restores_only_once_confirmed(
    admin_client, demo_appliance, admin_user
):
    name = _altered_upload(admin_client, admin_user)
    listing = admin_client.get(PAGE).content.decode()
    assert 'data-testid="unverified"' in listing
    url = f"/backup/system/config/{name}/restore/"
    page = admin_client.get(url).content.decode()
    assert "This backup is unverified" in page
    assert 'data-testid="unverified-write">/etc/mailsec/lists/blocked_senders.txt' in page
    assert 'name="confirm_unverified"' in page
    before = tree_bytes(demo_appliance, "etc")
    files = ["etc/mailsec/lists/blocked_senders.txt"]

    html = post(admin_client, url, {"action": "restore", "confirm_file": files}).content.decode()
    assert "nothing changed" in html and "unverified" in html
    assert tree_bytes(demo_appliance, "etc") == before

    html = post(
        admin_client,
        url,
        {"action": "restore", "confirm_file": files, "confirm_unverified": "yes"},
    ).content.decode()
    assert f"Configuration backup {name} restored" in html
    lists = (demo_appliance / "etc/mailsec/lists/blocked_senders.txt").read_text()
    assert lists.endswith("partner@example.net\n")
    event = Event.objects.filter(message__contains=f"backup {name} restored").get()
    assert "unverified" in event.message
    assert event.details["confirmed_files"] == files


def test_a_backup_made_here_shows_as_verified(admin_client, demo_appliance, admin_user):
    header = _make(admin_user)
    page = admin_client.get(f"/backup/system/config/{header.name}/restore/").content.decode()
    assert "made by this appliance and unchanged" in page
    assert 'name="confirm_unverified"' not in page
