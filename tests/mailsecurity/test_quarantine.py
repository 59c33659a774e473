"""Quarantined messages: the detail page, release through the real delivery path, deletion,
one by one and in bulk, for administrators only (issue 16)."""

from __future__ import annotations

import dataclasses
import threading
from html import unescape
from pathlib import Path

import pytest
from django.test import Client

from appliance.config.smtp import SmtpSettings
from appliance.config.store import write_smtp_settings
from appliance.mail import mailrecords, msgstore, tracking
from appliance.mail import quarantine as quarantine_store
from events.models import Category, Event, Severity
from mailsecurity import services
from smtp import spool
from tests.support.message_store import quarantined_spam
from tests.support.smtp import NextHop, free_port

from .conftest import NOW, MailData

pytestmark = pytest.mark.django_db

TRACKING = "/mail-security/policy/message-tracking/"
CONFIRM = "/mail-security/quarantine/confirm/"


def detail_url(message_id: int) -> str:
    return f"/mail-security/quarantine/{message_id}/"


def raw_message(subject: str) -> bytes:
    return (
        f"From: Offers <offers@promo.test>\r\nTo: anna@example.com, ben@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@promo.test>\r\n\r\n"
        f"Buy now.\r\n"
    ).encode()


def quarantine(subject: str = "Cheap watches") -> int:
    """A quarantined message written by the mail service's own store writer."""
    raw = raw_message(subject)
    quarantine_id = mailrecords.mail_record(
        quarantined_spam(
            raw,
            logged_at=int(NOW.timestamp()) - 600,
            sender="offers@promo.test",
            subject=subject,
            message_id=f"<{subject.replace(' ', '.')}@promo.test>",
            recipients=("anna@example.com", "ben@example.com"),
            client_ip="203.0.113.5",
            response="250 2.0.0 Ok: queued as 1A2B3C4D5E",
        )
    )
    assert quarantine_id is not None
    return quarantine_id


@pytest.fixture
def admin(admin_user) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def mail_events() -> list[Event]:
    return list(Event.objects.filter(category=Category.MAIL).order_by("pk"))


# --- Services --------------------------------------------------------------------------------


def test_a_release_delivers_once_through_the_next_hop_and_writes_an_event(
    mail: MailData, hop: NextHop, admin_user
) -> None:
    message_id = quarantine()

    first = services.quarantine_release([message_id], user=admin_user)
    again = services.quarantine_release([message_id], user=admin_user)

    assert [copy.id for copy in first.released] == [message_id] and not first.failed
    assert again.released == () and again.released_already == (message_id,)
    assert len(hop.messages) == 1
    delivered = hop.messages[0]
    assert delivered.sender == "offers@promo.test"
    assert delivered.recipients == ["anna@example.com", "ben@example.com"]
    assert b"Subject: Cheap watches" in delivered.content
    assert spool.spool_list() == []  # out of the spool once the next hop took it
    copy = quarantine_store.quarantined_copies([message_id])[message_id]
    assert copy.release_state == "released" and copy.released_by == "admin"
    (event,) = mail_events()
    assert event.username == "admin" and event.details["outcome"] == "released"
    assert hop.address in event.message
    entries = tracking.tracking_page(tracking.TrackingFilter(action="released")).entries
    assert {entry.recipient for entry in entries} == {"anna@example.com", "ben@example.com"}
    assert all(entry.released for entry in entries)


def test_a_kept_copy_of_delivered_mail_is_not_released_again(
    mail: MailData, hop: NextHop, admin_user, admin: Client
) -> None:
    message_id = quarantine("Minutes")
    conn = msgstore.connect()  # as the demo's Archive store keeps clean, delivered mail
    with conn:
        conn.execute("UPDATE quarantined_message SET verdict = 'clean' WHERE id = ?", (message_id,))
    conn.close()

    result = services.quarantine_release([message_id], user=admin_user)

    assert result.released == () and result.released_already == (message_id,)
    assert (
        hop.messages == []
        and quarantine_store.quarantined_copies([message_id])[message_id].held is False
    )
    page = admin.get(f"/mail-security/quarantine/{message_id}/").content.decode()
    assert "when it arrived" in page and 'data-testid="release-link"' not in page


