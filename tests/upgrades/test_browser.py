"""Updates & Licensing in a real Chromium: Download, watch the bar fill, see Home say it is ready.

The whole path is real: the page's form, the Celery worker downloading from a throttled
loopback server, htmx polling the progress partial, and Home's notification poll.
"""

from __future__ import annotations

import re

import pytest

from tests.support.browser import screenshot
from upgrades.models import Download, DownloadState

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]


def test_download_fills_the_bar_and_home_says_ready_to_install(
    admin_page, csp_errors: list[str], workers, firmware
):
    page = admin_page
    firmware.offer(firmware.build(payload_bytes=4 * 1024 * 1024))
    firmware.server.rate = 1024 * 1024  # about four seconds: the bar visibly moves
    workers()
    home = page.context.new_page()
    home.goto("/home/")
    assert home.get_by_text("Firmware 2.8.1.0 is available.").is_visible()

    page.goto("/updates/licensing/")
    screenshot(page, "updates-available")
    page.get_by_test_id("download-2.8.1.0").click()
    page.wait_for_url("**/updates/licensing/")

    seen: set[float] = set()
    for _ in range(300):
        # The download's job bar, while it runs (read in one step: a poll may swap it away).
        seen.update(
            page.eval_on_selector_all(
                "[data-testid=job-progress]", "bars => bars.map(bar => bar.value)"
            )
        )
        if page.get_by_test_id("ready").count():
            break
        page.wait_for_timeout(100)
    page.get_by_test_id("ready").wait_for(timeout=60_000)
    bar = page.get_by_test_id("download-progress")
    assert page.get_by_test_id("download-percent").inner_text() == "100%"
    assert bar.get_attribute("value") == "100"
    assert any(0 < value < 100 for value in seen), seen  # it was watched filling up
    assert page.get_by_test_id("ready").inner_text() == "Firmware 2.8.1.0 is ready to install."
    assert page.get_by_role("button", name=re.compile("^Install")).count() == 0
    # The story line at the top follows the bar (it comes along with each poll), and no notice
    # beside it tells the same news again.
    story = page.get_by_test_id("update-story")
    assert story.inner_text() == "Firmware 2.8.1.0 is ready to install."
    assert story.get_attribute("data-stage") == "downloaded"
    assert "ready to install" not in page.get_by_test_id("update-notices").inner_text()
    screenshot(page, "updates-ready")

    home.get_by_text("Firmware 2.8.1.0 is ready to install.").wait_for(timeout=15_000)
    screenshot(home, "home-ready-to-install")
    assert Download.objects.get().state == DownloadState.READY
    assert csp_errors == []
