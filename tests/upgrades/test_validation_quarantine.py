"""The validation report's quarantine proof: a virus test message really sent and removed.

The real mail service (a subprocess) serves a demo appliance whose store is already in the
2.8.1 format, as after a commit. The report sends its test message through it, finds the copy
in the message store the policy names, and deletes it with Mail Security's own deletion; an
earlier attempt's copy (a worker killed between the send and the deletion) is found by the
run's mark and deleted too, so a run never leaves one behind however often phase 10 ran. A
store that refuses the copy, or loses it, fails the check with the reason.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.utils import timezone

from appliance.mail import msgbackup, msgmigrate, msgproof, msgstore, quarantine, tracking
from appliance.mail.eicar import EICAR
from appliance.system.paths import layout
from events.models import Event
from smtp import engine
from tests.support.smtp import SmtpServiceProcess, smtp_service  # noqa: F401
from tests.upgrades.conftest import install_run_row
from upgrades import validation_checks
from upgrades.models import InstallRun, InstallState
from upgrades.validation_checks import VALIDATION_SENDER, quarantine_now

RUN = 7
OTHER_RUN = 70  # its subject and Message-ID begin like RUN's: its copy is not RUN's to delete


@pytest.fixture
def upgraded_store(demo_appliance: Path) -> Path:
    """The demo store converted to 2.8.1 (phases 2, 4 and 7) before the mail service starts."""
    msgmigrate.migrate_prepare()
    msgbackup.msgstore_backup(demo_appliance / "kept" / "msgstore-backup.db")
    msgmigrate.migrate_finish()
    return demo_appliance


@pytest.fixture
def service(
    upgraded_store: Path,
    smtp_service: SmtpServiceProcess,  # noqa: F811 - started after the conversion
    settings,
) -> Iterator[SmtpServiceProcess]:
    settings.SMTP_HOST, settings.SMTP_PORT = smtp_service.host, smtp_service.port
    assert msgstore.format_version() == "2.8.1"
    yield smtp_service


def _virus_store() -> str:
    policy, _ = engine.compile_policy()
    return policy.store_for("virus")


def _tracked(run_id: int) -> list[tracking.TrackingEntry]:
    """The run's test messages in Message Tracking, every attempt's."""
    return validation_checks._run_test_messages(run_id)


def _leave_a_copy(run_id: int) -> None:
    """What an attempt killed between the send and the deletion leaves: the copy, stored."""
    recipient = validation_checks._test_recipient()
    _, raw = validation_checks._quarantine_message(run_id, recipient)
    sent = validation_checks._session(recipient, raw)
    assert sent.get("data") == 250, sent


def _store_trigger(sql: str) -> None:
    """A fault of the message store itself, as the mail service's writer meets it."""
    conn = sqlite3.connect(layout().msgstore_db)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def _run() -> InstallRun:
    return install_run_row(InstallState.RUNNING, 10, started_at=timezone.now())


def test_the_virus_test_message_lands_in_its_store_and_is_deleted_again(
    service: SmtpServiceProcess,
) -> None:
    before = msgproof.store_facts()

    found = quarantine_now(RUN)

    assert found["quarantined"] and found["removed"], found
    assert found["data"] == 250 and found["reply"].startswith("250 ")
    assert found["store"] == found["policy_store"] == _virus_store()
    assert (found["verdict"], found["store_format"]) == ("virus", "2.8.1")
    assert found["removed_earlier"] == 0 and found["ms"] >= found["smtp_ms"] >= 0
    (entry,) = _tracked(RUN)
    assert (entry.message_id, entry.quarantine_id) == (found["message_id"], found["message"])
    assert (entry.sender, entry.verdict, entry.action) == (
        VALIDATION_SENDER,
        "virus",
        "quarantined",
    )
    assert not entry.stored  # deleted: the administrator's quarantine is as it was
    assert msgproof.store_facts().counts == before.counts
    assert Event.objects.filter(
        message__startswith=f"Deleted quarantined message {found['message']} from"
    ).exists()


def test_a_copy_an_earlier_attempt_left_is_deleted_and_a_rerun_leaves_none(
    service: SmtpServiceProcess,
) -> None:
    before = msgproof.store_facts()
    _leave_a_copy(RUN)
    _leave_a_copy(OTHER_RUN)
    store = _virus_store()
    assert msgproof.store_facts().counts[store] == before.counts[store] + 2

    first = quarantine_now(RUN)
    again = quarantine_now(RUN)  # phase 10 run once more: nothing of RUN's is left to find

    assert first["quarantined"] and first["removed"] and first["removed_earlier"] == 1, first
    assert again["quarantined"] and again["removed"] and again["removed_earlier"] == 0, again
    assert [e.stored for e in _tracked(RUN)] == [False, False, False]
    assert [e.stored for e in _tracked(OTHER_RUN)] == [True]
    assert msgproof.store_facts().counts[store] == before.counts[store] + 1


def test_a_rerun_never_deletes_the_message_that_took_a_deleted_test_messages_id(
    service: SmtpServiceProcess,
) -> None:
    first = quarantine_now(RUN)
    # The next message quarantined gets the deleted test message's id (it was the newest):
    # the test message's tracking row points at that id, and Message Tracking no longer takes
    # the copy there for the test message's (its Message-ID and time differ).
    with service.client() as client:
        client.sendmail(
            "anna.schmidt@partner.example.net",
            ["bob.meyer@example.com"],
            b"Subject: a real one\r\nMessage-ID: <real@partner.example.net>\r\n\r\n"
            + EICAR
            + b"\r\n",
        )
    (entry,) = _tracked(RUN)
    assert entry.quarantine_id == first["message"] and not entry.stored

    again = quarantine_now(RUN)

    assert again["quarantined"] and again["removed"] and again["removed_earlier"] == 0, again
    kept = quarantine.quarantined_copies([first["message"]])[first["message"]]
    assert kept.message_id == "<real@partner.example.net>"


def test_a_store_that_refuses_the_copy_fails_the_check_with_the_reason(
    service: SmtpServiceProcess,
) -> None:
    _store_trigger(
        "CREATE TRIGGER refuse_test BEFORE INSERT ON quarantined_message"
        f" WHEN NEW.sender = '{VALIDATION_SENDER}'"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    before = msgproof.store_facts()

    check = validation_checks.smtp_check(_run(), validation_checks.smtp_now())

    assert not check["passed"]
    assert (
        "a virus test message was not quarantined and removed: the mail service did not accept "
        "it: 451" in check["summary"]
    ), check["summary"]
    quarantine = check["figures"]["quarantine"]
    assert not quarantine["quarantined"] and "store" not in quarantine
    assert check["figures"]["accepting"]["accepting"]  # the envelope alone was accepted
    assert msgproof.store_facts().counts == before.counts


def test_a_copy_missing_from_every_store_fails_the_check(service: SmtpServiceProcess) -> None:
    # The copy goes the moment it is tracked, as if a purge had taken it: the 250 came, the
    # message is in Message Tracking, but no message store holds it.
    _store_trigger(
        "CREATE TRIGGER lose_test AFTER INSERT ON tracking_log"
        f" WHEN NEW.sender = '{VALIDATION_SENDER}'"
        " BEGIN DELETE FROM quarantined_message WHERE id = NEW.quarantine_id; END"
    )

    found = quarantine_now(RUN)

    assert found["data"] == 250
    assert not found["quarantined"]
    assert found["error"] == "accepted, but in no message store (tracked as quarantined)"
