"""System > Events given odd input: every one is a 400 with a message, never a 500 (issue 13).

Each value here once reached a conversion that raised: a superscript digit that isdigit() but
int() refuses, times whose UTC equivalent falls outside the years 1 to 9999, cursors whose
numbers do not fit the database's integers.
"""

from __future__ import annotations

from html import unescape

import pytest
from django.http import StreamingHttpResponse
from django.test import Client

from events.models import Category
from events.selectors import Cursor
from events.services import event_write
from tests.support.odd_input import OUT_OF_RANGE, page_link

LIST = "/system/events/"
TAIL = "/system/events/tail/"
EXPORT = "/system/events/export.csv"

EARLIEST_PLUS_14 = "0001-01-01T00:00:00+14:00"
LATEST_MINUS_14 = "9999-12-31T23:59:59-14:00"


ODD_FILTERS = [
    pytest.param({"limit": "²"}, "Page size must be a number", id="superscript-limit"),
    pytest.param({"limit": "٣"}, "Page size must be a number", id="arabic-indic-limit"),
    pytest.param({"since": EARLIEST_PLUS_14}, OUT_OF_RANGE, id="since-before-year-1"),
    pytest.param({"until": LATEST_MINUS_14}, OUT_OF_RANGE, id="until-after-year-9999"),
    pytest.param(
        {"since": EARLIEST_PLUS_14, "until": LATEST_MINUS_14}, OUT_OF_RANGE, id="both-ends"
    ),
    pytest.param(
        {"after": page_link("0001-01-01T00:00:00+14:00|5")},
        "This page link is damaged",
        id="cursor-time-before-year-1",
    ),
    pytest.param(
        {"before": page_link("2026-01-01T00:00:00+00:00|" + "9" * 30)},
        "This page link is damaged",
        id="cursor-id-of-thirty-nines",
    ),
    pytest.param({"after": "9" * 30}, "This page link is damaged", id="thirty-nines-token"),
]


@pytest.mark.parametrize(("params", "message"), ODD_FILTERS)
def test_the_page_explains_odd_input_with_a_400(
    admin_client: Client, params: dict[str, str], message: str
) -> None:
    response = admin_client.get(LIST, params)

    assert response.status_code == 400
    html = unescape(response.content.decode())
    assert 'data-testid="filter-errors"' in html
    assert message in html


@pytest.mark.parametrize(("params", "message"), ODD_FILTERS)
def test_the_export_refuses_odd_input_before_sending_a_byte(
    admin_client: Client, params: dict[str, str], message: str
) -> None:
    event_write(category=Category.SYSTEM, message="never exported")

    response = admin_client.get(EXPORT, params)

    assert response.status_code == 400
    assert not isinstance(response, StreamingHttpResponse)
    body = response.content.decode()
    assert body.startswith("The export was not started:")
    assert message in body


@pytest.mark.parametrize(("params", "message"), ODD_FILTERS)
def test_the_live_tail_refuses_odd_input_quietly(
    admin_client: Client, params: dict[str, str], message: str
) -> None:
    assert admin_client.get(TAIL, params).status_code == 400


def test_a_newest_cursor_of_thirty_nines_is_refused_by_the_tail(admin_client: Client) -> None:
    token = page_link("2026-01-01T00:00:00+00:00|" + "9" * 30)

    assert admin_client.get(TAIL, {"newest": token}).status_code == 400


def test_a_date_in_a_zone_far_ahead_of_utc_is_refused_at_the_edge_of_time(
    admin_client: Client, settings
) -> None:
    # Without a zone the value is taken in the console's zone: here 14 hours ahead of UTC.
    settings.TIME_ZONE = "Pacific/Kiritimati"

    response = admin_client.get(LIST, {"since": "0001-01-01T00:00"})

    assert response.status_code == 400
    assert OUT_OF_RANGE in unescape(response.content.decode())


def test_the_widest_accepted_range_still_shows_the_log(admin_client: Client) -> None:
    event_write(category=Category.SYSTEM, message="inside the range")

    response = admin_client.get(
        LIST, {"since": "0001-01-02T00:00:00+00:00", "until": "9999-12-30T00:00:00+00:00"}
    )

    assert response.status_code == 200
    assert "inside the range" in response.content.decode()


def test_an_ascii_page_size_is_still_accepted_and_capped(admin_client: Client) -> None:
    assert admin_client.get(LIST, {"limit": "20"}).status_code == 200
    assert admin_client.get(LIST, {"limit": "9999999999"}).status_code == 200


def test_a_cursor_at_the_largest_database_id_is_still_accepted(admin_client: Client) -> None:
    event_write(category=Category.SYSTEM, message="older than the cursor")
    token = page_link("9999-12-30T00:00:00+00:00|" + str(2**63 - 1))

    response = admin_client.get(LIST, {"after": token})

    assert response.status_code == 200
    assert "older than the cursor" in response.content.decode()


def test_cursors_out_of_range_do_not_decode() -> None:
    from events.selectors import InvalidCursor

    for raw in ("0001-01-01T00:00:00+14:00|1", "2026-01-01T00:00:00+00:00|" + str(2**63)):
        with pytest.raises(InvalidCursor):
            Cursor.decode(page_link(raw))
