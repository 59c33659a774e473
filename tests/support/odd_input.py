"""Odd input shared by the tests of issue 13 (odd input is a 400 with a message, never a 500)."""

from __future__ import annotations

import base64

import pytest

OUT_OF_RANGE = "is out of range: enter a time between 0001-01-02 and 9999-12-30 UTC."
# Times whose UTC equivalent falls before year 1 or after year 9999: converting them raised.
BEFORE_YEAR_1 = "0001-01-01T00:00:00+14:00"
AFTER_YEAR_9999 = "9999-12-31T23:59:59-14:00"
# The since and until of every log's filter form, refused with OUT_OF_RANGE: (params, words).
OUT_OF_RANGE_TIMES = [
    pytest.param({"since": BEFORE_YEAR_1}, OUT_OF_RANGE, id="early-since"),
    pytest.param({"until": AFTER_YEAR_9999}, OUT_OF_RANGE, id="late-until"),
]


def page_link(raw: str) -> str:
    """A page link (an event cursor, a tracking position) as the console encodes one, around any
    text."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
