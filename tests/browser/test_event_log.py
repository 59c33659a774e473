"""Filtering the event log in a real Chromium: the filters land in the URL and narrow the rows."""

from __future__ import annotations

import pytest

from events.models import Category, Severity
from events.services import event_write
from tests.support.browser import screenshot
from tests.support.log_filters import filter_in_browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_an_administrator_filters_the_event_log_and_exports_what_is_shown(
    demo_appliance, admin_page
):
    event_write(category=Category.SMTP, message="Relay denied for 203.0.113.9")
    event_write(
        category=Category.SMTP, severity=Severity.ERROR, message="Next hop mx.example refused"
    )
    event_write(category=Category.SYSTEM, severity=Severity.ERROR, message="Disk check failed")
    page = admin_page
    filter_in_browser(
        page,
        "/system/events/",
        {"Severity": "error", "Category": "smtp"},
        button="Apply",
        lands_on="**severity=error**",
    )

    assert "category=smtp" in page.url
    rows = page.locator("#event-rows tr")
    assert rows.count() == 1
    assert "Next hop mx.example refused" in rows.first.inner_text()
    screenshot(page, "events-filtered")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export CSV").click()
    lines = download_info.value.path().read_text().splitlines()
    assert lines[0] == "time,severity,category,node,user,message,details"
    assert len(lines) == 2 and "Next hop mx.example refused" in lines[1]

    page.get_by_role("link", name="Clear filters").click()
    page.get_by_label("Text in message, user or node").fill("relay")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**q=relay**")
    assert page.locator("#event-rows tr").count() == 1
    assert "Relay denied" in page.locator("#event-rows").inner_text()


def test_a_bad_date_in_the_url_gives_a_message_not_an_error_page(demo_appliance, admin_page):
    admin_page.goto("/system/events/?since=yesterday-ish")

    assert admin_page.get_by_test_id("filter-errors").is_visible()
    assert "From" in admin_page.get_by_test_id("filter-errors").inner_text()
