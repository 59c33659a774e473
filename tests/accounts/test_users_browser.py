"""System > Users in a real Chromium: an administrator adds a read-only user, who logs in and
meets no button that would fail for them."""

from __future__ import annotations

import pytest

from tests.support.browser import log_in, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PASSWORD = "quiet harbour lantern 7"
ADMIN_BUTTONS = ("add-user", "change-role", "disable", "reset-password", "delete", "create-backup")


def test_an_administrator_adds_a_read_only_user_who_sees_no_admin_buttons(
    admin_page, csp_errors, demo_appliance, admin_user
):
    from backups import services

    services.config_backup_create(user=admin_user)
    page = admin_page
    page.goto("/system/users/")
    page.get_by_test_id("add-user").click()
    page.fill("#id_username", "carol")
    page.get_by_label("Read-only").check()
    page.fill("#id_password", PASSWORD)
    page.fill("#id_password_again", PASSWORD)
    page.get_by_test_id("user-submit").click()
    page.get_by_text("User carol added (Read-only).").wait_for()
    assert "Read-only" in page.get_by_test_id("user-carol").inner_text()
    screenshot(page, "users-admin")
    assert csp_errors == []

    page.get_by_role("button", name="Log out").click()
    log_in(page, "carol", PASSWORD)
    assert "(Read-only)" in page.get_by_test_id("current-user").inner_text()
    for url in ("/system/users/", "/backup/system/"):
        page.goto(url)
        for testid in ADMIN_BUTTONS:
            assert page.get_by_test_id(testid).count() == 0, (url, testid)
        assert "Your account is read-only" in page.get_by_test_id("read-only-note").inner_text()
    screenshot(page, "users-read-only")
