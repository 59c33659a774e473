"""/api/v1/backups: list, create, download, upload, diff, restore, delete, the system image;
read-only tokens can only read."""

from __future__ import annotations

from dataclasses import replace

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from appliance.config import configbackup
from appliance.config.store import read_smtp_settings, write_smtp_settings
from backups import services
from jobs.models import Job
from jobs.tasks import run_job

pytestmark = pytest.mark.django_db

SECRET = "correct horse battery"
BASE = "/api/v1/backups"


def _post(client, route: str, auth: dict[str, str], data: dict | None = None):
    return client.post(f"{BASE}{route}", data or {}, content_type="application/json", **auth)


def test_create_list_diff_restore_with_a_token(client, demo_appliance, admin_token):
    created = _post(client, "/config", admin_token, {"comment": "api", "passphrase": SECRET})
    assert created.status_code == 201, created.content
    name = created.json()["name"]
    assert created.json()["encrypted"] is True

    listed = client.get(f"{BASE}/config", **admin_token).json()
    assert [b["name"] for b in listed] == [name] and listed[0]["comment"] == "api"

    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    needs = _post(client, f"/config/{name}/diff", admin_token)
    assert needs.status_code == 400 and "passphrase" in needs.json()["detail"].lower()
    wrong = _post(client, f"/config/{name}/restore", admin_token, {"passphrase": "nope nope"})
    assert wrong.status_code == 403 and "passphrase is wrong" in wrong.json()["detail"]
    assert read_smtp_settings().listen_port == 2626

    diff = _post(client, f"/config/{name}/diff", admin_token, {"passphrase": SECRET}).json()
    assert any("2626" in f"{item['before']}{item['after']}" for item in diff)
    restored = _post(client, f"/config/{name}/restore", admin_token, {"passphrase": SECRET})
    assert restored.status_code == 200 and restored.json()["files_written"] >= 1
    assert read_smtp_settings().listen_port != 2626


def test_download_upload_delete(client, demo_appliance, admin_token, admin_user):
    header = services.config_backup_create(user=admin_user)
    response = client.get(f"{BASE}/config/{header.name}/download", **admin_token)
    data = b"".join(response.streaming_content)
    assert data == configbackup.backup_path(header.name).read_bytes()

    uploaded = client.post(
        f"{BASE}/config/upload", {"file": SimpleUploadedFile("b.lmibak", data)}, **admin_token
    )
    assert uploaded.status_code == 201, uploaded.content
    refused = client.post(
        f"{BASE}/config/upload", {"file": SimpleUploadedFile("x.lmibak", b"junk")}, **admin_token
    )
    assert (
        refused.status_code == 422 and "not an LMI configuration backup" in refused.json()["detail"]
    )
    assert len(configbackup.backup_list()) == 2

    deleted = client.delete(f"{BASE}/config/{header.name}", **admin_token)
    assert deleted.status_code == 204
    assert client.delete(f"{BASE}/config/{header.name}", **admin_token).status_code == 404
    assert client.get(f"{BASE}/config/nope.lmibak/download", **admin_token).status_code == 404


def test_system_image_and_jobs(client, demo_appliance, admin_token):
    status = client.get(f"{BASE}/system", **admin_token).json()
    assert status["image"]["present"] is True and status["job"] is None

    started = _post(client, "/system/create", admin_token)
    assert started.status_code == 202 and started.json()["state"] == "queued"
    job_id = started.json()["id"]
    assert _post(client, "/system/restore", admin_token).status_code == 409

    run_job(job_id)
    job = client.get(f"{BASE}/system/jobs/{job_id}", **admin_token).json()
    assert job["state"] == "succeeded" and job["bytes_done"] == job["bytes_total"] > 0
    assert client.get(f"{BASE}/system/jobs/999", **admin_token).status_code == 404


def test_read_only_tokens_can_read_but_not_change(client, demo_appliance, viewer_token, admin_user):
    header = services.config_backup_create(user=admin_user)
    assert client.get(f"{BASE}/config", **viewer_token).status_code == 200
    assert client.get(f"{BASE}/system", **viewer_token).status_code == 200
    for route in ("/config", f"/config/{header.name}/restore", "/system/create", "/system/restore"):
        assert _post(client, route, viewer_token).status_code == 403, route
    assert client.delete(f"{BASE}/config/{header.name}", **viewer_token).status_code == 403
    upload = client.post(
        f"{BASE}/config/upload", {"file": SimpleUploadedFile("b.lmibak", b"x")}, **viewer_token
    )
    assert upload.status_code == 403
    assert len(configbackup.backup_list()) == 1
    assert list(Job.objects.values_list("kind", flat=True)) == ["config_backup"]  # the fixture's


def test_the_api_needs_authentication(client, demo_appliance):
    assert client.get(f"{BASE}/config").status_code == 401


def test_an_unverified_backup_answers_409_with_its_files_until_they_are_confirmed(
    client, demo_appliance, admin_token, admin_user
):
    from tests.backups import archives

    made = services.config_backup_create(user=admin_user)
    header, members = archives.split(configbackup.backup_path(made.name).read_bytes())
    members["files/etc/HOSTNAME"] = b"elsewhere.example.com\n"
    upload = SimpleUploadedFile("x.lmibak", archives.join(header, members))
    uploaded = client.post(f"{BASE}/config/upload", {"file": upload}, **admin_token)
    assert uploaded.status_code == 201 and uploaded.json()["verified"] is False
    name = uploaded.json()["name"]

    asked = _post(client, f"/config/{name}/restore", admin_token)
    assert asked.status_code == 409, asked.content
    assert asked.json()["files"] == ["etc/HOSTNAME"]
    assert "unverified" in asked.json()["detail"]
    assert "mailsec01" in (demo_appliance / "etc/HOSTNAME").read_text()

    done = _post(
        client, f"/config/{name}/restore", admin_token, {"confirm_files": ["etc/HOSTNAME"]}
    )
    assert done.status_code == 200, done.content
    assert (demo_appliance / "etc/HOSTNAME").read_text() == "elsewhere.example.com\n"
