"""A person's path through the console in a real Chromium: log in, open every page, log out."""

from __future__ import annotations

import re

import pytest

from events.models import Event
from tests.support.browser import log_in, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MENU_PAGES = [
    ("Home", "/home/", "Home"),
    ("System", "/home/system/", "System"),
    ("Resources", "/home/resources/", "Resources"),
    ("Events", "/system/events/", "Events"),
    ("Updates & Licensing", "/updates/licensing/", "Updates & Licensing"),
    ("System", "/backup/system/", "Backup & Restore: System"),
    ("Policy Objects", "/mail-security/policy-objects/", "Policy Objects"),
    ("Message Stores", "/mail-security/policy-objects/message-stores/", "Message Stores"),
    ("Configuration > Maintenance", "/smtp/configuration/maintenance/", "Maintenance"),
    ("Cluster", "/cluster/", "Cluster"),
]


def test_an_administrator_logs_in_and_sees_home_with_real_figures(demo_appliance, admin_page):
    page = admin_page

    assert page.url.endswith("/home/")
    assert page.get_by_test_id("firmware-version").inner_text() == "2.8.0.0"
    assert page.get_by_test_id("current-user").inner_text().startswith("admin")
    screenshot(page, "home")


def test_every_menu_page_opens_from_the_menu(demo_appliance, admin_page):
    page = admin_page
    for label, url, heading in MENU_PAGES:
        # Two menus have a "System" page (Home and Backup & Restore): the link is told by its
        # label and its address together.
        link = page.get_by_role("navigation").get_by_role("link", name=label, exact=True)
        link.and_(page.locator(f'a[href="{url}"]')).click()
        page.wait_for_url(f"**{url}")
        assert page.locator("h1").inner_text() == heading, url
        current = page.get_by_role("navigation").locator(f'a[href="{url}"]')
        assert current.get_attribute("aria-current") == "page"
        screenshot(page, "page-" + url.strip("/").replace("/", "-"))


def test_resources_shows_disks_memory_and_cpu_figures(demo_appliance, admin_page):
    page = admin_page
    page.goto("/home/resources/")

    rows = page.get_by_test_id("disks").locator("tbody tr")
    assert rows.count() == 2
    assert re.fullmatch(r"\d+\.\d%", page.get_by_test_id("free-percent").first.inner_text())
    assert re.search(r"\d", page.get_by_test_id("memory-used").inner_text())
    assert re.fullmatch(r"[\d.]+, [\d.]+, [\d.]+", page.get_by_test_id("load").inner_text())


def test_a_wrong_password_shows_a_message_and_the_login_appears_in_the_event_log(
    page, admin_user, demo_appliance
):
    page.goto("/home/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "wrong password")
    page.click("button[type=submit]")
    assert page.get_by_role("alert").inner_text() == "The user name or password is not correct."

    from tests.support.users import ADMIN_PASSWORD

    log_in(page, "admin", ADMIN_PASSWORD)
    page.goto("/system/events/")
    table = page.locator("table.data").first
    assert table.get_by_text("admin logged in").count() == 1
    assert table.get_by_text("Failed login for 'admin'").count() == 1


def test_logging_out_ends_the_session(demo_appliance, admin_page):
    page = admin_page
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/accounts/login/")

    page.goto("/home/system/")

    assert "/accounts/login/" in page.url
    assert Event.objects.filter(message="admin logged out").exists()


def test_a_read_only_user_sees_the_role_in_the_top_bar(demo_appliance, readonly_page):
    assert "(Read-only)" in readonly_page.get_by_test_id("current-user").inner_text()


def test_the_graph_range_switches_in_place_and_is_kept_in_the_url(demo_appliance, admin_page):
    page = admin_page
    assert page.get_by_test_id("chart-messages").is_visible()

    page.get_by_role("link", name="7 days").click()
    page.wait_for_url("**/home/?range=7d")

    assert page.locator(".ranges a.active").inner_text() == "7 days"
    assert "last 7 days" in page.locator("#processing-graphs figcaption").first.inner_text()
    screenshot(page, "home-graphs-7d")

    # Every interval reads on hover: a tooltip (<title>) with its counts, and a legend with totals.
    chart = page.get_by_test_id("chart-messages")
    tooltip = chart.locator(".hits rect").last.locator("title").text_content() or ""
    assert re.search(r"UTC: Messages [\d,]+; Spam [\d,]+; Virus \d+; Rejected \d+", tooltip)
    legend = page.locator("#processing-graphs .legend").first.inner_text()
    assert "Virus" in legend and "in the last 7 days" in legend
    assert page.get_by_test_id("graph-totals").is_visible()
    chart.locator(".hits rect").nth(100).hover()
    screenshot(page, "home-graphs-hover")
