"""System > Events: the log page, its live tail and its CSV export."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, islice
from typing import Any
from urllib.parse import urlencode

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from events.forms import FILTER_PARAMS, EventQueryForm
from events.models import Category, Event, Severity
from events.selectors import (
    PAGE_SIZE,
    Cursor,
    event_page,
    events_export,
    events_newer_than,
    log_head,
)

# Spreadsheets run a cell that starts with one of these as a formula (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
CSV_HEADER = ("time", "severity", "category", "node", "user", "message", "details")
CSV_ROWS_PER_WRITE = 500
# Severity as the token the filter URL uses ("warning"), so a CSV value can be pasted back.
SEVERITY_TOKENS = {int(level): level.name.lower() for level in Severity}
SEVERITY_LABELS = dict(Severity.choices)
CATEGORY_LABELS = dict(Category.choices)


def _filter_params(request: HttpRequest, limit: int = PAGE_SIZE) -> list[tuple[str, str]]:
    """The filters as the operator gave them (empty ones dropped), for links that keep them."""
    params = [(name, request.GET[name]) for name in FILTER_PARAMS if request.GET.get(name)]
    if limit != PAGE_SIZE:
        params.append(("limit", str(limit)))
    return params


def _url(name: str, params: list[tuple[str, str]], **extra: Cursor | str) -> str:
    pairs = params + [(k, v.encode() if isinstance(v, Cursor) else v) for k, v in extra.items()]
    return reverse(name) + ("?" + urlencode(pairs) if pairs else "")


@dataclass(frozen=True)
class EventRow:
    """One row of the table, formatted once here: per-lookup cost in templates adds up at 200."""

    id: int
    time: str
    time_iso: str
    severity: str
    category: str
    node: str
    username: str
    message: str
    details: str


def _rows(events: Iterable[Event]) -> list[EventRow]:
    """The events as table rows, in the console's time zone, details pretty-printed."""
    rows = []
    for event in events:
        local = timezone.localtime(event.created_at)
        rows.append(
            EventRow(
                id=event.id,
                time=local.strftime("%Y-%m-%d %H:%M:%S"),
                time_iso=local.isoformat(),
                severity=SEVERITY_LABELS.get(event.severity, str(event.severity)),
                category=CATEGORY_LABELS.get(event.category, event.category),
                node=event.node,
                username=event.username,
                message=event.message,
                details=json.dumps(event.details, indent=2, sort_keys=True)
                if event.details
                else "",
            )
        )
    return rows


def _local_input(value: datetime | None) -> str:
    """A parsed From/Until as a datetime-local input shows it (in the console's time zone)."""
    return timezone.localtime(value).strftime("%Y-%m-%dT%H:%M:%S") if value else ""


@require_GET
def event_list(request: HttpRequest) -> HttpResponse:
    """The log, newest first, one keyset page at a time; the newest page tails new events."""
    form = EventQueryForm(request.GET)
    context: dict[str, object] = {
        "breadcrumb": "System > Events",
        "form": form,
        # Plain selects: Django's widget templates cost more than the whole table of rows.
        "choice_fields": [
            {
                "name": name,
                "label": form.fields[name].label or name.capitalize(),
                "choices": form.fields[name].choices,
                "value": request.GET.get(name, ""),
            }
            for name in ("severity", "category", "period")
        ],
        "since_value": request.GET.get("since", ""),
        "until_value": request.GET.get("until", ""),
        "paused": request.GET.get("tail") == "0",
    }
    if not form.is_valid():
        context["newest_url"] = _url("events:list", _filter_params(request))
        return render(request, "events/list.html", context, status=400)
    limit = form.cleaned_data["limit"]
    params = _filter_params(request, limit)
    # A paused page stays paused while the operator pages through the log and back.
    nav = [*params, ("tail", "0")] if context["paused"] else params
    event_filter = form.event_filter()
    # Read before the page: every row after this position is new to the live tail, and the rows
    # between the page's newest and it are known not to match, so polls need not read them.
    head = None if form.cleaned_data["after"] else log_head()
    page = event_page(
        event_filter,
        after=form.cleaned_data["after"],
        before=form.cleaned_data["before"],
        limit=limit,
    )
    context.update(
        {
            "page": page,
            "rows": _rows(page.events),
            "since_value": _local_input(form.cleaned_data["since"]),
            "until_value": _local_input(form.cleaned_data["until"]),
            "time_zone": timezone.get_current_timezone_name(),
            "newest_url": _url("events:list", nav),
            "export_url": _url("events:export", _filter_params(request)),
            "older_url": page.older and _url("events:list", nav, after=page.older),
            "newer_url": page.newer and _url("events:list", nav, before=page.newer),
        }
    )
    # Only the head of the log grows, and not inside a range that has already ended.
    if page.is_head and (event_filter.until is None or event_filter.until > timezone.now()):
        if context["paused"]:
            context["resume_url"] = _url("events:list", params)
        else:
            shown = [Cursor.of(page.events[0])] if page.events else []
            newest = max([*shown, head] if head else shown, default=None)
            extra = {"newest": newest} if newest else {}
            context["tail_url"] = _url("events:tail", params, **extra)
            context["pause_url"] = _url("events:list", params, tail="0")
    return render(request, "events/list.html", context)