def test_concurrent_claims_release_a_message_exactly_once(mail: MailData) -> None:
    message_id = quarantine()
    start = threading.Barrier(6)
    outcomes: list[quarantine_store.ClaimOutcome] = []

    def claim() -> None:
        start.wait()
        outcomes.append(quarantine_store.quarantine_release_claim([message_id], by="admin", now=1))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(len(outcome.claimed) for outcome in outcomes) == 1
    assert sum(len(outcome.released_already) for outcome in outcomes) == 5


def test_a_release_the_next_hop_does_not_take_stays_in_quarantine(
    mail: MailData, store_root: Path, admin_user
) -> None:
    write_smtp_settings(SmtpSettings(next_hop=f"127.0.0.1:{free_port()}"), store_root)
    message_id = quarantine()

    result = services.quarantine_release([message_id], user=admin_user)

    assert result.released == () and [copy.id for copy, _ in result.failed] == [message_id]
    assert spool.spool_list() == []  # nothing left to go out behind the admin's back
    assert quarantine_store.quarantined_copies([message_id])[message_id].release_state == ""
    (event,) = mail_events()
    assert event.severity == Severity.WARNING and "stays in quarantine" in event.message


def test_releasing_a_message_purged_by_retention_changes_nothing(
    mail: MailData, hop: NextHop, admin_user
) -> None:
    message_id = quarantine()
    mail.conn.execute("DELETE FROM quarantined_message WHERE id = ?", (message_id,))
    mail.commit()

    released = services.quarantine_release([message_id], user=admin_user)
    deleted = services.quarantine_delete([message_id], user=admin_user)

    assert released.not_stored == (message_id,) and released.released == ()
    assert deleted.not_stored == (message_id,) and deleted.deleted == ()
    assert "no longer stored" in released.summary() and "no longer stored" in deleted.summary()
    assert hop.messages == [] and spool.spool_list() == [] and mail_events() == []
    assert mail.conn.execute("SELECT count(*) FROM quarantine_release").fetchone()[0] == 0


def test_a_bulk_delete_removes_the_stored_copies_and_keeps_the_log(
    mail: MailData, admin_user
) -> None:
    first, second, purged = quarantine("One"), quarantine("Two"), quarantine("Three")
    kept = quarantine("Kept")
    mail.conn.execute("DELETE FROM quarantined_message WHERE id = ?", (purged,))
    mail.commit()
    log_rows = mail.ids("tracking_log")

    result = services.quarantine_delete([first, second, purged, first], user=admin_user)

    assert [copy.id for copy in result.deleted] == [first, second]
    assert result.not_stored == (purged,)
    assert set(quarantine_store.quarantined_copies([first, second, kept])) == {kept}
    assert msgstore.message_raw(first) is None
    assert mail.ids("tracking_log") == log_rows
    assert [event.details["message"] for event in mail_events()] == [first, second]


def test_the_services_refuse_a_read_only_user(mail: MailData, hop: NextHop, readonly_user) -> None:
    message_id = quarantine()

    for action in (services.quarantine_release, services.quarantine_delete):
        with pytest.raises(services.QuarantineRefused, match="read-only"):
            action([message_id], user=readonly_user)

    assert hop.messages == [] and mail_events() == []
    assert quarantine_store.quarantined_copies([message_id])[message_id].release_state == ""


def test_a_message_being_released_is_not_deleted(mail: MailData, admin_user) -> None:
    message_id = quarantine()
    quarantine_store.quarantine_release_claim([message_id], by="admin", now=1)

    result = services.quarantine_delete([message_id], user=admin_user)

    assert result.releasing == (message_id,) and result.deleted == ()
    assert message_id in quarantine_store.quarantined_copies([message_id])


# --- Pages -----------------------------------------------------------------------------------


def test_the_detail_page_shows_the_message_and_its_raw_download(
    mail: MailData, admin: Client
) -> None:
    message_id = quarantine()

    page = unescape(admin.get(detail_url(message_id)).content.decode())
    download = admin.get(detail_url(message_id) + "raw/")

    assert "Cheap watches" in page and "Spam quarantine" in page and "offers@promo.test" in page
    assert "anna@example.com, ben@example.com" in page
    assert 'data-testid="message-headers"' in page and "<th>Message-ID</th>" in page
    assert 'data-testid="policy-judgement"' in page or "The policy cannot be applied" in page
    assert 'data-testid="release-link"' in page and 'data-testid="delete-link"' in page
    assert download.status_code == 200
    assert download["Content-Type"] == "message/rfc822"
    assert download["Content-Disposition"] == (
        f'attachment; filename="quarantined-message-{message_id}.eml"'
    )
    assert download.content == raw_message("Cheap watches")


