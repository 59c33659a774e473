"""Reads of the event log.

The log can hold a million rows, so it is never counted and never paged by OFFSET. Pages are
addressed by a cursor, the (created_at, id) of a row, and every read walks an index in the log's
order, (created_at DESC, id DESC), from that position:

    WHERE created_at <= t AND (created_at < t OR (created_at = t AND id < i))
    ORDER BY created_at DESC, id DESC LIMIT n

The leading `created_at <= t` repeats what the OR says; it is the form that both SQLite and
PostgreSQL turn into an index range (a bare OR can make SQLite give up the index order).

Two filters cannot be answered by walking one index in order, and each gets its own bound:

- A severity floor (WARNING and above) is read as one stream per level, each walking the
  (severity, time) or (category, severity, time) index, merged in Python. A floor that matches
  nothing for months then costs a few index probes instead of a scan of the whole table.
- Text is matched with LIKE, which no index here serves. A page reads at most SEARCH_WINDOW rows
  of the log past its cursor; if that window holds less than a page of matches, the page says
  how far it searched and its Older link goes on from there.
"""

from __future__ import annotations

import binascii
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any

from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from events.models import Category, Event, Severity
from lmi import pagelinks
from lmi.pagelinks import EARLIEST, LATEST, MAX_ROW_ID, Direction

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
EXPORT_CHUNK = 2000
# Rows of the log one page of a text search reads at most: about 10 ms of LIKE on SQLite and
# 20 ms on PostgreSQL on the benchmark machine (docs/performance.md).
SEARCH_WINDOW = 10_000


class InvalidCursor(ValueError):
    """A page cursor that was not made by Cursor.encode (edited, truncated or from elsewhere)."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the log: the time and id of one row. Pages start after or before it.

    Cursors compare in log order (a newer position is greater).
    """

    created_at: datetime
    id: int

    @classmethod
    def of(cls, event: Event) -> Cursor:
        return cls(event.created_at, event.id)

    def encode(self) -> str:
        """Opaque for the URL: the page link of "<ISO time>|<id>"."""
        return pagelinks.encode(f"{self.created_at.isoformat()}|{self.id}")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            when, _, ident = pagelinks.decode(token).decode().partition("|")
            created_at = datetime.fromisoformat(when)
            event_id = int(ident)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidCursor(pagelinks.DAMAGED) from exc
        if (
            timezone.is_naive(created_at)
            or not EARLIEST <= created_at <= LATEST
            or not 0 <= event_id <= MAX_ROW_ID
        ):
            raise InvalidCursor(pagelinks.DAMAGED)
        return cls(created_at, event_id)


@dataclass(frozen=True)
class EventFilter:
    """What the operator asked to see. Every condition is optional; given ones all apply.

    severity is a floor (WARNING means warnings, errors and criticals); since is inclusive and
    until exclusive; text matches message, user name or node, ignoring case.
    """

    severity: Severity | None = None
    category: Category | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str = ""

    def levels(self) -> list[Severity] | None:
        """The severities the floor lets through, or None when it lets everything through."""
        if self.severity is None or self.severity <= min(Severity):
            return None
        return [level for level in Severity if level >= self.severity]

    def indexed(self) -> QuerySet[Event]:
        """The conditions an index answers in order: category and time range."""
        events = Event.objects.all()
        if self.category is not None:
            events = events.filter(category=self.category)
        if self.since is not None:
            events = events.filter(created_at__gte=self.since)
        if self.until is not None:
            events = events.filter(created_at__lt=self.until)
        return events

    def text_condition(self) -> Q:
        if not self.text:
            return Q()
        return (
            Q(message__icontains=self.text)
            | Q(username__icontains=self.text)
            | Q(node__icontains=self.text)
        )

    def matching(self) -> QuerySet[Event]:
        """Every matching event in one queryset (for small ranges, where plans do not matter)."""
        events = self.indexed().filter(self.text_condition())
        levels = self.levels()
        return events if levels is None else events.filter(severity__in=levels)


@dataclass(frozen=True)
class EventPage:
    """One page of the log, newest first, and where the pages next to it start.

    older is the cursor for the next page back in time (None at the oldest end); newer the
    cursor for the page before it (None when this page is the newest, the head of the log).
    searched_to is set when a text search stopped at its window before filling the page: the
    rows down to that position were searched, and older already points past it.
    """

    events: list[Event]
    older: Cursor | None
    newer: Cursor | None
    searched_to: Cursor | None = None

    @property
    def is_head(self) -> bool:
        return self.newer is None


def _beyond(cursor: Cursor, direction: Direction) -> Q:
    """Rows strictly older (or newer) than the cursor, in the form the indexes serve."""
    t, i = cursor.created_at, cursor.id
    if direction == "older":
        return Q(created_at__lte=t) & (Q(created_at__lt=t) | Q(created_at=t, id__lt=i))
    return Q(created_at__gte=t) & (Q(created_at__gt=t) | Q(created_at=t, id__gt=i))


def _up_to(cursor: Cursor, direction: Direction) -> Q:
    """Rows no further than the cursor, its own row included: the far end of a window."""
    t, i = cursor.created_at, cursor.id
    if direction == "older":
        return Q(created_at__gte=t) & (Q(created_at__gt=t) | Q(created_at=t, id__gte=i))
    return Q(created_at__lte=t) & (Q(created_at__lt=t) | Q(created_at=t, id__lte=i))


