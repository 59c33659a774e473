"""The live tail of System > Events: what a poll returns."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

from django.test import Client

from events.models import Category, Severity
from events.selectors import Cursor
from events.services import event_write

from .conftest import MakeEvents

TAIL = "/system/events/tail/"


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-event-id="(\d+)"', html)]


def _next_poll(html: str) -> str:
    match = re.search(r'id="event-tail" hx-get="([^"]+)"', html)
    assert match
    return unescape(match.group(1))


def test_it_returns_only_newer_rows_that_match_newest_first(
    admin_client: Client, make_events: MakeEvents
) -> None:
    shown = make_events(5, severity=Severity.ERROR)
    later = shown[-1].created_at + timedelta(seconds=1)
    newer_match = make_events(2, at=later, severity=Severity.CRITICAL, step=timedelta(0))
    make_events(2, at=later, severity=Severity.INFO)

    response = admin_client.get(
        TAIL, {"severity": "error", "newest": Cursor.of(shown[-1]).encode()}
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert _ids(html) == [newer_match[1].id, newer_match[0].id]
    assert '<tbody class="event-new">' in html


def test_the_next_poll_starts_after_what_it_has_seen(admin_client: Client) -> None:
    first = event_write(category=Category.MAIL, message="first")
    poll = {"category": "mail", "newest": Cursor.of(first).encode()}
    assert admin_client.get(TAIL, poll).status_code == 204

    second = event_write(category=Category.MAIL, message="second")
    html = admin_client.get(TAIL, poll).content.decode()

    assert _ids(html) == [second.id]
    assert _next_poll(html) == f"{TAIL}?category=mail&newest={Cursor.of(second).encode()}"
    assert admin_client.get(_next_poll(html)).status_code == 204


def test_nothing_new_answers_no_content(admin_client: Client) -> None:
    newest = event_write(category=Category.SYSTEM, message="only one")

    response = admin_client.get(TAIL, {"newest": Cursor.of(newest).encode()})

    assert response.status_code == 204
    assert response.content == b""


def test_non_matching_new_rows_move_the_poll_on_without_showing(admin_client: Client) -> None:
    seen = event_write(category=Category.AUTH, message="seen")
    other = event_write(category=Category.SMTP, message="other")

    response = admin_client.get(TAIL, {"category": "auth", "newest": Cursor.of(seen).encode()})

    assert response.status_code == 200
    html = response.content.decode()
    assert _ids(html) == []
    assert Cursor.of(other).encode() in _next_poll(html)


def test_a_burst_larger_than_a_poll_arrives_over_several_polls_without_gaps(
    admin_client: Client, make_events: MakeEvents
) -> None:
    seen = make_events(1)[0]
    burst = make_events(25, at=seen.created_at + timedelta(seconds=1), step=timedelta(0))

    first = admin_client.get(
        TAIL, {"category": "system", "limit": "10", "newest": Cursor.of(seen).encode()}
    ).content.decode()
    second = admin_client.get(_next_poll(first)).content.decode()
    third = admin_client.get(_next_poll(second)).content.decode()

    delivered = _ids(third) + _ids(second) + _ids(first)
    assert sorted(delivered) == [event.id for event in burst]


def test_a_bad_cursor_is_refused_quietly(admin_client: Client) -> None:
    assert admin_client.get(TAIL, {"newest": "garbage"}).status_code == 400


def test_read_only_users_can_poll(readonly_client: Client) -> None:
    seen = event_write(category=Category.SYSTEM, message="seen")
    event_write(category=Category.SYSTEM, message="new")

    response = readonly_client.get(TAIL, {"newest": Cursor.of(seen).encode()})

    assert response.status_code == 200
    assert "new" in response.content.decode()