@require_GET
def event_tail(request: HttpRequest) -> HttpResponse:
    """Polled by the newest page: matching events after the newest position it has seen.

    Answers with a new poller carrying the new position, followed by the new rows (if any), or
    204 (htmx swaps nothing) when the log has not moved. The position advances to the head of
    the log even when nothing matched, so a poll reads only what arrived since the last one.
    """
    form = EventQueryForm(request.GET)
    if not form.is_valid():
        return HttpResponse(status=400)
    limit = form.cleaned_data["limit"]
    seen = form.cleaned_data["newest"]
    head = log_head()
    events = events_newer_than(form.event_filter(), seen, limit)
    newest = Cursor.of(events[-1]) if events else seen
    if len(events) < limit and head is not None:
        # Everything that matches up to head has been read: later polls start there.
        newest = max(newest, head) if newest else head
    if newest is None or newest == seen:
        return HttpResponse(status=204)
    events.reverse()
    context = {
        "rows": _rows(events),
        "tail_url": _url("events:tail", _filter_params(request, limit), newest=newest),
    }
    return render(request, "events/_tail.html", context)


def _cell(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


class _Line:
    """A file-like target for csv.writer that hands back each line instead of storing it."""

    def write(self, value: str) -> str:
        return value


def _csv_lines(rows: Iterator[Any]) -> Iterator[bytes]:
    writer = csv.writer(_Line())
    yield writer.writerow(CSV_HEADER).encode()
    batch: list[str] = []
    for row in rows:
        batch.append(
            writer.writerow(
                [
                    row.created_at.astimezone(UTC).isoformat(),
                    SEVERITY_TOKENS[row.severity],
                    _cell(row.category),
                    _cell(row.node),
                    _cell(row.username),
                    _cell(row.message),
                    _cell(row.details_json),
                ]
            )
        )
        if len(batch) >= CSV_ROWS_PER_WRITE:
            yield "".join(batch).encode()
            batch = []
    if batch:
        yield "".join(batch).encode()


@require_GET
def event_export(request: HttpRequest) -> HttpResponse:
    """Every event the filters select, as CSV, streamed (page cursors and size are ignored).

    Everything that can refuse the request is checked before the first byte: once streaming
    has started the status is sent and an error can only cut the file short.
    """
    form = EventQueryForm(request.GET)
    if not form.is_valid():
        problems = [str(error) for errors in form.errors.values() for error in errors]
        return HttpResponse(
            "The export was not started: " + " ".join(problems) + "\n",
            status=400,
            content_type="text/plain; charset=utf-8",
        )
    rows = events_export(form.event_filter())
    # The first chunk is read before the response starts: a query that fails then fails as an
    # ordinary error response, not as a CSV cut off after its header.
    first = list(islice(rows, 1))
    response = StreamingHttpResponse(
        _csv_lines(chain(first, rows)), content_type="text/csv; charset=utf-8"
    )
    stamp = timezone.now().astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="lmi-events-{stamp}Z.csv"'
    return response
