"""Install in a real Chromium: the checklist, Install, all ten phases live, then the event log
and the new firmware level.

Everything is real: the demo vendor's 2.8.1.0 bundle (a whole system image) downloaded and
verified, a Celery worker running the phases, the SMTP service answering the health check, and
htmx polling the progress partial until the run ends.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.browser import screenshot
from tests.support.services import WorkerProcess
from tests.support.smtp import smtp_service  # noqa: F401
from tests.upgrades.test_install_cli import demo_281_worker  # noqa: F401
from tests.upgrades.test_install_views import roomy_disks  # noqa: F401
from upgrades.models import InstallRun, InstallState

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]


def test_install_from_the_checklist_to_the_new_firmware_level(
    admin_page,
    csp_errors: list[str],
    demo_281_worker: Callable[..., WorkerProcess],  # noqa: F811
):
    page = admin_page
    # A pause in every phase (the kill tests' checkpoint), so the page, which polls every second,
    # watches the install run: at full speed it can finish between two polls.
    worker = demo_281_worker(LMI_INSTALL_PHASE_DELAY_MS="400")
    try:
        page.goto("/updates/licensing/")
        page.get_by_test_id("install-entry").click()
        page.wait_for_url("**/updates/licensing/install/")
        checklist = page.get_by_test_id("checklist")
        for key in ("bundle", "license", "firmware", "disk-msgstore", "dhcp", "rescue", "downtime"):
            assert checklist.get_by_test_id(f"check-{key}").is_visible(), key
        assert page.get_by_test_id("check-dhcp").get_attribute("data-status") == "warn"
        screenshot(page, "install-checklist")

        page.get_by_test_id("install").click()
        page.wait_for_url("**/updates/licensing/install/*/")
        progress = page.get_by_test_id("install-progress")
        # Watch the phases go by: each one is seen running or done before the end.
        seen_done: set[int] = set()
        shot = False
        for _ in range(1200):
            for number in range(1, 11):
                row = page.get_by_test_id(f"phase-{number}")
                if row.get_attribute("data-state") == "succeeded":
                    seen_done.add(number)
            if progress.get_attribute("data-state") not in ("queued", "running", "rolling_back"):
                break
            if len(seen_done) >= 3 and not shot:
                screenshot(page, "install-running")
                shot = True
            page.wait_for_timeout(100)
        page.get_by_test_id("install-complete").wait_for(timeout=60_000)
    finally:
        worker.stop()

    run = InstallRun.objects.get()
    assert run.state == InstallState.SUCCEEDED, run.error
    assert page.get_by_test_id("install-complete").inner_text() == (
        "Upgrade complete: firmware 2.8.1.0"
    )
    assert page.locator('[data-testid^="phase-"][data-state="succeeded"]').count() == 10
    assert len(seen_done) > 1  # the page was live while the phases ran
    assert "hx-trigger" not in (progress.evaluate("e => e.outerHTML"))  # polling stopped
    assert "admin (Console)" in page.get_by_test_id("install-started-by").inner_text()
    assert page.get_by_test_id("install-log").inner_text().count("\n") > 10
    screenshot(page, "install-complete")

    page.get_by_test_id("install-events").click()
    page.wait_for_url("**/system/events/?category=update")
    events = page.locator("main").inner_text()
    assert "Install of firmware 2.8.1.0 started" in events
    screenshot(page, "install-events")

    page.goto("/home/system/")
    assert page.get_by_test_id("firmware-version").inner_text() == "2.8.1.0"
    screenshot(page, "install-home-system")
    assert csp_errors == []
