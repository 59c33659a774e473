"""The validation report's checks of the running mail service: accepting, delivering,
quarantining, the services healthy, the downtime as the mail service saw it.

Split from :mod:`upgrades.validation` (which records the moment mail stopped, proves the
messages and the policy objects against that record, writes the report and reads it back)
because these checks are of another kind: they ask the live service and the run's phases, not
the data the upgrade carried over, and they own the SMTP sessions and the spool wait that make
them slow. Both modules build a check the same way (:func:`check_of`, defined here so that
this module never needs :mod:`upgrades.validation`: imports run one way only).

The quarantine is proved by sending (:func:`quarantine_now`): one test message carrying the
EICAR test file goes through the running mail service as any client's would, is looked up in
Message Tracking and in its message store (its body read back, so checked against its own
digest in the 2.8.1 format), then deleted by Mail Security's own deletion. Its Message-ID and
subject name the install run, so a copy an earlier attempt of phase 10 left behind (a worker
killed between the send and the deletion) is found and deleted too. What stays, on every
install, is what any deleted quarantine leaves: its rows in the SMTP and tracking logs, the
minute's processing figures, the virus event of the mail service and the deletion's event.
"""

from __future__ import annotations

import email.policy
import secrets
import smtplib
import sqlite3
import time
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.utils import timezone

from appliance.mail.eicar import EICAR
from appliance.system import maintenance
from appliance.system.errors import ApplianceError
from upgrades.models import InstallPhase, InstallRun

if TYPE_CHECKING:
    from appliance.mail.quarantine import QuarantinedCopy
    from appliance.mail.tracking import TrackingEntry

DELIVERY_WAIT_S = 10.0  # how long phase 9's test message may still sit in the spool
SMTP_TIMEOUT_S = 15.0
VALIDATION_SENDER = "upgrade-validation@localhost"
TEST_RECIPIENT = "postmaster@localhost"
# The quarantine test message of one install run: its subject (what an administrator sees in
# Message Tracking, and what finds it there) and the start of its Message-ID (each send adds a
# token of its own, so an attempt finds its own copy and not an earlier attempt's).
QUARANTINE_SUBJECT = "upgrade validation: quarantine test [install run {run}]"
QUARANTINE_MARK = "<upgrade-validation.run-{run}."

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


def check_of_problems(
    key: str, problems: list[str], passed: str, figures: dict[str, Any], note: str = ""
) -> dict[str, Any]:
    """A check that fails on any of the problems found (all of them its summary) and else
    passes with ``passed``: how a check that collects problems comes to its verdict. ``note``
    says what a pass does not cover, so it goes with the pass only."""
    if problems:
        return check_of(key, False, "; ".join(problems), figures)
    return check_of(key, True, passed, figures, note)


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
    seen.update(_session(recipient))
    seen["accepting"] = seen.get("rcpt_to") == 250
    return seen


def _session(recipient: str, raw: bytes | None = None) -> dict[str, Any]:
    """One session with the mail service, as any client opens it: the envelope, then ``raw``
    as the message, or RSET when there is none (nothing is written). Each reply's code, the
    last reply, and how long it took (``smtp_ms``)."""
    seen: dict[str, Any] = {}
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
            if code == 250 and raw is not None:
                code, reply = client.data(raw)
                seen["data"] = code
            seen["reply"] = f"{code} {reply.decode('utf-8', 'replace')}"[:200]
            if raw is None or code != 250:
                client.rset()
    except (OSError, smtplib.SMTPException) as exc:
        seen["error"] = str(exc)[:300]
    seen["smtp_ms"] = round((time.monotonic() - began) * 1000)
    return seen


def _probe_delivery(sender: str) -> dict[str, Any]:
    """Phase 9's test message: tracked as delivered, and out of the outgoing spool."""
    from appliance.mail import tracking
    from smtp import spool

    found: dict[str, Any] = {"sender": sender}
    entries = tracking.tracking_page(tracking.TrackingFilter(sender=sender), limit=5).entries
    found["tracked"] = [entry.action for entry in entries]
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while True:
        waiting = [path.name for path in spool.spool_list() if _spooled_from(path, sender, spool)]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    found["in_spool"] = waiting
    found["delivered"] = "delivered" in found["tracked"] and not waiting
    return found


