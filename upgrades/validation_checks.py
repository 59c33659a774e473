"""The validation report's checks of the running mail service: accepting, delivering,
quarantining, the services healthy, the downtime as the mail service saw it.

Split from :mod:`upgrades.validation` (which records the moment mail stopped, proves the
messages and the policy objects against that record, writes the report and reads it back)
because these checks are of another kind: they ask the live service and the run's phases, not
the data the upgrade carried over, and they own the SMTP session and the spool wait that make
them slow. Both modules build a check the same way (:func:`check_of`, defined here so that
this module never needs :mod:`upgrades.validation`: imports run one way only).
"""

from __future__ import annotations

import smtplib
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings

from appliance.system import maintenance
from appliance.system.errors import ApplianceError
from upgrades.models import InstallPhase, InstallRun

DELIVERY_WAIT_S = 10.0  # how long phase 9's test message may still sit in the spool
SMTP_TIMEOUT_S = 15.0
VALIDATION_SENDER = "upgrade-validation@localhost"
TEST_RECIPIENT = "postmaster@localhost"

TITLES = {
    "messages": "Messages per message store",
    "policy": "Policy objects and their $(FILE) lists",
    "smtp": "Mail service: accepting, delivering, quarantining",
    "services": "Services healthy",
    "downtime": "Downtime seen by the mail service",
}


def check_of(
    key: str, passed: bool, summary: str, figures: dict[str, Any] | None = None, note: str = ""
) -> dict[str, Any]:
    """One check of the report as it is stored and shown (the same shape for every check)."""
    return {
        "key": key,
        "title": TITLES.get(key, "Validation report"),
        "passed": passed,
        "summary": summary,
        "figures": figures or {},
        "note": note,
    }


def _test_recipient() -> str:
    """postmaster at a local domain of the running policy: mail any client may send (phase
    9's probe passes the policy by its sender; this envelope must not). A refused one would
    be logged as a rejection."""
    from smtp import engine

    try:
        policy, _ = engine.compile_policy()
    except (ApplianceError, OSError, ValueError):
        return TEST_RECIPIENT
    domains = policy.local_domains
    if domains.names:
        return f"postmaster@{sorted(domains.names)[0]}"
    if domains.parents:
        return f"postmaster@mail{domains.parents[0]}"
    return TEST_RECIPIENT


def smtp_now() -> dict[str, Any]:
    """Open a session with the mail service and have it accept an envelope, then drop it
    (RSET): no message is written, so the store and its logs stay as they are."""
    recipient = _test_recipient()
    seen: dict[str, Any] = {
        "host": settings.SMTP_HOST,
        "port": settings.SMTP_PORT,
        "recipient": recipient,
    }
    began = time.monotonic()
    try:
        with smtplib.SMTP(
            settings.SMTP_HOST,
            settings.SMTP_PORT,
            local_hostname="localhost",
            timeout=SMTP_TIMEOUT_S,
        ) as client:
            seen["banner"] = 220  # smtplib raises on anything else at connect
            client.ehlo()
            code, reply = client.mail(VALIDATION_SENDER)
            seen["mail_from"] = code
            if code == 250:
                code, reply = client.rcpt(recipient)
                seen["rcpt_to"] = code
            seen["reply"] = reply.decode("utf-8", "replace")[:200]
            client.rset()
    except (OSError, smtplib.SMTPException) as exc:
        seen["error"] = str(exc)[:300]
    seen["ms"] = round((time.monotonic() - began) * 1000)
    seen["accepting"] = seen.get("rcpt_to") == 250
    return seen


def _probe_delivery(sender: str) -> dict[str, Any]:
    """Phase 9's test message: tracked as delivered, and out of the outgoing spool."""
    from appliance.mail import tracking
    from smtp import delivery

    found: dict[str, Any] = {"sender": sender}
    entries = tracking.tracking_page(tracking.TrackingFilter(sender=sender), limit=5).entries
    found["tracked"] = [entry.action for entry in entries]
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while True:
        waiting = [
            path.name for path in delivery.spool_list() if _spooled_from(path, sender, delivery)
        ]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    found["in_spool"] = waiting
    found["delivered"] = "delivered" in found["tracked"] and not waiting
    return found


def _spooled_from(path: Path, sender: str, delivery: Any) -> bool:
    try:
        return bool(delivery.parse_spool_file(path, path.read_bytes()).sender == sender)
    except (OSError, ValueError):
        return False


def _quarantine_route() -> dict[str, Any]:
    """Where the running policy sends a virus test message, and whether that store exists."""
    from appliance.mail import msgstore
    from smtp import engine

    try:
        policy, _ = engine.compile_policy()
        recipient = _test_recipient()
        content = (
            (
                f"From: <{VALIDATION_SENDER}>\r\nTo: <{recipient}>\r\n"
                "Subject: upgrade validation: quarantine\r\n\r\n"
            ).encode()
            + engine.EICAR
            + b"\r\n"
        )
        verdict = engine.evaluate(policy, VALIDATION_SENDER, [recipient], content)
        stores = {store.name for store in msgstore.list_stores()}
    except (ApplianceError, OSError, ValueError) as exc:
        return {"error": str(exc)[:300], "quarantined": False}
    return {
        "recipient": recipient,
        "action": verdict.action,
        "store": verdict.store,
        "store_exists": verdict.store in stores,
        "quarantined": verdict.action == "quarantined" and verdict.store in stores,
    }


