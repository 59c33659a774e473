"""The live tail in a real Chromium: htmx polls under the strict CSP, new rows appear on top."""

from __future__ import annotations

import pytest

from events.models import Category
from events.services import event_write
from tests.support.browser import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_new_matching_events_appear_on_top_until_paused(admin_page, csp_errors: list[str]) -> None:
    page = admin_page
    event_write(category=Category.CONFIG, message="Relay host set to mx.example.com")
    page.goto("/system/events/?category=config")
    assert page.get_by_test_id("live").is_visible()

    event_write(category=Category.CONFIG, message="Relay host set to mx2.example.com")
    event_write(category=Category.SMTP, message="Not a configuration event")

    newest = page.locator("table.events tr.event").first
    newest.get_by_text("Relay host set to mx2.example.com").wait_for(timeout=12_000)
    assert page.get_by_text("Not a configuration event").count() == 0
    screenshot(page, "events-live-tail")

    page.get_by_role("link", name="Pause").click()
    page.wait_for_url("**tail=0**")
    assert page.get_by_test_id("paused").is_visible()
    assert page.locator("#event-tail").count() == 0
    assert csp_errors == []