def _ordered(events: QuerySet[Event], direction: Direction) -> QuerySet[Event]:
    if direction == "older":
        return events.order_by("-created_at", "-id")
    return events.order_by("created_at", "id")


def _position(event: Event) -> tuple[datetime, int]:
    return (event.created_at, event.id)


def _streams(event_filter: EventFilter, events: QuerySet[Event]) -> list[QuerySet[Event]]:
    """One queryset per severity level of the floor (each walks an index in order), or one."""
    levels = event_filter.levels()
    if levels is None:
        return [events]
    return [events.filter(severity=level) for level in levels]


def _nearest(streams: list[QuerySet[Event]], direction: Direction, count: int) -> list[Event]:
    """The first count rows of the streams in log order, nearest to the cursor first."""
    runs = [list(_ordered(stream, direction)[:count]) for stream in streams]
    if len(runs) == 1:
        return runs[0]
    merged = heapq.merge(*runs, key=_position, reverse=direction == "older")
    return list(islice(merged, count))


def _slice(
    event_filter: EventFilter, cursor: Cursor | None, direction: Direction, count: int
) -> tuple[list[Event], Cursor | None]:
    """Up to count matching rows beyond the cursor, nearest first.

    Returns the rows and, for a text search that read its whole window without finding count
    rows, the cursor of the last row it read (the search continues from there).
    """
    events = event_filter.indexed()
    if cursor is not None:
        events = events.filter(_beyond(cursor, direction))
    edge: Cursor | None = None
    if event_filter.text:
        # The window's far end: read from the covering index alone, no row is fetched.
        window = _ordered(events, direction).values_list("created_at", "id")
        found = list(window[SEARCH_WINDOW - 1 : SEARCH_WINDOW])
        if found:
            edge = Cursor(*found[0])
            events = events.filter(_up_to(edge, direction))
        events = events.filter(event_filter.text_condition())
    rows = _nearest(_streams(event_filter, events), direction, count)
    if len(rows) < count and edge is not None:
        return rows, edge
    return rows, None


def event_page(
    event_filter: EventFilter,
    *,
    after: Cursor | None = None,
    before: Cursor | None = None,
    limit: int = PAGE_SIZE,
) -> EventPage:
    """The page of the log older than after, newer than before, or (neither) the newest one."""
    if after is not None and before is not None:
        raise ValueError("a page starts after one row or before one, not both")
    if before is not None:
        rows, searched_to = _slice(event_filter, before, "newer", limit + 1)
        if len(rows) > limit or searched_to is not None:
            rows = rows[:limit]
            rows.reverse()
            newer = searched_to or Cursor.of(rows[0])
            return EventPage(rows, older=before, newer=newer, searched_to=searched_to)
        # Fewer than a page of newer rows are left: show the head of the log instead.
        return event_page(event_filter, limit=limit)
    rows, searched_to = _slice(event_filter, after, "older", limit + 1)
    older: Cursor | None = None
    if len(rows) > limit:
        rows = rows[:limit]
        older = Cursor.of(rows[-1])
    elif searched_to is not None:
        older = searched_to
    newer = Cursor.of(rows[0]) if rows else after
    return EventPage(rows, older=older, newer=newer if after else None, searched_to=searched_to)


def events_newer_than(
    event_filter: EventFilter, cursor: Cursor | None, limit: int = MAX_PAGE_SIZE
) -> list[Event]:
    """For the live tail: the matching rows just after the cursor, oldest first.

    Oldest first so that a burst larger than limit is delivered over several polls without a
    gap. Only the rows newer than the cursor are read, a few since the last poll.
    """
    events = event_filter.matching()
    if cursor is not None:
        events = events.filter(_beyond(cursor, "newer"))
    return list(_ordered(events, "newer")[:limit])


# The columns of an export row: values, not model instances (a million of those are slow), and
# the details as the database's JSON text, not decoded and encoded again.
EXPORT_FIELDS = ("created_at", "id", "severity", "category", "node", "username", "message")


def _export_stream(events: QuerySet[Event], chunk: int) -> Iterator[tuple[Any, ...]]:
    events = events.annotate(details_json=Cast("details", output_field=TextField()))
    cursor: Cursor | None = None
    while True:
        page = events if cursor is None else events.filter(_beyond(cursor, "older"))
        rows = list(
            _ordered(page, "older").values_list(*EXPORT_FIELDS, "details_json", named=True)[:chunk]
        )
        yield from rows
        if len(rows) < chunk:
            return
        cursor = Cursor(rows[-1].created_at, rows[-1].id)


def events_export(event_filter: EventFilter, chunk: int | None = None) -> Iterator[Any]:
    """Every matching event, newest first, read in keyset chunks: constant memory for exports.

    Yields rows with the attributes of EXPORT_FIELDS plus details_json. No search window here:
    an export reads as far as it must.
    """
    chunk = chunk or EXPORT_CHUNK
    events = event_filter.indexed().filter(event_filter.text_condition())
    streams = [_export_stream(stream, chunk) for stream in _streams(event_filter, events)]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda row: (row.created_at, row.id), reverse=True)


def log_head() -> Cursor | None:
    """The position of the newest event of the whole log, whatever the filters."""
    newest = Event.objects.order_by("-created_at", "-id").values_list("created_at", "id")[:1]
    return next((Cursor(*row) for row in newest), None)


def recent_events(limit: int) -> list[Event]:
    """The newest events, for summaries such as the home page."""
    return list(Event.objects.order_by("-created_at", "-id")[:limit])
