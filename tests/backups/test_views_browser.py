"""Deleting a configuration backup in a real Chromium: one confirmation page, then it is gone."""

from __future__ import annotations

import pytest

from appliance.config import configbackup
from backups import services

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_delete_asks_once_on_a_confirmation_page(
    admin_page, csp_errors, demo_appliance, admin_user
):
    header = services.config_backup_create(user=admin_user, comment="old one")
    page = admin_page
    page.goto("/backup/system/")

    page.get_by_test_id(f"backup-{header.name}").get_by_test_id("delete").click()
    assert (
        "cannot be restored or downloaded afterwards"
        in page.get_by_test_id("consequences").inner_text()
    )
    assert [h.name for h in configbackup.backup_list()] == [header.name]
    page.get_by_test_id("delete-confirm").click()

    page.get_by_text(f"Configuration backup {header.name} deleted.").wait_for()
    assert page.url.endswith("/backup/system/")
    assert page.get_by_test_id("no-backups").is_visible()
    assert csp_errors == []
