"""The message store for tests (and benches): reading its tables directly, to check what was
written, and the records of mail to write into it as the mail service does."""

from __future__ import annotations

from appliance.mail import msgstore
from appliance.mail.mailrecords import MailRecord


def store_rows(sql: str, *params: object) -> list[tuple[object, ...]]:
    """The rows ``sql`` reads from the message store, on a read-only connection of its own."""
    conn = msgstore.connect(readonly=True)
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def quarantined_spam(
    raw: bytes,
    *,
    logged_at: int,
    sender: str,
    subject: str,
    message_id: str,
    recipients: tuple[str, ...] = ("anna.schmidt@example.com",),
    client_ip: str = "203.0.113.7",
    response: str = "250 2.0.0 Ok: queued",
) -> MailRecord:
    """Spam the mail service answered 250 and kept whole (``raw``) in the Spam quarantine, as
    its store writer (mailrecords.mail_record) is handed it. Who sent it, when and under which
    subject are the caller's; where it came from and what it was answered rarely matter."""
    return MailRecord(
        logged_at=logged_at,
        client_ip=client_ip,
        sender=sender,
        recipients=recipients,
        message_id=message_id,
        subject=subject,
        size=len(raw),
        verdict="spam",
        action="quarantined",
        response=response,
        store_name="Spam quarantine",
        raw=raw,
    )