def _phase_counts(run: InstallRun, number: int) -> dict[str, Any]:
    phase = InstallPhase.objects.filter(run=run, number=number).first()
    return dict(phase.counts) if phase is not None else {}


def smtp_check(run: InstallRun, seen: dict[str, Any]) -> dict[str, Any]:
    """Accepting now, phase 9's test message delivered, a virus routed to quarantine."""
    probe = str(_phase_counts(run, 9).get("probe", ""))
    delivered = _probe_delivery(probe) if probe else {"delivered": False, "error": "no probe"}
    quarantine = _quarantine_route()
    figures = {"accepting": seen, "delivery": delivered, "quarantine": quarantine}
    problems = []
    if not seen.get("accepting"):
        problems.append(
            "the mail service does not accept a message now: "
            + str(seen.get("error") or seen.get("reply") or "no answer")
        )
    if not delivered.get("delivered"):
        if not probe:
            problems.append("phase 9 recorded no test message")
        elif delivered.get("in_spool"):
            problems.append("phase 9's test message is still waiting in the outgoing spool")
        else:
            problems.append(
                f"phase 9's test message is not tracked as delivered ({delivered.get('tracked')})"
            )
    if not quarantine.get("quarantined"):
        problems.append(
            "a virus test message would not be quarantined: "
            + str(
                quarantine.get("error")
                or f"{quarantine.get('action')} to {quarantine.get('store') or 'no store'}"
            )
        )
    note = (
        "The quarantine is evaluated with the running policy against the existing message "
        "stores, not sent: a sent test message would stay in the SMTP and tracking logs. "
        "Acceptance is an envelope the service accepted and that was then dropped; delivery is "
        "phase 9's test message, tracked and out of the spool."
    )
    if problems:
        return check_of("smtp", False, "; ".join(problems), figures, note)
    return check_of(
        "smtp",
        True,
        f"accepting mail, test message delivered, a virus goes to {quarantine['store']}",
        figures,
        note,
    )


def services_check(run: InstallRun, seen: dict[str, Any]) -> dict[str, Any]:
    """What phase 9's health check saw, and the services as they are now."""
    from appliance.config import configconvert
    from appliance.mail import msgstore
    from appliance.system.facts import system_info

    health = _phase_counts(run, 9).get("health")
    figures: dict[str, Any] = {"health_check": health or "not recorded"}
    problems = []
    try:
        figures["firmware"] = system_info().firmware_version
        figures["message_store_format"] = msgstore.format_version()
        figures["configuration_format"] = configconvert.config_format()
        figures["maintenance"] = maintenance.maintenance_status() is not None
    except (ApplianceError, OSError) as exc:
        problems.append(f"the appliance cannot be read: {exc}")
    figures["smtp_banner"] = seen.get("banner")
    if health != "passed":
        problems.append("phase 9's health check did not record a pass")
    if figures.get("firmware") != run.version:
        problems.append(f"firmware level {figures.get('firmware')}, not {run.version}")
    for key in ("message_store_format", "configuration_format"):
        if key in figures and figures[key] != "2.8.1":
            problems.append(f"{key.replace('_', ' ')} {figures[key]}")
    if figures.get("maintenance"):
        problems.append("the appliance is still in maintenance mode")
    if seen.get("banner") != 220:
        problems.append(f"the mail service does not greet: {seen.get('error', 'no answer')}")
    if problems:
        return check_of("services", False, "; ".join(problems), figures)
    return check_of(
        "services",
        True,
        f"health check passed, firmware {run.version}, mail service greeting, formats 2.8.1",
        figures,
    )


def downtime_check(run: InstallRun, before: dict[str, Any]) -> dict[str, Any]:
    """From the maintenance the mail service read (421 from then on) to the leave."""
    since_text = before.get("maintenance_since")
    since = datetime.fromisoformat(since_text) if since_text else None
    ended = run.downtime_ended_at
    figures: dict[str, Any] = {
        "service_421_from": since_text,
        "accepting_again_from": ended.isoformat() if ended else None,
        "console_seconds": run.downtime_seconds,
        "drained_ms": _phase_counts(run, 3).get("drained_ms"),
    }
    if since is None or ended is None:
        return check_of(
            "downtime", False, "the start or end of the downtime was not recorded", figures
        )
    seconds = round((ended - since).total_seconds(), 3)
    figures["seconds"] = seconds
    if seconds < 0:
        return check_of("downtime", False, "the downtime ended before it began", figures)
    return check_of(
        "downtime",
        True,
        f"mail was answered 421 for {seconds:.1f} s",
        figures,
        note="Measured from the maintenance file the mail service reads on every connection "
        "(written when phase 3 began) to its removal in phase 10.",
    )
