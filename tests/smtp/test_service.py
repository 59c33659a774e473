"""The real mail processing service, as a subprocess, driven with smtplib.

Each test starts `manage.py smtp_service` on a free loopback port against its own demo
appliance and the test database, exactly as `make run` starts it.
"""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from appliance.config import policy, store
from appliance.config.store import read_smtp_settings, write_smtp_settings
from appliance.mail.eicar import EICAR
from appliance.system.maintenance import maintenance_enter, maintenance_leave
from appliance.system.paths import layout
from events.models import Category, Event
from smtp.spool import parse_spool_file, spool_list
from tests.support.message_store import store_rows
from tests.support.services import wait_for
from tests.support.smtp import (  # noqa: F401
    PARTNER,
    STAFF,
    NextHop,
    SmtpServiceProcess,
    free_port,
    next_hop,
    read_banner,
    smtp_service,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def message(message_id: str, subject: str = "Re: quarterly review", **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = headers.get("sender", PARTNER)
    msg["To"] = headers.get("to", STAFF)
    msg["Subject"] = subject
    msg["Date"] = "Tue, 01 Oct 2013 12:00:00 +0000"
    msg["Message-ID"] = message_id
    msg.set_content(headers.get("body", "Thanks, see you on Friday."))
    return msg


def send(service: SmtpServiceProcess, msg: EmailMessage) -> dict[str, tuple[int, bytes]]:
    with service.client() as client:
        return client.send_message(msg)


def sink_files() -> list[Path]:
    sink = layout().mail_sink_dir
    return sorted(sink.iterdir()) if sink.is_dir() else []


def delivered_ids() -> list[str]:
    """Message-IDs of the messages in the local sink, once per file."""
    ids = []
    for path in sink_files():
        content = parse_spool_file(path, path.read_bytes()).message
        for line in content.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                ids.append(line.split(b":", 1)[1].strip().decode())
    return ids


def minute_totals() -> tuple[int, int]:
    ((received, delivered),) = store_rows(
        "SELECT coalesce(sum(received), 0), coalesce(sum(delivered), 0) FROM processing_minute"
    )
    return int(received), int(delivered)  # type: ignore[arg-type]


def set_next_hop(value: str) -> None:
    smtp = read_smtp_settings()
    smtp.next_hop = value
    write_smtp_settings(smtp)


def test_a_clean_message_is_delivered_to_the_sink_and_tracked(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    received_before, delivered_before = minute_totals()

    assert send(smtp_service, message("<clean.1@partner.example.net>")) == {}

    wait_for(
        lambda: delivered_ids() == ["<clean.1@partner.example.net>"], message=smtp_service.log()
    )
    assert spool_list() == []
    assert store_rows(
        "SELECT sender, recipient, verdict, action FROM tracking_log WHERE message_id = ?",
        "<clean.1@partner.example.net>",
    ) == [(PARTNER, STAFF, "clean", "delivered")]
    ((response,),) = store_rows("SELECT response FROM smtp_log ORDER BY id DESC LIMIT 1")
    assert str(response).startswith("250 2.0.0 Ok: queued as ")
    assert minute_totals() == (received_before + 1, delivered_before + 1)
    assert Event.objects.filter(
        category=Category.SMTP, message=f"SMTP service started on 127.0.0.1:{smtp_service.port}"
    ).exists()


def test_a_clean_message_is_relayed_to_a_loopback_next_hop(
    smtp_service: SmtpServiceProcess,  # noqa: F811
    next_hop: NextHop,  # noqa: F811
) -> None:
    set_next_hop(next_hop.address)  # read on every delivery: no restart

    send(smtp_service, message("<relay.1@partner.example.net>"))

    wait_for(lambda: next_hop.messages, message=smtp_service.log())
    (relayed,) = next_hop.messages
    assert (relayed.sender, relayed.recipients) == (PARTNER, [STAFF])
    assert relayed.content.startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"Message-ID: <relay.1@partner.example.net>" in relayed.content
    assert b"X-LMI-" not in relayed.content  # the spool's envelope lines stay behind
    wait_for(lambda: spool_list() == [])
    assert sink_files() == []


def test_eicar_in_an_attachment_is_quarantined_in_the_virus_store(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    msg = message("<virus.1@billing.test>", "Invoice 4711 overdue", sender="invoice@billing.test")
    msg.add_attachment(EICAR, maintype="application", subtype="zip", filename="invoice.zip")

    raw = msg.as_bytes(policy=SMTP)

    with smtp_service.client() as client:
        assert client.sendmail("invoice@billing.test", [STAFF], raw) == {}

    # Answered 250 only after the commit: the copy is there the moment sendmail() returns.
    ((store, verdict, stored),) = store_rows(
        "SELECT s.name, m.verdict, r.raw FROM quarantined_message m"
        " JOIN message_store s ON s.id = m.store_id"
        " JOIN quarantined_message_raw r ON r.message_id = m.id WHERE m.message_id = ?",
        "<virus.1@billing.test>",
    )
    assert (store, verdict) == ("Virus quarantine", "virus")
    assert bytes(stored).startswith(b"Received: ")  # type: ignore[arg-type]
    assert bytes(stored).endswith(raw)  # type: ignore[arg-type]
    assert store_rows(
        "SELECT verdict, action FROM tracking_log WHERE message_id = ?", "<virus.1@billing.test>"
    ) == [("virus", "quarantined")]
    assert sink_files() == [] and spool_list() == []


def test_a_sender_added_to_the_file_block_list_is_rejected_with_550(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    blocked = {obj.name: obj for obj in store.list_policy_objects()}["Blocked senders"]
    path = policy.object_file(blocked)
    path.write_text(path.read_text() + "mallory@elsewhere.test\n")  # while the service runs

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(smtp_service, message("<blocked.1@elsewhere.test>", sender="mallory@elsewhere.test"))

    code, text = refused.value.recipients[STAFF]
    assert code == 550 and b"Sender address rejected" in text
    assert store_rows(
        "SELECT sender, recipient, verdict, action FROM tracking_log ORDER BY id DESC LIMIT 1"
    ) == [("mallory@elsewhere.test", STAFF, "policy", "rejected")]
    ((response,),) = store_rows("SELECT response FROM smtp_log ORDER BY id DESC LIMIT 1")
    assert str(response).startswith("550 5.7.1")
    assert sink_files() == []


def test_maintenance_answers_421_and_the_retry_afterwards_delivers_once(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    msg = message("<maintenance.1@partner.example.net>")
    early = smtp_service.client()  # connected (and greeted) before maintenance began
    early.ehlo()
    in_flight = smtp_service.client()
    in_flight.ehlo()
    in_flight.mail(PARTNER)
    in_flight.rcpt(STAFF)

    maintenance_enter("Firmware upgrade, phase 3", by="admin")

    assert read_banner(smtp_service.host, smtp_service.port).startswith(b"421 4.3.2")
    with pytest.raises(smtplib.SMTPConnectError) as at_greeting:
        smtp_service.client()
    assert at_greeting.value.smtp_code == 421
    with pytest.raises(smtplib.SMTPSenderRefused) as at_mail:
        early.send_message(msg)
    assert at_mail.value.smtp_code == 421
    # Maintenance began in the middle of this transaction: nothing is kept.
    code, _ = in_flight.data(msg.as_bytes(policy=SMTP))
    assert code == 421
    assert sink_files() == [] and spool_list() == []
    assert store_rows("SELECT 1 FROM tracking_log WHERE message_id = ?", msg["Message-ID"]) == []

    maintenance_leave()
    assert send(smtp_service, msg) == {}  # the sender's retry

    wait_for(lambda: delivered_ids() == [msg["Message-ID"]], message=smtp_service.log())


def test_a_damaged_maintenance_file_also_means_421(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    layout().maintenance_file.write_text("{not json")
    assert read_banner(smtp_service.host, smtp_service.port).startswith(b"421")


def test_a_message_answered_250_survives_sigkill_and_is_delivered_exactly_once(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    hop = NextHop()  # its port is reserved but nothing listens yet: delivery keeps failing
    set_next_hop(hop.address)
    msg = message("<sigkill.1@partner.example.net>")

    assert send(smtp_service, msg) == {}
    smtp_service.kill()

    (spooled,) = spool_list()
    assert parse_spool_file(spooled, spooled.read_bytes()).recipients == (STAFF,)
    hop.start()
    try:
        smtp_service.start()  # the same port, the same spool
        wait_for(lambda: hop.messages, message=smtp_service.log())
        wait_for(lambda: spool_list() == [])
        # Give a duplicate every chance to show up.
        smtp_service.stop()
        assert len(hop.messages) == 1
        assert b"Message-ID: <sigkill.1@partner.example.net>" in hop.messages[0].content
    finally:
        hop.stop()


def test_sigterm_lets_a_transaction_in_flight_finish_then_refuses_new_mail(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    msg = message("<sigterm.1@partner.example.net>")
    client = smtp_service.client()
    client.ehlo()
    assert client.mail(PARTNER)[0] == 250
    assert client.rcpt(STAFF)[0] == 250

    smtp_service.terminate()
    # Once it no longer accepts connections it is stopping; DATA sent earlier could be answered
    # before the signal is handled, and the next MAIL with it.
    wait_for(lambda: not smtp_service.accepts_connections(), message=smtp_service.log())

    code, reply = client.data(msg.as_bytes(policy=SMTP))
    assert code == 250, reply
    try:
        code, reply = client.mail(PARTNER)  # a new transaction: refused, the channel closed
    except smtplib.SMTPServerDisconnected:
        code, reply = 421, b"(closed)"
    assert code == 421, reply
    assert smtp_service.wait() == 0
    assert delivered_ids() == [msg["Message-ID"]]
    assert Event.objects.filter(
        category=Category.SMTP, message=f"SMTP service stopped on 127.0.0.1:{smtp_service.port}"
    ).exists()


def test_concurrent_clients_are_all_accepted_and_logged(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    failures: list[BaseException] = []

    def client(number: int) -> None:
        try:
            with smtp_service.client() as smtp:
                for index in range(10):
                    smtp.send_message(message(f"<c{number}.{index}@partner.example.net>"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert failures == []
    wait_for(lambda: len(delivered_ids()) == 80, message=smtp_service.log())
    assert sorted(delivered_ids()) == sorted(
        f"<c{n}.{i}@partner.example.net>" for n in range(8) for i in range(10)
    )
    assert store_rows("SELECT count(*) FROM tracking_log WHERE message_id LIKE '<c%'") == [(80,)]


def set_max_message_size(size: int) -> None:
    smtp = read_smtp_settings()
    smtp.max_message_size = size
    write_smtp_settings(smtp)


def big_message(message_id: str) -> bytes:
    return message(message_id, body=("y" * 70 + "\n") * 100).as_bytes(policy=SMTP)


def test_size_is_refused_early_at_mail_from_and_at_the_end_of_data(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    set_max_message_size(5000)

    with smtp_service.client() as client:
        client.ehlo()
        assert client.has_extn("size") and client.esmtp_features["size"] == "5000"
        assert client.mail(PARTNER, ["SIZE=6000"])[0] == 552
        client.rset()
        assert client.mail(PARTNER)[0] == 250
        assert client.rcpt(STAFF)[0] == 250
        code, reply = client.data(big_message("<big.1@partner.example.net>"))

    assert code == 552 and reply.startswith(b"5.3.4")
    # Read past the limit without keeping it: logged as refused, by size alone.
    ((verdict, action, size),) = store_rows(
        "SELECT verdict, action, size FROM tracking_log ORDER BY id DESC LIMIT 1"
    )
    assert (verdict, action) == ("policy", "rejected") and int(size) > 5000  # type: ignore[arg-type]
    assert sink_files() == [] and spool_list() == []


def test_a_limit_lowered_during_a_connection_applies_to_its_next_message(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    with smtp_service.client() as client:
        client.ehlo()  # advertises the old limit
        set_max_message_size(5000)
        # A SIZE= parameter is checked against the new limit at once...
        assert client.mail(PARTNER, ["SIZE=6000"])[0] == 552
        client.rset()
        # ...and without one, the policy refuses the message at the end of DATA.
        assert client.mail(PARTNER)[0] == 250
        assert client.rcpt(STAFF)[0] == 250
        code, _ = client.data(big_message("<big.2@partner.example.net>"))

    assert code == 552
    assert store_rows(
        "SELECT verdict, action FROM tracking_log WHERE message_id = ?",
        "<big.2@partner.example.net>",
    ) == [("policy", "rejected")]
    assert sink_files() == [] and spool_list() == []


def test_a_damaged_mail_policy_defers_mail_with_451_and_says_so_once(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    tracked_before = store_rows("SELECT count(*) FROM tracking_log")
    (layout().cpe_dir / "mailsec_policy1_0.xml").write_bytes(b"<mailpolicy><rule")

    for _ in range(2):
        with smtp_service.client() as client:
            client.ehlo()
            code, _ = client.mail(PARTNER)
            assert code == 451

    wait_for(
        lambda: Event.objects.filter(
            category=Category.SMTP, message__startswith="The mail policy cannot be applied"
        ).exists()
    )
    assert (
        Event.objects.filter(message__startswith="The mail policy cannot be applied").count() == 1
    )
    assert store_rows("SELECT count(*) FROM tracking_log") == tracked_before


# --- Relay control and envelope syntax (issue 13) -------------------------------------------

SPAMMER = "spammer@evil.example"
VICTIM = "victim@gmail.com"


def sink_recipients() -> list[tuple[str, ...]]:
    return [parse_spool_file(path, path.read_bytes()).recipients for path in sink_files()]


def test_an_open_relay_attempt_is_refused_with_554_and_nothing_is_kept(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    raw = message("<relay.attempt@evil.example>", sender=SPAMMER, to=VICTIM).as_bytes(policy=SMTP)
    with smtp_service.client() as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SPAMMER, [VICTIM, "other@elsewhere.test"], raw)
        assert refused.value.recipients == {
            VICTIM: (554, b"5.7.1 <victim@gmail.com>: Relay access denied"),
            "other@elsewhere.test": (554, b"5.7.1 <other@elsewhere.test>: Relay access denied"),
        }
        # In one transaction with a local recipient, only the local one gets the message.
        client.rset()
        assert client.mail(SPAMMER)[0] == 250
        assert client.rcpt(VICTIM)[0] == 554
        assert client.rcpt(STAFF)[0] == 250
        assert client.data(raw)[0] == 250

    wait_for(lambda: sink_recipients() == [(STAFF,)], message=smtp_service.log())
    assert spool_list() == []
    denied = [
        (VICTIM, "554 5.7.1 <victim@gmail.com>: Relay access denied"),
        ("other@elsewhere.test", "554 5.7.1 <other@elsewhere.test>: Relay access denied"),
    ]
    assert store_rows(
        "SELECT recipient, response FROM smtp_log WHERE sender = ? AND recipient != ? ORDER BY id",
        SPAMMER,
        STAFF,
    ) == [*denied, denied[0]]
    assert store_rows(
        "SELECT recipient, action FROM tracking_log"
        " WHERE sender = ? AND recipient != ? ORDER BY id",
        SPAMMER,
        STAFF,
    ) == [(VICTIM, "rejected"), ("other@elsewhere.test", "rejected"), (VICTIM, "rejected")]

    # One rolled-up event for the three refusals, written at the latest when the service stops.
    smtp_service.stop()
    (event,) = Event.objects.filter(category=Category.SMTP, message__contains="Relay access denied")
    assert event.details["refused"] == 3
    assert event.details["clients"] == {"127.0.0.1": 3}
    assert event.details["examples"][0] == {
        "client": "127.0.0.1",
        "sender": SPAMMER,
        "recipient": VICTIM,
    }


def test_a_client_in_a_relay_network_may_send_to_any_domain(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    smtp = read_smtp_settings()
    smtp.relay_networks = "127.0.0.0/8"
    write_smtp_settings(smtp)  # read with the policy: no restart

    with smtp_service.client() as client:
        assert client.sendmail(STAFF, [VICTIM], message("<out.1@example.com>").as_bytes()) == {}

    wait_for(lambda: sink_recipients() == [(VICTIM,)], message=smtp_service.log())


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:spammer@evil.example", 501),  # no angle brackets
        ("MAIL FROM:<spam\x00mer@evil.example>", 553),  # a NUL byte
    ],
)
def test_a_malformed_reverse_path_is_refused(
    smtp_service: SmtpServiceProcess,  # noqa: F811
    command: str,
    code: int,
) -> None:
    with smtp_service.client() as client:
        client.ehlo()
        assert client.docmd(command)[0] == code
        # Nothing was started: a recipient is answered "need MAIL command".
        assert client.rcpt(STAFF)[0] == 503
        assert client.mail("<>")[0] == 250  # the null reverse-path of a bounce is fine

    assert spool_list() == [] and sink_files() == []


def test_the_null_path_and_malformed_forward_paths_are_refused_as_recipients(
    smtp_service: SmtpServiceProcess,  # noqa: F811
) -> None:
    with smtp_service.client() as client:
        client.ehlo()
        assert client.mail(PARTNER)[0] == 250
        assert client.docmd("RCPT TO:<>")[0] == 553
        assert client.docmd("RCPT TO:bob.meyer@example.com")[0] == 501
        assert client.docmd("RCPT TO:<bob.meyer\x00@example.com>")[0] == 553
        code, reply = client.docmd("DATA")

    assert code == 503, reply  # no valid recipient: nothing to take
    assert spool_list() == [] and sink_files() == []
