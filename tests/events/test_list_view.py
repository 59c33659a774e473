"""System > Events: the page, its filter form, its paging links and its messages."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

import pytest
from django.test import Client
from django.utils import timezone

from events.models import Category, Severity
from events.selectors import Cursor
from events.services import event_write

from .conftest import MakeEvents, event_with_every_field

URL = "/system/events/"


def _link(html: str, testid: str) -> str:
    match = re.search(rf'href="([^"]+)"[^>]*data-testid="{testid}"', html)
    assert match, f"no {testid} link"
    return unescape(match.group(1))


def _event_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-event-id="(\d+)"', html)]


def test_anonymous_visitors_are_sent_to_login(client: Client) -> None:
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


@pytest.mark.parametrize("path", ["tail/", "export.csv"])
def test_anonymous_visitors_get_neither_tail_nor_export(client: Client, path: str) -> None:
    response = client.get(URL + path)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_read_only_users_can_view_the_log(readonly_client: Client) -> None:
    event_write(category=Category.CONFIG, message="Relay host changed", user="admin")

    response = readonly_client.get(URL)

    assert response.status_code == 200
    assert "Relay host changed" in response.content.decode()


def test_the_page_shows_rows_with_badges_and_expandable_details(admin_client: Client) -> None:
    event_with_every_field(
        Category.BACKUP, "Configuration snapshot created", {"snapshot": "cfg-0042", "size": 1234}
    )

    html = admin_client.get(URL).content.decode()

    assert '<span class="badge sev-warning">Warning</span>' in html
    assert "<summary>Configuration snapshot created</summary>" in html
    assert "&quot;snapshot&quot;: &quot;cfg-0042&quot;" in html
    assert "<td>mx1</td>" in html
    assert "Backup &amp; Restore" in html


def test_event_text_is_escaped(admin_client: Client) -> None:
    event_write(category=Category.AUTH, message="<script>alert(1)</script>", user="<b>x</b>")

    html = admin_client.get(URL).content.decode()

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_it_shows_fifty_rows_and_an_older_link_that_keeps_the_filters(
    admin_client: Client, make_events: MakeEvents
) -> None:
    make_events(120, category=Category.MAIL, severity=Severity.ERROR)

    html = admin_client.get(URL, {"severity": "warning", "category": "mail"}).content.decode()

    assert len(_event_ids(html)) == 50
    assert "Showing 50 events" in html
    older = _link(html, "older")
    assert "severity=warning" in older and "category=mail" in older and "after=" in older
    assert 'data-testid="newer"' not in html


def test_older_and_newer_links_walk_the_log_both_ways(
    admin_client: Client, make_events: MakeEvents
) -> None:
    make_events(130, step=timedelta(0))
    first = admin_client.get(URL, {"category": "system"}).content.decode()
    second = admin_client.get(_link(first, "older")).content.decode()
    third = admin_client.get(_link(second, "older")).content.decode()

    assert len(_event_ids(third)) == 30
    assert 'data-testid="older"' not in third
    everything = _event_ids(first) + _event_ids(second) + _event_ids(third)
    assert len(set(everything)) == len(everything) == 130
    back = admin_client.get(_link(third, "newer")).content.decode()
    assert _event_ids(back) == _event_ids(second)


def test_the_page_size_is_capped(admin_client: Client, make_events: MakeEvents) -> None:
    make_events(250)

    html = admin_client.get(URL, {"limit": "1000"}).content.decode()

    assert len(_event_ids(html)) == 200
    assert "limit=200" in _link(html, "older")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"after": "not-a-cursor"}, "This page link is damaged"),
        ({"before": "%%%"}, "This page link is damaged"),
        ({"since": "yesterday"}, "is not a date and time"),
        ({"until": "2026-13-45T99:00"}, "is not a date and time"),
        ({"severity": "loud"}, "Select a valid choice"),
        ({"category": "weather"}, "Select a valid choice"),
        ({"period": "5y"}, "Select a valid choice"),
        ({"limit": "ten"}, "Page size must be a number"),
        ({"period": "24h", "since": "2026-01-01T00:00"}, "either a period or a custom"),
        ({"since": "2026-02-01T00:00", "until": "2026-01-01T00:00"}, "later than From"),
    ],
)
def test_invalid_parameters_give_a_message_not_an_error(
    admin_client: Client, params: dict[str, str], message: str
) -> None:
    response = admin_client.get(URL, params)

    assert response.status_code == 400
    html = response.content.decode()
    assert 'data-testid="filter-errors"' in html
    assert message in unescape(html)


def test_a_cursor_with_a_naive_time_is_refused(admin_client: Client) -> None:
    import base64

    token = base64.urlsafe_b64encode(b"2026-01-01T00:00:00|5").decode()

    response = admin_client.get(URL, {"after": token})

    assert response.status_code == 400


def test_the_form_keeps_the_values_it_was_given(admin_client: Client) -> None:
    html = admin_client.get(
        URL,
        {"severity": "error", "category": "smtp", "q": "relay", "since": "2026-01-02T03:04"},
    ).content.decode()

    assert '<option value="error" selected>' in html
    assert '<option value="smtp" selected>' in html
    assert 'name="q" maxlength="200" value="relay"' in html
    assert 'name="since" step="1" value="2026-01-02T03:04:00"' in html


def test_a_period_preset_limits_the_rows(admin_client: Client, make_events: MakeEvents) -> None:
    make_events(3, at=timezone.now() - timedelta(days=3), message="old {n}")
    make_events(2, at=timezone.now() - timedelta(minutes=30), message="recent {n}")

    html = admin_client.get(URL, {"period": "1h"}).content.decode()

    assert "recent 0" in html and "recent 1" in html
    assert "old 0" not in html


def test_the_head_page_tails_and_can_be_paused(
    admin_client: Client, make_events: MakeEvents
) -> None:
    make_events(3)

    live = admin_client.get(URL, {"category": "system"}).content.decode()
    paused = admin_client.get(URL, {"category": "system", "tail": "0"}).content.decode()

    assert 'data-testid="live"' in live
    assert 'hx-get="/system/events/tail/?category=system&amp;newest=' in live
    assert 'hx-trigger="every 4s"' in live
    assert "tail=0" in live  # the Pause link
    assert "/system/events/tail/" not in paused  # no tail (the install banner slot may poll)
    assert 'data-testid="paused"' in paused
    assert '<input type="hidden" name="tail" value="0">' in paused


def test_a_paused_log_stays_paused_while_paging(
    admin_client: Client, make_events: MakeEvents
) -> None:
    make_events(60)
    first = admin_client.get(URL, {"tail": "0"}).content.decode()
    second = admin_client.get(_link(first, "older")).content.decode()
    back = admin_client.get(_link(second, "newer")).content.decode()

    assert "tail=0" in _link(first, "older")
    assert 'data-testid="paused"' in back
    assert "/system/events/tail/" not in back


def test_older_pages_and_closed_ranges_do_not_tail(
    admin_client: Client, make_events: MakeEvents
) -> None:
    events = make_events(60)
    older = admin_client.get(URL, {"after": Cursor.of(events[30]).encode()}).content.decode()
    ended = (timezone.now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    closed = admin_client.get(URL, {"until": ended}).content.decode()

    assert "/system/events/tail/" not in older
    assert "/system/events/tail/" not in closed


def test_the_export_link_carries_the_filters_but_not_the_cursor(
    admin_client: Client, make_events: MakeEvents
) -> None:
    events = make_events(60)

    html = admin_client.get(
        URL, {"severity": "info", "q": "Event", "after": Cursor.of(events[30]).encode()}
    ).content.decode()

    export = re.search(r'class="export" href="([^"]+)"', html)
    assert export
    assert unescape(export.group(1)) == "/system/events/export.csv?severity=info&q=Event"


def test_the_page_does_not_count_the_log(admin_client: Client, make_events: MakeEvents) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    make_events(10)
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(URL, {"severity": "warning"})

    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
