"""Playwright driving Debian's chromium for browser tests (never a downloaded browser).

`make test` installs chromium when it is missing (scripts/ensure-chromium). Without it browser
tests skip on a developer's machine, and fail under CI=true so a green CI always means the pages
were really driven.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import AbstractBaseUser

from tests.support.users import ADMIN_PASSWORD, READONLY_PASSWORD

SCREENSHOT_DIR = Path(os.environ.get("LMI_SCREENSHOT_DIR", "var/screenshots"))


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LMI_CHROMIUM"), "/usr/bin/chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    path = chromium_path()
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # Playwright's sync API runs an event loop in this thread; Django's ORM then refuses to run
    # in it unless told that this is a test process doing it on purpose.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=path, args=["--disable-gpu"])
        yield instance
        instance.close()


@pytest.fixture
def page(browser, live_server) -> Iterator[object]:
    """A fresh browser context (no cookies) on the live test server."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(10_000)
    new_page = context.new_page()
    yield new_page
    context.close()


def log_in(page, username: str, password: str) -> None:
    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


@pytest.fixture
def admin_page(page, admin_user: AbstractBaseUser):
    """A page logged in as the administrator through the real login form."""
    log_in(page, "admin", ADMIN_PASSWORD)
    return page


@pytest.fixture
def readonly_page(page, readonly_user: AbstractBaseUser):
    log_in(page, "viewer", READONLY_PASSWORD)
    return page


@pytest.fixture
def csp_errors(admin_page) -> list[str]:
    """What the Content Security Policy refused on the administrator's page from here on (the
    login form already behind it); a test ends with ``assert csp_errors == []``."""
    errors: list[str] = []
    admin_page.on(
        "console",
        lambda message: (
            errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return errors


def screenshot(page, name: str) -> Path:
    """Keep a screenshot of what the test saw, for a person to look at afterwards."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
