"""Mail Security events: a virus found or a message rejected is an event, rolled up in a flood.

The first of a kind after a quiet minute is written at once; what follows within the minute is
summed into one event per kind at the end of it (or when the service stops), so a burst of mail
costs a bounded number of events whose figures still add up to every message.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from appliance.config import policy, store
from appliance.mail.eicar import EICAR
from events.models import Category, Event, Severity
from smtp.engine import REPLY_SENDER_BLOCKED, REPLY_TOO_BIG, Verdict
from smtp.server import EVENT_ROLLUP_INTERVAL, MailService, RejectionTally
from tests.support.services import wait_for
from tests.support.smtp import SmtpServiceProcess, smtp_service  # noqa: F401

STAFF = "bob.meyer@example.com"
MALLORY = "mallory@elsewhere.test"
VIRUS = Verdict("virus", "quarantined", store="Virus quarantine", reasons=("EICAR-Test-File",))


@pytest.fixture
def service(appliance_root: Path) -> Iterator[MailService]:
    """The service's event side alone: not listening, its events collected instead of written."""
    mail_service = MailService("127.0.0.1", 0, root=appliance_root)
    written: list[tuple[str, Severity, dict[str, object], Category]] = []
    mail_service.event = lambda *args: written.append(args)  # type: ignore[method-assign]
    mail_service.written = written  # type: ignore[attr-defined]
    yield mail_service
    mail_service.work_pool.shutdown()
    mail_service._event_pool.shutdown()


def test_a_burst_of_viruses_and_rejections_is_two_events_per_kind_with_every_message(
    service: MailService,
) -> None:
    for number in range(50):
        service.mail_virus("192.0.2.7", f"sender{number}@evil.test", (STAFF,), VIRUS)
        reply = (
            REPLY_SENDER_BLOCKED.format(address=MALLORY)
            if number % 5
            else REPLY_TOO_BIG.format(limit=1000)
        )
        service.mail_rejected("192.0.2.7", MALLORY, (STAFF,), reply)
    service.report_rollups()  # the end of the minute

    events = service.written  # type: ignore[attr-defined]
    assert [(message.split()[0], category) for message, _, _, category in events] == [
        ("Virus", Category.MAIL),
        ("Mail", Category.MAIL),
        ("49", Category.MAIL),
        ("49", Category.MAIL),
    ]
    first_virus, first_rejection, viruses, rejections = events
    assert first_virus[0] == (
        "Virus EICAR-Test-File found in a message from sender0@evil.test to "
        f"{STAFF}: quarantined in Virus quarantine"
    )
    assert first_virus[1] == Severity.WARNING
    assert "(over the size limit)" in first_rejection[0]
    assert viruses[2]["messages"] == 49 and viruses[2]["viruses"] == {"EICAR-Test-File": 49}
    assert "(EICAR-Test-File: 49)" in viruses[0]
    assert rejections[2]["rejected"] == 49
    assert rejections[2]["reasons"] == {"sender on a block list": 40, "over the size limit": 9}
    assert "sender on a block list: 40, over the size limit: 9" in rejections[0]
    assert len(rejections[2]["examples"]) == 5  # examples, not all 49

    service.report_rollups()  # a quiet minute writes nothing
    assert len(service.written) == 4  # type: ignore[attr-defined]


def test_only_the_first_after_a_quiet_interval_is_written_at_once() -> None:
    tally = RejectionTally()
    example = {"reason": "x"}

    assert tally.add("x", example, now=1000.0) is True
    assert tally.add("x", example, now=1001.0) is False
    assert tally.take(now=1060.0) is not None
    # A summary was just written: the next is counted even with nothing pending...
    assert tally.add("x", example, now=1060.0 + EVENT_ROLLUP_INTERVAL - 1) is False
    assert tally.take(now=1130.0) is not None
    # ...and only a whole quiet interval after the last event is one written at once again.
    assert tally.add("x", example, now=1130.0 + EVENT_ROLLUP_INTERVAL) is True
    assert tally.take() is None


@pytest.mark.integration
@pytest.mark.slow
def test_eicar_and_a_blocked_sender_are_mail_security_events_rolled_up_in_a_burst(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    blocked = {obj.name: obj for obj in store.list_policy_objects()}["Blocked senders"]
    path = policy.object_file(blocked)
    path.write_text(path.read_text() + f"{MALLORY}\n")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "invoice@billing.test", STAFF, "Invoice 4711"
    msg.set_content("See the attachment.")
    msg.add_attachment(EICAR, maintype="application", subtype="zip", filename="invoice.zip")
    raw = msg.as_bytes(policy=SMTP)

    with smtp_service.client() as client:
        for _ in range(50):
            assert client.sendmail("invoice@billing.test", [STAFF], raw) == {}
        client.mail(MALLORY)
        for number in range(50):
            assert client.rcpt(f"user{number}@example.com")[0] == 550
    mail_events = Event.objects.filter(category=Category.MAIL).order_by("id")
    # The first of each kind at once, while the service runs.
    wait_for(lambda: mail_events.count() == 2, message=smtp_service.log())

    smtp_service.stop()  # writes what the minute counted so far

    messages = [event.message for event in mail_events]
    assert len(messages) == 4
    assert messages[0].startswith("Virus EICAR-Test-File found in a message from invoice@")
    assert messages[1].startswith(f"Mail from {MALLORY} to user0@example.com rejected (sender")
    summaries = {event.message.split(" ", 2)[1]: event.details for event in mail_events[2:]}
    assert summaries["message(s)"]["messages"] == 49
    assert summaries["rejection(s)"]["reasons"] == {"sender on a block list": 49}
