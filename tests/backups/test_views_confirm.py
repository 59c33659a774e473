"""Backup & Restore > System: delete and system restore ask once on a confirmation page that
says what happens; a refused create keeps what was typed; read-only users meet no button."""

from __future__ import annotations

import pytest

from appliance.config import configbackup
from backups import services
from events.models import Event
from jobs.models import Job
from tests.backups.conftest import PAGE, csrf, post

pytestmark = pytest.mark.django_db


def test_delete_asks_first_then_deletes(admin_client, demo_appliance, admin_user):
    header = services.config_backup_create(user=admin_user, comment="keep me?")
    url = f"/backup/system/config/{header.name}/delete/"
    assert f'href="{url}"' in admin_client.get(PAGE).content.decode()

    page = admin_client.get(url).content.decode()

    assert "cannot be restored or downloaded afterwards" in page and "keep me?" in page
    assert 'data-testid="delete-confirm"' in page
    assert [h.name for h in configbackup.backup_list()] == [header.name]  # looking deletes nothing

    done = post(admin_client, url).content.decode()
    assert f"Configuration backup {header.name} deleted." in done
    assert configbackup.backup_list() == []
    assert Event.objects.filter(message__contains=f"{header.name} deleted").exists()


def test_system_restore_asks_first_and_the_get_starts_nothing(admin_client, demo_appliance):
    html = admin_client.get(PAGE).content.decode()
    assert 'action="/backup/system/image/restore/"' in html.split('data-testid="system-restore"')[0]

    page = admin_client.get("/backup/system/image/restore/").content.decode()

    assert "return to the image of firmware" in page and "message store is kept" in page
    assert 'data-testid="system-restore-confirm"' in page
    assert not Job.objects.exists()
    post(admin_client, "/backup/system/image/restore/")
    assert Job.objects.get().kind == "system_restore"


def test_a_refused_create_keeps_the_comment_and_shows_the_reason_by_the_field(
    admin_client, demo_appliance
):
    data = {"comment": "before the upgrade", "passphrase": "x" * 10, "passphrase_again": "y" * 10}
    response = post(admin_client, "/backup/system/config/create/", data, follow=False)

    html = response.content.decode()
    assert response.status_code == 400
    assert 'value="before the upgrade"' in html
    assert "two passphrases differ" in html.split('data-testid="create-error-passphrase_again"')[1]
    assert "x" * 10 not in html  # passphrases are not sent back
    assert configbackup.backup_list() == []


def test_read_only_users_see_notes_instead_of_buttons(readonly_client, demo_appliance, admin_user):
    header = services.config_backup_create(user=admin_user)
    html = readonly_client.get(PAGE).content.decode()
    assert 'data-testid="delete"' not in html and 'data-testid="system-restore"' not in html
    assert "an administrator creates, uploads, restores and deletes" in html
    assert "an administrator creates and restores the system backup" in html

    page = readonly_client.get(f"/backup/system/config/{header.name}/delete/").content.decode()
    assert 'data-testid="delete-confirm"' not in page
    assert "an administrator deletes configuration backups" in page
    token = csrf(readonly_client)
    url = f"/backup/system/config/{header.name}/delete/"
    assert readonly_client.post(url, **token).status_code == 403
    assert [h.name for h in configbackup.backup_list()] == [header.name]
