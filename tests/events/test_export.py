"""CSV export of System > Events."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta

from django.http import StreamingHttpResponse
from django.test import Client

from events.models import Category, Severity
from events.selectors import Cursor
from events.services import event_write
from tests.support.clock import Clock

from .conftest import MakeEvents, event_with_every_field

EXPORT = "/system/events/export.csv"


def _rows(response: StreamingHttpResponse) -> list[list[str]]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


def test_it_streams_a_dated_csv_attachment(admin_client: Client, clock: Clock) -> None:
    moment = clock.travel(clock.now(), tick=False)  # stopped: no race with a midnight
    event_write(category=Category.SYSTEM, message="hello")

    response = admin_client.get(EXPORT)

    assert response.status_code == 200
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    disposition = response["Content-Disposition"]
    assert disposition == f'attachment; filename="lmi-events-{moment:%Y%m%d-%H%M%S}Z.csv"'


def test_it_writes_a_header_and_every_field(admin_client: Client) -> None:
    event = event_with_every_field(
        Category.CONFIG, "SMTP relay changed", {"relay": "mx.example.com", "port": 25}
    )

    header, *rows = _rows(admin_client.get(EXPORT))
    (row,) = [row for row in rows if row[5] == "SMTP relay changed"]

    assert header == ["time", "severity", "category", "node", "user", "message", "details"]
    assert datetime.fromisoformat(row[0]) == event.created_at
    assert row[0].endswith("+00:00")
    assert row[1:6] == ["warning", "config", "mx1", "admin", "SMTP relay changed"]
    assert json.loads(row[6]) == {"relay": "mx.example.com", "port": 25}


def test_cells_that_a_spreadsheet_would_run_are_defused(admin_client: Client) -> None:
    for text in ('=HYPERLINK("http://evil")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "plain"):
        event_write(category=Category.MAIL, message=text, user=text)

    rows = _rows(admin_client.get(EXPORT, {"category": "mail"}))[1:]

    messages = {row[5] for row in rows}
    assert messages == {
        '\'=HYPERLINK("http://evil")',
        "'+1+1",
        "'-2+3",
        "'@SUM(A1)",
        "'\tcmd",
        "plain",
    }
    assert {row[4] for row in rows} == messages


def test_it_honours_the_filters_and_ignores_page_cursors(
    admin_client: Client, make_events: MakeEvents
) -> None:
    wanted = make_events(30, severity=Severity.ERROR, category=Category.SMTP, message="relay {n}")
    make_events(30, severity=Severity.INFO, category=Category.SMTP, message="relay {n}")
    make_events(30, severity=Severity.ERROR, category=Category.MAIL, message="relay {n}")
    make_events(5, severity=Severity.ERROR, category=Category.SMTP, message="queue")

    rows = _rows(
        admin_client.get(
            EXPORT,
            {
                "severity": "warning",
                "category": "smtp",
                "q": "RELAY",
                "after": Cursor.of(wanted[10]).encode(),
            },
        )
    )[1:]

    assert len(rows) == 30
    assert {(row[1], row[2]) for row in rows} == {("error", "smtp")}
    assert [row[0] for row in rows] == sorted((row[0] for row in rows), reverse=True)


def test_it_exports_more_than_one_chunk_in_order(
    admin_client: Client, make_events: MakeEvents, monkeypatch
) -> None:
    from events import selectors

    monkeypatch.setattr(selectors, "EXPORT_CHUNK", 7)
    events = make_events(50, step=timedelta(0))

    rows = _rows(admin_client.get(EXPORT, {"category": "system"}))[1:]

    assert [row[5] for row in rows] == [event.message for event in reversed(events)]


def test_invalid_filters_are_refused_with_a_message(admin_client: Client) -> None:
    response = admin_client.get(EXPORT, {"since": "last tuesday"})

    assert response.status_code == 400
    assert "last tuesday" in response.content.decode()


def test_read_only_users_can_export(readonly_client: Client) -> None:
    event_write(category=Category.SYSTEM, message="visible to viewers")

    response = readonly_client.get(EXPORT)

    assert response.status_code == 200
    assert "visible to viewers" in b"".join(response.streaming_content).decode()
