"""Odd input shared by the tests of issue 13 (odd input is a 400 with a message, never a 500)."""

from __future__ import annotations

import base64

OUT_OF_RANGE = "is out of range: enter a time between 0001-01-02 and 9999-12-30 UTC."


def page_link(raw: str) -> str:
    """A page link (an event cursor, a tracking position) as the console encodes one, around any
    text."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
