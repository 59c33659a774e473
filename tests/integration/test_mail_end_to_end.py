"""Mail sent with a real SMTP client shows in the console: the graphs and the tracking search."""

from __future__ import annotations

import smtplib
from datetime import timedelta
from email.message import EmailMessage

import pytest
from django.test import Client

from tests.support.clock import Clock
from tests.support.smtp import SmtpServiceProcess, smtp_service  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _message(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "anna.schmidt@partner.example.net"
    message["To"] = "j.doe@example.com"
    message["Subject"] = subject
    message["Message-ID"] = "<e2e.1@partner.example.net>"
    message["Date"] = "Thu, 26 Nov 2026 12:00:00 +0000"
    message.set_content("The quarterly figures are attached as agreed.")
    return message


def test_a_message_sent_over_smtp_appears_in_the_graphs_and_the_tracking_search(
    smtp_service: SmtpServiceProcess,  # noqa: F811
    admin_user,
    clock: Clock,
):
    console = Client()
    console.force_login(admin_user)
    # Both graphs are drawn at one stopped moment, two minutes on: the hour they cover does not
    # slide between them (on a minute boundary it would drop a minute of the demo's mail), and
    # it holds the minute the SMTP service, on the real clock, counts the message in.
    clock.travel(clock.now() + timedelta(minutes=2), tick=False)
    before = console.get("/home/graphs/?range=1h").context["graph_panel"].graphs[0]

    with smtplib.SMTP("127.0.0.1", smtp_service.port, timeout=10) as client:
        refused = client.send_message(_message("Quarterly figures e2e"))
    assert refused == {}

    after = console.get("/home/graphs/?range=1h").context["graph_panel"].graphs[0]
    received_before = sum(v or 0 for v in before.series[0].values)
    received_after = sum(v or 0 for v in after.series[0].values)
    assert received_after == pytest.approx(received_before + 1, abs=0.01)

    page = console.get(
        "/mail-security/policy/message-tracking/?sender=anna.schmidt@partner.example.net"
    ).content.decode()
    assert "Quarterly figures e2e" in page
    assert "j.doe@example.com" in page.replace("<wbr>", "")  # addresses break at "@" and "."
