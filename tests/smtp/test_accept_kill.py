"""SIGKILL in the middle of concurrent mail loses nothing that was answered 250.

Eight clients send as fast as they can, clean mail and mail with a virus mixed, while the
service (the real `manage.py smtp_service` process) is killed. Every clean message a client
read a 250 for is then in the spool, whole (batches share their directory fsync: the 250 comes
only after it), every virus answered 250 is in the message store, and after a restart each
spooled message is delivered once.
"""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest

from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.mail.eicar import EICAR
from appliance.system.paths import layout
from smtp.spool import parse_spool_file, spool_list
from tests.support.message_store import store_rows
from tests.support.services import wait_for
from tests.support.smtp import (  # noqa: F401
    NextHop,
    SmtpServiceProcess,
    smtp_service,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
BEFORE_THE_KILL = 60  # answers read before the kill


def message(message_id: str, virus: bool) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "anna.schmidt@partner.example.net"
    msg["To"] = "bob.meyer@example.com"
    msg["Subject"] = "Invoice" if virus else "Re: quarterly review"
    msg["Date"] = "Tue, 01 Oct 2013 12:00:00 +0000"
    msg["Message-ID"] = message_id
    msg.set_content("Thanks, see you on Friday.")
    if virus:
        msg.add_attachment(EICAR, maintype="application", subtype="zip", filename="inv.zip")
    return msg


def message_id_of(path: Path) -> str:
    for line in parse_spool_file(path, path.read_bytes()).message.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"{path.name} has no Message-ID")


def test_every_message_answered_250_before_a_sigkill_is_kept_and_delivered_once(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    hop = NextHop()  # its port is reserved but nothing listens yet: delivery keeps failing
    smtp = read_smtp_settings()
    smtp.next_hop = hop.address
    write_smtp_settings(smtp)
    clean: list[str] = []  # Message-IDs a client read a 250 for
    viruses: list[str] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        try:
            with smtp_service.client() as connection:
                for index in range(10_000):
                    virus = index % 5 == 4
                    message_id = f"<k{number}.{index}@partner.example.net>"
                    connection.send_message(message(message_id, virus))
                    with lock:
                        (viruses if virus else clean).append(message_id)
        except (smtplib.SMTPException, OSError):
            return  # the service is gone

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(clean) + len(viruses) >= BEFORE_THE_KILL, message=smtp_service.log())
    smtp_service.kill()
    for thread in threads:
        thread.join(30)

    spooled = {message_id_of(path): path for path in spool_list()}
    assert set(clean) <= set(spooled)
    temporary = [p for p in layout().mail_spool_dir.iterdir() if p.name.startswith(".")]
    # A write the kill interrupted was never answered; the restart sweeps it away.
    quarantined = {str(row[0]) for row in store_rows("SELECT message_id FROM quarantined_message")}
    assert set(viruses) <= quarantined

    hop.start()
    try:
        smtp_service.start()  # the same port, the same spool
        wait_for(lambda: spool_list() == [], message=smtp_service.log())
        smtp_service.stop()  # give a duplicate every chance to show up first
        delivered = [
            line.split(b":", 1)[1].strip().decode()
            for received in hop.messages
            for line in received.content.split(b"\r\n")
            if line.lower().startswith(b"message-id:")
        ]
        assert sorted(delivered) == sorted(spooled)
        assert not [p for p in temporary if p.exists()]
    finally:
        hop.stop()
