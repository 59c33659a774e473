"""Message Tracking search by domain, part of an address, subject, status and dates (issue 16),
on the keyset pages that already exist, and odd input as a 400 with a message."""

from __future__ import annotations

import re
from html import unescape

import pytest
from django.test import Client

from appliance.mail import msgstore, tracking
from appliance.mail.tracking import TrackingFilter

from .conftest import NOW, MailData

pytestmark = pytest.mark.django_db

TRACKING = "/mail-security/policy/message-tracking/"
ADDRESSES = [
    "anna.schmidt@example.com",
    "Ben@EXAMPLE.com",
    "carla@sub.example.com",
    "david@example.com.au",
    "eve@notexample.com",
    "100%_sure@odd.test",
]


@pytest.fixture
def rows(mail: MailData) -> dict[str, int]:
    """One entry per address as sender (recipient fixed) and one as recipient, a minute apart."""
    ids: dict[str, int] = {}
    for n, address in enumerate(ADDRESSES):
        ids[address] = mail.tracking(n / 1440, sender=address, subject=f"Subject {n}")
        mail.tracking(n / 1440 + 0.0001, sender="x@y.test", recipient=address, subject="To")
    mail.commit()
    return ids


def senders(search: TrackingFilter, limit: int = 2) -> set[str]:
    """Every sender the search finds, walked in small pages (the keyset links of the log)."""
    found: set[str] = set()
    page = tracking.tracking_page(search, limit=limit)
    while True:
        found |= {entry.sender for entry in page.entries}
        if page.older is None:
            return found
        page = tracking.tracking_page(search, after=page.older, limit=limit)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("anna.schmidt@EXAMPLE.com", {"anna.schmidt@example.com"}, id="whole"),
        pytest.param(
            "@example.com", {"anna.schmidt@example.com", "Ben@EXAMPLE.com"}, id="at-domain"
        ),
        pytest.param(
            "example.com",
            set(ADDRESSES[:5]),
            id="bare-domain-is-a-part",
        ),
        pytest.param("SCHMIDT", {"anna.schmidt@example.com"}, id="part"),
        pytest.param("ben@", {"Ben@EXAMPLE.com"}, id="local-part-and-at"),
        pytest.param("100%_", {"100%_sure@odd.test"}, id="wildcards-are-literal"),
        pytest.param("a%", set(), id="percent-matches-itself-only"),
    ],
)
def test_a_sender_is_found_by_address_domain_or_part(rows, text: str, expected: set[str]):
    assert senders(TrackingFilter(sender=text)) == expected


def test_a_recipient_domain_combines_with_the_other_filters(rows, monkeypatch):
    monkeypatch.setattr(tracking, "SEARCH_WINDOW", 3)  # several "searched to" pages
    search = TrackingFilter(sender="x@y.test", recipient="@example.com", subject="to")

    found = set()
    page = tracking.tracking_page(search, limit=1)
    while True:
        found |= {entry.recipient for entry in page.entries}
        if page.older is None:
            break
        page = tracking.tracking_page(search, after=page.older, limit=1)

    assert found == {"anna.schmidt@example.com", "Ben@EXAMPLE.com"}


def test_status_and_dates_narrow_the_search(mail: MailData):
    base = int(NOW.timestamp())
    for n, action in enumerate(msgstore.ACTIONS * 2):
        mail.tracking(0, action=action, sender=f"{action}{n}@example.com", logged_at=base - n)
    mail.commit()

    rejected = senders(TrackingFilter(sender="@example.com", action="rejected"))
    recent = senders(TrackingFilter(since=base - 2, until=base))

    assert rejected == {"rejected2@example.com", "rejected5@example.com"}
    assert recent == {"quarantined1@example.com", "rejected2@example.com"}


def test_a_part_of_an_address_walks_the_time_index_in_bounded_windows(rows):
    plan = " | ".join(tracking.query_plan(TrackingFilter(sender="@example.com")))

    assert "tracking_log_logged_at" in plan and "TEMP B-TREE" not in plan


def test_the_page_searches_by_domain_and_status(admin_client: Client, rows) -> None:
    response = admin_client.get(TRACKING, {"sender": "@example.com", "action": "delivered"})

    html = unescape(response.content.decode()).replace("<wbr>", "")  # the address breaks
    assert response.status_code == 200
    senders = r'<td class="wrap sender">([^<]*@[^<]*)</td>\s*<td class="wrap recipient">r@'
    assert re.findall(senders, html) == [
        "anna.schmidt@example.com",  # newest first
        "Ben@EXAMPLE.com",
    ]
    assert 'value="@example.com"' in html and '<option value="released">' in html


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sender": "@"}, "is not an email address, a domain or part of one: enter"),
        ({"recipient": "a@b@c"}, "is not an email address, a domain or part of one: enter"),
        ({"sender": "anna schmidt"}, "it has a space or a control character"),
        ({"recipient": "anna\x00"}, "Null characters are not allowed."),
        ({"sender": "anna\x07"}, "it has a space or a control character"),
        ({"sender": "a" * 321}, "at most 320 characters"),
        ({"action": "bounced"}, "Select a valid choice."),
        ({"since": "2026-11-20T10:00", "until": "2026-11-20T09:00"}, "later than From"),
    ],
)
def test_odd_search_input_is_a_400_with_a_message(
    admin_client: Client, mail: MailData, params: dict[str, str], message: str
) -> None:
    response = admin_client.get(TRACKING, params)

    assert response.status_code == 400
    html = unescape(response.content.decode())
    assert 'data-testid="filter-errors"' in html and message in html
