"""Every menu page fits a phone (390 px) and a desktop (1280 px): no sideways scrolling of the
whole document, and on the phone the menu sits behind a button in the top bar.

Set LMI_RESPONSIVE_SHOTS to a folder to keep full-page screenshots of both sizes for a person
to look at (they catch what the width check cannot: overlaps, cramped tables, odd breaks).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.urls import NoReverseMatch, reverse

from lmi.menus import MENUS
from tests.support.browser import log_in
from tests.support.users import ADMIN_PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
# Not in a menu, but reached from Updates & Licensing and as wide as any page.
EXTRA_PAGES = ("upgrades:install",)


def _page_urls() -> list[str]:
    """The menu pages that exist in this release (a menu item without a page is skipped)."""
    urls: list[str] = []
    names = [item.url_name for menu in MENUS for item in menu.items] + list(EXTRA_PAGES)
    for name in names:
        try:
            urls.append(reverse(name))
        except NoReverseMatch:
            continue
    return urls


def _overflow(page) -> int:
    """How many pixels the document is wider than the window (0 or less: no sideways scroll)."""
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


def _card_overflow(page) -> int:
    """How many pixels the widest of the tables a phone shows as cards (the preflight
    checklist, the event log, Message Tracking, the install's phases, the users) scrolls
    sideways."""
    return page.evaluate(
        "Math.max(0, ...[...document.querySelectorAll("
        "'table.checklist, table.events, table.tracking, table.install-phases, table.users')]"
        ".map(t => t.scrollWidth - t.clientWidth))"
    )


def _shoot(page, size: str, url: str) -> None:
    folder = os.environ.get("LMI_RESPONSIVE_SHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    name = url.strip("/").replace("/", "-") or "root"
    page.screenshot(path=f"{folder}/{size}-{name}.png", full_page=True)


def test_every_page_fits_a_phone_and_a_desktop_and_the_phone_menu_opens_from_a_button(
    browser, live_server, admin_user, demo_appliance
):
    urls = _page_urls()
    assert len(urls) >= 10
    for size, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        context = browser.new_context(base_url=live_server.url, viewport=viewport)
        context.set_default_timeout(10_000)
        page = context.new_page()
        log_in(page, "admin", ADMIN_PASSWORD)
        toggle = page.get_by_role("button", name="Menu")
        menu = page.get_by_role("navigation", name="Main menu")
        for url in urls:
            page.goto(url)
            assert _overflow(page) <= 1, (size, url, _overflow(page))
            # The tables read as cards on a phone fit whole: nothing hides to the right.
            assert _card_overflow(page) <= 1, (size, url, _card_overflow(page))
            _shoot(page, size, url)
            if url == reverse("accounts:users"):
                # A user's actions are in sight, not beyond the right edge of a sideways table.
                box = page.get_by_test_id("reset-password").first.bounding_box()
                assert box is not None and box["x"] + box["width"] <= viewport["width"], box
            if size == "desktop":
                assert menu.is_visible() and not toggle.is_visible(), url
        if size == "phone":
            assert not menu.is_visible()
            toggle.click()
            assert menu.is_visible() and toggle.get_attribute("aria-expanded") == "true"
            assert _overflow(page) <= 1
            _shoot(page, size, "menu-open")
            menu.get_by_role("link", name="Events").click()
            page.wait_for_url("**/system/events/")
            assert not menu.is_visible()
        context.close()
