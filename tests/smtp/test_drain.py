"""Phase 3's drain ends when the mail service says so, not after a fixed second.

The real service (``manage.py smtp_service``) marks a maintenance drained as soon as none of
its connections is inside a transaction: at once when idle, after the last DATA otherwise.
"""

from __future__ import annotations

import time

import pytest

from appliance.system.maintenance import (
    maintenance_drained,
    maintenance_enter,
    maintenance_leave,
)
from tests.support.services import wait_for
from tests.support.smtp import PARTNER, STAFF, SmtpServiceProcess, smtp_service  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BODY = (
    f"From: <{PARTNER}>\r\nTo: <{STAFF}>\r\nSubject: in flight\r\n"
    "Message-ID: <drain.1@partner.example.net>\r\n\r\nStill arriving.\r\n"
).encode()


def test_an_idle_service_says_drained_within_milliseconds(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    began = time.monotonic()
    state = maintenance_enter("Firmware upgrade, phase 3", by="admin")
    wait_for(lambda: maintenance_drained(state), timeout=5.0, interval=0.005)
    assert time.monotonic() - began < 1.0  # the fixed drain this replaces was 1 s
    maintenance_leave()


def test_drained_comes_only_after_the_data_in_flight_is_answered(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    client = smtp_service.client()
    try:
        client.ehlo()
        assert client.mail(PARTNER)[0] == 250
        assert client.rcpt(STAFF)[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354  # the message is on its way
        state = maintenance_enter("Firmware upgrade, phase 3", by="admin")
        time.sleep(0.2)  # twenty of the service's looks: it must not call this drained
        assert not maintenance_drained(state)
        client.send(BODY + b".\r\n")
        code, reply = client.getreply()
        # Finished (on disk) or refused at its end: either way nothing of it is left open.
        assert code in (250, 421), reply
        wait_for(lambda: maintenance_drained(state), timeout=5.0, interval=0.005)
        assert maintenance_drained(state)  # the mark stays while this maintenance lasts
    finally:
        client.close()
        maintenance_leave()