def _spooled_from(path: Path, sender: str, spool: Any) -> bool:
    try:
        return bool(spool.parse_spool_file(path, path.read_bytes()).sender == sender)
    except (OSError, ValueError):
        return False


def _quarantine_message(run_id: int, recipient: str) -> tuple[str, bytes]:
    """Run ``run_id``'s test message and its Message-ID: the EICAR test file in a base64
    attachment, the path a real virus takes through the MIME scan (the raw string would be
    found without decoding anything)."""
    message_id = f"{QUARANTINE_MARK.format(run=run_id)}{secrets.token_hex(6)}@localhost>"
    message = EmailMessage()
    message["From"] = VALIDATION_SENDER
    message["To"] = recipient
    message["Subject"] = QUARANTINE_SUBJECT.format(run=run_id)
    message["Message-ID"] = message_id
    message["Date"] = format_datetime(timezone.now())
    message.set_content(
        "The validation report after an upgrade sent this message to prove that the mail "
        "service quarantines a virus. It is deleted from its message store at once.\n"
    )
    message.add_attachment(
        EICAR, maintype="application", subtype="octet-stream", filename="eicar.com"
    )
    return message_id, message.as_bytes(policy=email.policy.SMTP)


def _run_test_messages(run_id: int) -> list[TrackingEntry]:
    """Run ``run_id``'s quarantine test messages in Message Tracking, every attempt's (phase 10
    runs again after its worker died), found the way an administrator would search them."""
    from appliance.mail import tracking

    search = tracking.TrackingFilter(
        sender=VALIDATION_SENDER, subject=QUARANTINE_SUBJECT.format(run=run_id)
    )
    mark = QUARANTINE_MARK.format(run=run_id)
    entries = tracking.tracking_page(search, limit=20).entries
    return [entry for entry in entries if entry.message_id.startswith(mark)]


def _earlier_copies(run_id: int) -> list[int]:
    """The copies earlier attempts of run ``run_id`` left in the store. An id counts only while
    the copy under it is still that test message: once the store's newest message is deleted
    its id is given to the next one, so the tracking row of a test message deleted before may
    point at another sender's message now."""
    from appliance.mail import quarantine

    wanted = {
        (entry.quarantine_id, entry.message_id)
        for entry in _run_test_messages(run_id)
        if entry.stored and entry.quarantine_id is not None
    }
    copies = quarantine.quarantined_copies([quarantine_id for quarantine_id, _ in wanted])
    return sorted(
        copy.id
        for copy in copies.values()
        if (copy.id, copy.message_id) in wanted and copy.sender.lower() == VALIDATION_SENDER
    )


def _test_messages_delete(ids: list[int]) -> int:
    """Delete stored test messages with Mail Security's own deletion (one event each, the
    tracking rows kept, a copy being released left alone); how many were deleted."""
    from mailsecurity.services import quarantine_delete

    return len(quarantine_delete(ids, user=None).deleted) if ids else 0


def _copy_problem(copy: QuarantinedCopy, message_id: str, policy_store: str) -> str | None:
    """Why the stored copy is not the message sent, in the store the policy names; None when
    it is. Its body is read back: a 2.8.1 body is checked against its own digest there."""
    from appliance.mail import msgstore

    if copy.store_name != policy_store:
        return f"stored in {copy.store_name}, the policy names {policy_store}"
    stored = msgstore.message_raw(copy.id)
    if stored is None or message_id.encode() not in stored:
        return f"its copy in {copy.store_name} is not the message sent"
    return None


