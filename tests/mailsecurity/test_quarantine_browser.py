"""An administrator opens a quarantined message from Message Tracking, releases it, and the list
shows it released, in a real Chromium (issue 16)."""

from __future__ import annotations

import pytest

from tests.support.browser import screenshot
from tests.support.smtp import NextHop

from .test_quarantine import quarantine

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_an_administrator_releases_a_quarantined_message_from_the_list(
    store_root,
    hop: NextHop,
    admin_page,
    csp_errors,
) -> None:
    page = admin_page
    message_id = quarantine("Cheap watches")
    page.set_viewport_size({"width": 1280, "height": 800})

    page.goto("/mail-security/policy/message-tracking/?action=quarantined")
    row = page.locator(f"tr:has(input[value='{message_id}'])").first
    assert "Kept" in row.get_by_test_id("stored-copy").inner_text()
    row.get_by_role("link", name="Cheap watches").click()
    page.wait_for_url(f"**/quarantine/{message_id}/")
    assert "In quarantine" in page.get_by_test_id("message-status").inner_text()
    assert page.get_by_test_id("message-headers").get_by_text("Subject").count() == 1
    screenshot(page, "quarantine-detail-1280")

    page.get_by_test_id("release-link").click()
    confirm = page.get_by_test_id("confirm-rows")
    assert "Delivered to anna@example.com, ben@example.com" in confirm.inner_text()
    screenshot(page, "quarantine-confirm-1280")
    page.get_by_test_id("confirm-button").click()
    page.wait_for_url(f"**/quarantine/{message_id}/")

    assert "Released 1 message." in page.locator(".flash").inner_text()
    assert "Released" in page.get_by_test_id("message-status").inner_text()
    assert page.get_by_test_id("release-link").count() == 0
    assert len(hop.messages) == 1

    page.goto("/mail-security/policy/message-tracking/?action=quarantined")
    released = page.locator(f"tr:has(input[value='{message_id}'])")
    assert released.count() == 2  # one row per recipient, both show the release
    assert all(
        "Released" in text for text in released.get_by_test_id("stored-copy").all_inner_texts()
    )
    screenshot(page, "quarantine-tracking-1280")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "quarantine-tracking-390")
    page.goto(f"/mail-security/quarantine/{message_id}/")
    screenshot(page, "quarantine-detail-390")
    assert csp_errors == []
