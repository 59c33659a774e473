"""Backup & Restore > System in a real Chromium: create a configuration backup, download it,
upload it back, compare it with the running configuration, and restore it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.config import configbackup
from appliance.config.store import read_smtp_settings, write_smtp_settings
from tests.support.browser import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_an_administrator_creates_downloads_uploads_compares_and_restores(
    admin_page, demo_appliance, tmp_path
):
    page = admin_page
    csp_errors: list[str] = []
    page.on(
        "console",
        lambda message: (
            csp_errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    listen_port = read_smtp_settings().listen_port

    page.goto("/backup/system/")
    # Two passphrases that differ: the error sits by the field, the comment is kept.
    page.fill("#id_comment", "before the upgrade")
    page.fill("#id_passphrase", "correct horse battery")
    page.fill("#id_passphrase_again", "correct horse battery staple")
    page.get_by_test_id("create-backup").click()
    page.get_by_text("The two passphrases differ").wait_for()
    assert page.input_value("#id_comment") == "before the upgrade"
    assert page.input_value("#id_passphrase") == ""
    assert configbackup.backup_list() == []

    page.fill("#id_passphrase", "")
    page.get_by_test_id("create-backup").click()
    page.get_by_text("created.").wait_for()
    [made] = configbackup.backup_list()
    row = page.get_by_test_id(f"backup-{made.name}")
    assert "before the upgrade" in row.inner_text()

    with page.expect_download() as download_info:
        row.get_by_test_id("download").click()
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.read_bytes() == configbackup.backup_path(made.name).read_bytes()

    page.set_input_files("#id_backup_file", str(saved))
    page.get_by_test_id("upload-backup").click()
    page.get_by_text("uploaded.").wait_for()
    uploaded = next(h for h in configbackup.backup_list() if h.trigger == "upload")
    assert page.get_by_test_id(f"backup-{uploaded.name}").is_visible()
    screenshot(page, "backups-list")

    write_smtp_settings(replace(read_smtp_settings(), listen_port=2626))
    page.get_by_test_id(f"backup-{uploaded.name}").get_by_test_id("compare").click()
    page.get_by_test_id("diff-item").first.wait_for()
    assert "2626" in page.content()
    screenshot(page, "backups-compare")

    page.get_by_test_id("to-restore").click()
    page.get_by_test_id("restore-submit").click()
    page.get_by_text("restored:").wait_for()
    assert read_smtp_settings().listen_port == listen_port
    screenshot(page, "backups-restored")
    assert csp_errors == []


def test_an_unverified_backup_is_restored_after_its_files_are_confirmed(
    admin_page, demo_appliance, tmp_path
):
    from tests.backups import archives

    page = admin_page
    made = configbackup.backup_create(created_by="admin")
    header, members = archives.split(configbackup.backup_path(made.name).read_bytes())
    members["files/etc/mailsec/lists/blocked_senders.txt"] += b"partner@example.net\n"
    altered = tmp_path / "from-elsewhere.lmibak"
    altered.write_bytes(archives.join(header, members))

    page.goto("/backup/system/")
    page.set_input_files("#id_backup_file", str(altered))
    page.get_by_test_id("upload-backup").click()
    page.get_by_text("uploaded.").wait_for()
    uploaded = next(h for h in configbackup.backup_list() if h.trigger == "upload")
    row = page.get_by_test_id(f"backup-{uploaded.name}")
    assert row.get_by_test_id("unverified").is_visible()

    row.get_by_test_id("restore").click()
    files = page.get_by_test_id("unverified-files")
    assert "/etc/mailsec/lists/blocked_senders.txt" in files.inner_text()
    screenshot(page, "backups-unverified-restore")
    page.get_by_test_id("restore-submit").click()  # the box is required: nothing is sent
    assert "restored:" not in page.content()
    page.get_by_test_id("confirm-unverified").check()
    page.get_by_test_id("restore-submit").click()
    page.get_by_text("restored:").wait_for()
    lists = demo_appliance / "etc/mailsec/lists/blocked_senders.txt"
    assert lists.read_text().endswith("partner@example.net\n")
