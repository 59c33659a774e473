"""Message Tracking given odd input: every one is a 400 with a message, never a 500 (issue 13).

Each value here once reached a conversion that raised: a superscript digit that isdigit() but
int() refuses, times whose UTC equivalent falls outside the years 1 to 9999, page links whose
numbers SQLite cannot hold.
"""

from __future__ import annotations

import re
from html import unescape

import pytest
from django.test import Client

from appliance.mail import tracking
from tests.support.log_filters import WIDEST_RANGE, damaged_link
from tests.support.odd_input import OUT_OF_RANGE, OUT_OF_RANGE_TIMES, page_link

from .conftest import MailData

pytestmark = pytest.mark.django_db

TRACKING = "/mail-security/policy/message-tracking/"
THIRTY_NINES = "9" * 30


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"limit": "²"}, "Page size must be a number", id="superscript-limit"),
        pytest.param({"limit": "٣"}, "Page size must be a number", id="arabic-indic-limit"),
        *OUT_OF_RANGE_TIMES,
        damaged_link({"after": page_link(f"{THIRTY_NINES}.1")}, "position-time-of-thirty-nines"),
        damaged_link(
            {"before": page_link(f"1700000000.{THIRTY_NINES}")}, "position-id-of-thirty-nines"
        ),
        damaged_link({"after": page_link(f"-{THIRTY_NINES}.1")}, "position-time-far-before-year-1"),
        damaged_link({"after": THIRTY_NINES}, "raw-thirty-nines"),
    ],
)
def test_the_search_explains_odd_input_with_a_400(
    demo_appliance, admin_client: Client, params: dict[str, str], message: str
) -> None:
    response = admin_client.get(TRACKING, params)

    assert response.status_code == 400
    html = unescape(response.content.decode())
    assert 'data-testid="filter-errors"' in html and message in html


def test_a_date_in_a_zone_far_ahead_of_utc_is_refused_at_the_edge_of_time(
    demo_appliance, admin_client: Client, settings
) -> None:
    settings.TIME_ZONE = "Pacific/Kiritimati"  # UTC+14: 0001-01-01 local is before year 1 UTC

    response = admin_client.get(TRACKING, {"since": "0001-01-01T00:00"})

    assert response.status_code == 400
    assert OUT_OF_RANGE in unescape(response.content.decode())


def test_the_widest_accepted_range_still_finds_entries(
    admin_client: Client, mail: MailData
) -> None:
    mail.tracking(0.1, subject="Inside the range")
    mail.commit()

    response = admin_client.get(TRACKING, WIDEST_RANGE)

    assert response.status_code == 200
    assert "Inside the range" in response.content.decode()


def test_a_position_at_the_largest_row_id_is_still_a_page(
    admin_client: Client, mail: MailData
) -> None:
    mail.tracking(0.1, subject="Older than the link")
    mail.commit()
    latest = int(tracking.LATEST.timestamp())

    response = admin_client.get(TRACKING, {"after": page_link(f"{latest}.{2**63 - 1}")})

    assert response.status_code == 200
    assert re.findall(r'data-entry-id="(\d+)"', response.content.decode())


def test_positions_out_of_range_do_not_decode() -> None:
    for raw in (f"{THIRTY_NINES}.1", f"1700000000.{2**63}", "1700000000.-1"):
        with pytest.raises(tracking.InvalidPosition):
            tracking.Position.decode(page_link(raw))