@pytest.mark.parametrize("message_id", ["999999", str(2**64)])
def test_a_message_no_longer_stored_is_a_404_that_says_so(
    mail: MailData, admin: Client, message_id: str
) -> None:
    for url in (detail_url(int(message_id)), detail_url(int(message_id)) + "raw/"):
        response = admin.get(url)
        assert response.status_code == 404
        assert "not in the message store" in response.content.decode()


def test_read_only_users_see_the_message_but_cannot_release_or_delete_it(
    mail: MailData, readonly_client: Client, hop: NextHop
) -> None:
    message_id = quarantine()

    page = readonly_client.get(detail_url(message_id)).content.decode()
    confirm = readonly_client.get(CONFIRM, {"action": "release", "id": message_id})
    tracking_page = readonly_client.get(TRACKING).content.decode()
    readonly_client.get(TRACKING)  # the CSRF cookie, so the refusal is the role's, not CSRF's
    token = readonly_client.cookies["csrftoken"].value
    posts = [
        readonly_client.post(
            CONFIRM, {"action": action, "id": message_id, "csrfmiddlewaretoken": token}
        )
        for action in ("release", "delete")
    ]

    assert "Cheap watches" in page and 'data-testid="release-link"' not in page
    assert 'data-testid="delete-link"' not in page and 'data-testid="read-only-note"' in page
    assert confirm.status_code == 200 and 'data-testid="confirm-button"' not in (
        confirm.content.decode()
    )
    assert 'data-testid="bulk-actions"' not in tracking_page and 'type="checkbox"' not in (
        tracking_page
    )
    assert [post.status_code for post in posts] == [403, 403]
    assert hop.messages == [] and message_id in quarantine_store.quarantined_copies([message_id])


def test_an_administrator_confirms_a_bulk_release_that_lists_what_will_happen(
    mail: MailData, admin: Client, hop: NextHop
) -> None:
    fresh, released, purged = quarantine("Fresh"), quarantine("Released"), quarantine("Purged")
    services.quarantine_release([released], user=None)
    mail.conn.execute("DELETE FROM quarantined_message WHERE id = ?", (purged,))
    mail.commit()
    ids = [fresh, released, purged]
    back = f"{TRACKING}?action=quarantined"

    confirm = unescape(
        admin.get(CONFIRM, {"action": "release", "id": ids, "next": back}).content.decode()
    )
    done = admin.post(CONFIRM, {"action": "release", "id": ids, "next": back}, follow=True)

    assert "Delivered to anna@example.com, ben@example.com" in confirm
    assert "Released already: skipped." in confirm and "No longer stored" in confirm
    assert "Release 1 message" in confirm
    assert done.redirect_chain == [(back, 302)]
    flash = unescape(done.content.decode())
    assert "Released 1 message. 1 message released or delivered already, skipped." in flash
    assert len(hop.messages) == 2  # the one released before, and fresh: never one twice


