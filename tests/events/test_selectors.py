"""Keyset paging and filters of the event log, at the selector level."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from events import selectors
from events.models import Category, Event, Severity
from events.selectors import Cursor, EventFilter, InvalidCursor, event_page, events_export

from .conftest import MakeEvents


def _ids(events: list[Event]) -> list[int]:
    return [event.id for event in events]


def _all_ids(pages: list[selectors.EventPage]) -> list[int]:
    return [event.id for page in pages for event in page.events]


def _newest_first() -> list[int]:
    return list(Event.objects.order_by("-created_at", "-id").values_list("id", flat=True))


def test_it_pages_by_cursor_without_gaps_or_repeats(make_events: MakeEvents) -> None:
    # Three hundred events in a few shared timestamps: only the id separates most of them.
    moment = timezone.now() - timedelta(minutes=5)
    for offset in range(3):
        make_events(100, at=moment + timedelta(seconds=offset), step=timedelta(0))
    expected = _newest_first()

    seen: list[int] = []
    pages = [event_page(EventFilter(), limit=40)]
    while pages[-1].older is not None:
        seen += _ids(pages[-1].events)
        pages.append(event_page(EventFilter(), after=pages[-1].older, limit=40))
    seen += _ids(pages[-1].events)

    assert seen == expected
    assert [len(page.events) for page in pages] == [40] * 7 + [20]
    assert pages[0].newer is None and pages[0].is_head
    assert all(page.newer is not None for page in pages[1:])


def test_it_pages_back_to_newer_rows_without_gaps_or_repeats(make_events: MakeEvents) -> None:
    make_events(250, step=timedelta(0))
    expected = _newest_first()
    forward = [event_page(EventFilter(), limit=50)]
    while forward[-1].older is not None:
        forward.append(event_page(EventFilter(), after=forward[-1].older, limit=50))

    back = [forward[-1]]
    while back[-1].newer is not None:
        back.append(event_page(EventFilter(), before=back[-1].newer, limit=50))

    assert [_ids(page.events) for page in back] == [_ids(page.events) for page in forward[::-1]]
    assert _all_ids(forward) == expected


def test_going_newer_into_a_short_page_shows_the_head(make_events: MakeEvents) -> None:
    make_events(70)
    second = event_page(EventFilter(), after=event_page(EventFilter(), limit=50).older, limit=50)
    assert len(second.events) == 20

    back = event_page(EventFilter(), before=second.newer, limit=50)

    assert back.is_head
    assert _ids(back.events) == _newest_first()[:50]


def test_the_page_query_uses_the_keyset_condition_not_offset(make_events: MakeEvents) -> None:
    make_events(120)
    first = event_page(EventFilter())
    with CaptureQueriesContext(connection) as queries:
        event_page(EventFilter(), after=first.older)

    (sql,) = [query["sql"] for query in queries.captured_queries]
    assert "OFFSET" not in sql.upper()
    assert 'ORDER BY "events_event"."created_at" DESC, "events_event"."id" DESC' in sql


def test_severity_floor_keeps_that_level_and_above_in_log_order(make_events: MakeEvents) -> None:
    for severity in Severity:
        make_events(30, severity=severity, step=timedelta(seconds=7))
    expected = list(
        Event.objects.filter(severity__gte=Severity.WARNING)
        .order_by("-created_at", "-id")
        .values_list("id", flat=True)
    )

    seen: list[int] = []
    page = event_page(EventFilter(severity=Severity.WARNING), limit=25)
    seen += _ids(page.events)
    while page.older is not None:
        page = event_page(EventFilter(severity=Severity.WARNING), after=page.older, limit=25)
        seen += _ids(page.events)

    assert seen == expected
    assert len(seen) == 90


def test_category_filter_keeps_only_that_category(make_events: MakeEvents) -> None:
    make_events(5, category=Category.AUTH)
    make_events(5, category=Category.MAIL)

    page = event_page(EventFilter(category=Category.AUTH))

    assert {event.category for event in page.events} == {"auth"}
    assert len(page.events) == 5


def test_time_range_includes_since_and_excludes_until(make_events: MakeEvents) -> None:
    start = timezone.now().replace(microsecond=0) - timedelta(days=1)
    events = make_events(10, at=start, step=timedelta(minutes=1))

    page = event_page(
        EventFilter(since=start + timedelta(minutes=2), until=start + timedelta(minutes=5))
    )

    assert _ids(page.events) == [events[4].id, events[3].id, events[2].id]


@pytest.mark.parametrize("text", ["disk FULL", "JSMITH", "mx2"])
def test_text_matches_message_user_or_node_ignoring_case(
    make_events: MakeEvents, text: str
) -> None:
    make_events(1, message="Disk full on /var")
    make_events(1, username="jsmith")
    make_events(1, node="mx2")
    make_events(3, message="Nothing to see")

    page = event_page(EventFilter(text=text))

    assert len(page.events) == 1


def test_text_search_treats_like_wildcards_literally(make_events: MakeEvents) -> None:
    make_events(1, message="100% of quota used")
    make_events(1, message="1000 of quota used")

    assert len(event_page(EventFilter(text="100%")).events) == 1
    assert len(event_page(EventFilter(text="_")).events) == 0


def test_text_search_reads_a_window_per_page_and_continues_from_it(
    make_events: MakeEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selectors, "SEARCH_WINDOW", 20)
    for _ in range(5):
        make_events(1, message="needle")
        make_events(30, message="hay", step=timedelta(0))
    expected = list(
        Event.objects.filter(message="needle")
        .order_by("-created_at", "-id")
        .values_list("id", flat=True)
    )

    pages = [event_page(EventFilter(text="needle"))]
    while pages[-1].older is not None:
        pages.append(event_page(EventFilter(text="needle"), after=pages[-1].older))

    assert _all_ids(pages) == expected
    assert pages[0].searched_to is not None
    assert len(pages) > 2


def test_filters_combine(make_events: MakeEvents) -> None:
    make_events(3, severity=Severity.ERROR, category=Category.SMTP, message="relay refused")
    make_events(3, severity=Severity.ERROR, category=Category.SMTP, message="queue full")
    make_events(3, severity=Severity.INFO, category=Category.SMTP, message="relay refused")
    make_events(3, severity=Severity.ERROR, category=Category.MAIL, message="relay refused")

    page = event_page(EventFilter(severity=Severity.WARNING, category=Category.SMTP, text="relay"))

    assert len(page.events) == 3


def test_export_iterates_every_match_in_chunks(make_events: MakeEvents) -> None:
    make_events(45, severity=Severity.WARNING, step=timedelta(0))
    make_events(45, severity=Severity.CRITICAL, step=timedelta(0))
    make_events(45, severity=Severity.INFO)

    exported = list(events_export(EventFilter(severity=Severity.WARNING), chunk=10))

    expected = Event.objects.filter(severity__gte=Severity.WARNING).order_by("-created_at", "-id")
    assert [row.id for row in exported] == [event.id for event in expected]
    assert len(exported) == 90


def test_recent_events_are_newest_first(make_events: MakeEvents) -> None:
    make_events(10)
    assert _ids(selectors.recent_events(3)) == _newest_first()[:3]


@pytest.mark.parametrize("token", ["", "x", "bm90IGEgY3Vyc29y", "!!!", "MjAyNi0wMS0wMXxhYmM"])
def test_a_damaged_cursor_is_refused(token: str) -> None:
    with pytest.raises(InvalidCursor):
        Cursor.decode(token)


def test_a_cursor_survives_the_round_trip() -> None:
    cursor = Cursor(timezone.now(), 123456)
    assert Cursor.decode(cursor.encode()) == cursor
