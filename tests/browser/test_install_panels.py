"""The Install page's issue-18 panels in a real Chromium, on a phone (390x844) and a desktop
(1280x800): the last install's validation summary, Install at a time, and Rehearse, plus the
run page with the whole validation report.

Nothing in them may be wider than the window (a table scrolls inside its own box, on purpose,
and is measured as that box), and the browser logs no error. Screenshots go to
LMI_SCREENSHOT_DIR (tests.support.browser.screenshot) for a person to look at.

The data is real where it can be: the demo vendor's bundle downloaded and verified, a
rehearsal run as the worker runs it, the report's message and policy checks measured on the
demo appliance. The install run itself is a row with its report (a real install is
tests/browser/test_install.py's, minutes long); its SMTP check is written failed, with a long
summary, so the failed layout is the one looked at.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from appliance.config import policyproof
from appliance.firmware import validationfile
from appliance.mail import msgproof
from tests.support.browser import log_in, screenshot
from tests.support.users import ADMIN_PASSWORD
from tests.upgrades.conftest import (
    ready_firmware,  # noqa: F401
    rehearse_here,
)
from upgrades import rehearsal, schedule, validation, validation_checks
from upgrades.models import Download, InstallRun, InstallState

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SIZES = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 800}}
PANELS = '[data-testid="latest-validation"], #schedule, #rehearsal, #validation'

# Every element of the panels whose box leaves the window, unless an ancestor inside the panel
# clips or scrolls it (then that ancestor is the one measured; the panel's own overflow-x, the
# stylesheet's last resort, does not count: what it hides is what this looks for).
TOO_WIDE = """(selector) => {
  const width = window.innerWidth, found = [];
  for (const root of document.querySelectorAll(selector)) {
    for (const el of [root, ...root.querySelectorAll('*')]) {
      let boxed = false;
      for (let up = el.parentElement; el !== root && up !== root; up = up.parentElement) {
        if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(up).overflowX)) {
          boxed = true;
          break;
        }
      }
      const box = el.getBoundingClientRect();
      if (!boxed && box.width > 0 && (box.right > width + 1 || box.left < -1)) {
        found.push(`${el.tagName.toLowerCase()}.${el.className} ${el.dataset.testid || ''}`
                   + ` ${Math.round(box.left)}..${Math.round(box.right)}`);
      }
    }
  }
  return found;
}"""


def _succeeded_run(download: Download) -> InstallRun:
    """A finished install with its report written, as phase 10 leaves it."""
    now = timezone.now()
    run = InstallRun.objects.create(
        download=download,
        version=download.version,
        from_version="2.8.0.0",
        state=InstallState.SUCCEEDED,
        phase=10,
        started_at=now - timedelta(minutes=3),
        finished_at=now,
        downtime_started_at=now - timedelta(seconds=80),
        downtime_ended_at=now - timedelta(seconds=62),
    )
    facts = msgproof.store_facts()
    before: dict[str, Any] = {
        "maintenance_since": run.downtime_started_at.isoformat(),
        "policy": policyproof.policy_facts(),
        "policy_error": "",
    }
    checks = [
        validation.messages_check(msgproof.store_proof(facts.upto_id).as_json(), facts.messages),
        validation.policy_check(before),
        validation_checks.check_of(
            "smtp",
            False,
            "a virus test message would not be quarantined: delivered to "
            "no-such-store-anywhere-on-this-appliance-quarantine-of-viruses",
            note="The quarantine test message is sent, found in its store and deleted.",
        ),
        validation_checks.check_of("services", True, "health check passed, formats 2.8.1"),
        validation_checks.downtime_check(run, before),
    ]
    report = validation._report_of(run, checks)
    validationfile.report_write(run.pk, report)
    run.details = {validation.SUMMARY: validation.report_summary(report)}
    run.save(update_fields=["details"])
    return run


def _look(browser, live_server, name: str, urls: dict[str, list[str]]) -> None:
    """Each url at both sizes: its panels there, nothing too wide, no console error, a
    screenshot of the page."""
    for size, viewport in SIZES.items():
        context = browser.new_context(base_url=live_server.url, viewport=viewport)
        context.set_default_timeout(10_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        log_in(page, "admin", ADMIN_PASSWORD)
        for index, (url, shown) in enumerate(urls.items()):
            page.goto(url)
            page.wait_for_load_state("networkidle")
            for testid in shown:
                assert page.get_by_test_id(testid).is_visible(), (size, url, testid)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, (size, url, overflow)
            assert page.evaluate(TOO_WIDE, PANELS) == [], (size, url)
            # The whole page only: a panel that polls (a running rehearsal) is swapped for its
            # next copy every second, so a screenshot of the element itself can lose it.
            screenshot(page, f"{name}-{index}-{size}")
        assert errors == [], (size, errors)
        context.close()


def test_the_install_panels_fit_a_phone_and_a_desktop_after_a_successful_install(
    browser,
    live_server,
    admin_user,
    ready_firmware: Download,  # noqa: F811
) -> None:
    rehearse_here()
    run = _succeeded_run(ready_firmware)

    _look(
        browser,
        live_server,
        "install-panels",
        {
            "/updates/licensing/install/": [
                "latest-validation",
                "schedule",
                "schedule-suggestion",
                "rehearsal",
                "rehearsal-last",
                "rehearsal-diff",
            ],
            f"/updates/licensing/install/{run.pk}/": ["validation", "validation-checks"],
        },
    )


def test_the_panels_fit_while_a_rehearsal_runs_and_an_install_is_scheduled(
    browser,
    live_server,
    admin_user,
    ready_firmware: Download,  # noqa: F811
) -> None:
    _succeeded_run(ready_firmware)
    schedule.schedule_set(at=timezone.now() + timedelta(hours=5), user="admin")
    rehearsal.rehearsal_start(user="admin", enqueue=False)  # queued: Cancel is offered

    _look(
        browser,
        live_server,
        "install-panels-busy",
        {
            "/updates/licensing/install/": [
                "latest-validation",
                "schedule-pending",
                "schedule-move",
                "rehearsal-active",
                "rehearsal-cancel",
            ]
        },
    )