def test_releasing_a_virus_is_warned_about_before_the_button(mail: MailData, admin: Client) -> None:
    spam = quarantine("Cheap watches")
    virus = mailrecords.mail_record(
        dataclasses.replace(
            quarantined_spam(
                raw_message("Invoice overdue"),
                logged_at=int(NOW.timestamp()) - 600,
                sender="billing@promo.test",
                subject="Invoice overdue",
                message_id="<invoice.overdue@promo.test>",
            ),
            verdict="virus",
            store_name="Virus quarantine",
        )
    )

    def page(action: str, ids: list[int | None]) -> str:
        return unescape(admin.get(CONFIRM, {"action": action, "id": ids}).content.decode())

    warned = page("release", [spam, virus])
    assert 'data-testid="virus-warning"' in warned
    assert "One of these messages was quarantined as a virus" in warned
    assert warned.index("virus-warning") < warned.index('data-testid="confirm-button"')
    assert 'data-testid="virus-warning"' not in page("release", [spam])
    assert "This message was quarantined as a virus" in page("release", [virus])
    assert 'data-testid="virus-warning"' not in page("delete", [spam, virus])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"action": "release"}, "Choose at least one quarantined message."),
        ({"action": "release", "id": "abc"}, "'abc' is not a message number."),
        ({"action": "delete", "id": "²"}, "is not a message number."),
        ({"action": "delete", "id": "0"}, "'0' is not a message number."),
        ({"action": "delete", "id": str(2**63)}, "is not a message number."),
        ({"action": "delete", "id": [str(n) for n in range(1, 202)]}, "at most 200 messages"),
        ({"action": "burn", "id": "1"}, "Choose Release or Delete."),
    ],
)
def test_odd_confirmation_requests_are_a_400_with_a_message(
    mail: MailData, admin: Client, params: dict[str, object], message: str
) -> None:
    for method in (admin.get, admin.post):
        response = method(CONFIRM, params)
        assert response.status_code == 400
        assert message in unescape(response.content.decode())


def test_the_page_after_an_action_is_never_another_site(mail: MailData, admin: Client) -> None:
    message_id = quarantine()

    response = admin.post(
        CONFIRM, {"action": "delete", "id": message_id, "next": "https://evil.example/"}
    )

    assert response.status_code == 302 and response["Location"] == TRACKING
    assert quarantine_store.quarantined_copies([message_id]) == {}


def test_the_tracking_list_offers_stored_messages_for_release_and_delete(
    mail: MailData, admin: Client
) -> None:
    message_id = quarantine()
    mail.tracking(0.1, subject="Delivered mail")
    mail.commit()

    html = admin.get(TRACKING).content.decode()

    assert html.index("Search the tracking log") < html.index("Tracking log retention")
    assert 'data-testid="bulk-actions"' in html
    assert html.count(f'name="id" value="{message_id}"') == 2  # one row per recipient
    assert f'href="{detail_url(message_id)}"' in html


def test_a_store_that_never_released_anything_keeps_the_mail_services_schema(
    mail: MailData, store_root: Path
) -> None:
    """The release record lives beside the mail service's tables, made on the first release."""
    conn = msgstore.connect(store_root, readonly=True)
    try:
        assert not quarantine_store.has_release_table(conn)
    finally:
        conn.close()
    assert tracking.tracking_page(tracking.TrackingFilter(action="released")).entries == []


@pytest.mark.integration
@pytest.mark.parametrize("step", [0, 1, 2], ids=["claimed", "spooled", "delivered-not-recorded"])
def test_a_release_whose_process_dies_is_finished_by_a_worker_and_delivers_once(
    step: int, mail: MailData, hop: NextHop, redis_settings, transactional_db, monkeypatch
) -> None:
    """SIGKILL the process releasing after it claimed the message (0), after it spooled it
    (1), or after the next hop took it but before it was marked released (2): the reconciler
    sees the holder gone and a worker finishes the release from the job and its claim. The
    message reaches the next hop exactly once and ends released, never 'under way' for ever."""
    from django.conf import settings

    from jobs.models import JobState
    from tests.support.crash import killed_at_step, taken_over
    from tests.support.services import worker_env

    message_id = quarantine()
    job = killed_at_step(
        "from mailsecurity import services\n"
        f"services.quarantine_release([{message_id}], user='admin')",
        worker_env(redis_settings, settings.APPLIANCE_ROOT),
        "quarantine_release",
        step,
    )
    copy = quarantine_store.quarantined_copies([message_id])[message_id]
    assert copy.release_state == "releasing"  # its holder is gone, its claim left behind
    assert len(hop.messages) == (1 if step == 2 else 0)

    job = taken_over(job, monkeypatch)

    assert job.state == JobState.SUCCEEDED, job.error
    assert len(hop.messages) == 1  # exactly once, whatever the step
    copy = quarantine_store.quarantined_copies([message_id])[message_id]
    assert copy.release_state == "released" and copy.released_by == "admin"
    assert spool.spool_list() == []
    (event,) = [e for e in mail_events() if e.details.get("outcome") == "released"]
    assert event.details["message"] == message_id