def quarantine_now(run_id: int) -> dict[str, Any]:
    """A virus test message through the running mail service: accepted, committed to the
    message store the policy names, then deleted again (with any copy an earlier attempt of
    run ``run_id`` left). ``quarantined`` and ``removed`` say how far it got, ``error`` why not.

    Only what the running policy would quarantine is sent: a test virus is never delivered.
    The 250 comes only once the copy is committed (:mod:`smtp.server`), so the store is read
    once, with no wait.
    """
    from appliance.mail import msgstore
    from appliance.mail.quarantine import quarantined_copies
    from mailsecurity.services import QuarantineRefused
    from smtp import engine

    began = time.monotonic()
    found: dict[str, Any] = {"quarantined": False, "removed": False}
    try:
        found["removed_earlier"] = _test_messages_delete(_earlier_copies(run_id))
        recipient = _test_recipient()
        message_id, raw = _quarantine_message(run_id, recipient)
        policy, _ = engine.compile_policy()
        verdict = engine.evaluate(policy, VALIDATION_SENDER, [recipient], raw)
        found.update(recipient=recipient, message_id=message_id, policy_store=verdict.store)
        if verdict.action != "quarantined" or verdict.store is None:
            found["error"] = (
                f"the running policy would not quarantine it ({verdict.action}), so it was not sent"
            )
            return found
        found.update(_session(recipient, raw))
        if found.get("data") != 250:
            answer = found.get("error") or found.get("reply") or "no answer"
            found["error"] = f"the mail service did not accept it: {answer}"
            return found
        entry = next((e for e in _run_test_messages(run_id) if e.message_id == message_id), None)
        copy = None
        if entry is not None and entry.quarantine_id is not None:
            copy = quarantined_copies([entry.quarantine_id]).get(entry.quarantine_id)
        if copy is None or copy.message_id != message_id:
            why = f"tracked as {entry.action}" if entry is not None else "not even tracked"
            found["error"] = f"accepted, but in no message store ({why})"
            return found
        found.update(
            message=copy.id,
            store=copy.store_name,
            verdict=copy.verdict,
            store_format=msgstore.format_version(),
        )
        try:
            problem = _copy_problem(copy, message_id, verdict.store)
            found["quarantined"] = problem is None
        finally:
            # Whatever the copy turned out to be, it is not the administrator's to keep.
            found["removed"] = _test_messages_delete([copy.id]) == 1
        if not found["removed"]:
            gone = f"message {copy.id} could not be deleted again"
            problem = f"{problem}; {gone}" if problem else gone
        if problem:
            found["error"] = problem
    except (ApplianceError, OSError, ValueError, sqlite3.Error, QuarantineRefused) as exc:
        found["error"] = str(exc)[:300]
    finally:
        found["ms"] = round((time.monotonic() - began) * 1000)
    return found


def _phase_counts(run: InstallRun, number: int) -> dict[str, Any]:
    phase = InstallPhase.objects.filter(run=run, number=number).first()
    return dict(phase.counts) if phase is not None else {}


def smtp_check(run: InstallRun, seen: dict[str, Any]) -> dict[str, Any]:
    """Accepting now, phase 9's test message delivered, a virus test message quarantined."""
    probe = str(_phase_counts(run, 9).get("probe", ""))
    delivered = _probe_delivery(probe) if probe else {"delivered": False, "error": "no probe"}
    quarantine = quarantine_now(run.pk)
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
    if not (quarantine.get("quarantined") and quarantine.get("removed")):
        problems.append(
            "a virus test message was not quarantined and removed: "
            + str(quarantine.get("error") or "no reason recorded")
        )
    note = (
        "Acceptance is an envelope the service accepted and that was then dropped; delivery is "
        "phase 9's test message, tracked and out of the spool; the quarantine is a test message "
        "with the EICAR test file, sent to the service now, found in its message store and "
        "deleted from it (its lines stay in the SMTP and tracking logs, as any deleted "
        "message's do)."
    )
    if problems:
        return check_of("smtp", False, "; ".join(problems), figures, note)
    return check_of(
        "smtp",
        True,
        "accepting mail, test message delivered, a virus test message quarantined in "
        f"{quarantine['store']} and deleted again ({quarantine['ms']} ms)",
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
    return check_of_problems(
        "services",
        problems,
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
