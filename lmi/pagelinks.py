"""Page links of the logs read by keyset: System > Events and Message Tracking.

Such a log may hold a million rows, so it is never counted and never paged by OFFSET: a page is
addressed by a position, the time and id of one row, carried in the URL as an opaque token (the
unpadded urlsafe base64 of the position written as text). Each log writes its position in its
own words (``events.selectors.Cursor``, ``appliance.mail.tracking.Position``); the token, the
range a position may name and the refusal of a damaged link are the same for both, and here.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Literal

Direction = Literal["older", "newer"]

# The times a filter or a page link may name: a day inside datetime's years 1 to 9999, so that a
# time converts to UTC, to any time zone (never a day away) and back from epoch seconds without
# OverflowError. Outside it, the conversion raised and the page was a 500 (issue 13).
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)
# The largest id a row can have: a signed 64-bit integer, in SQLite and PostgreSQL alike. A
# larger one in a page link raised OverflowError in SQLite (a link of thirty 9s, issue 13).
MAX_ROW_ID = 2**63 - 1

DAMAGED = "This page link is damaged; start again from the newest."


def encode(text: str) -> str:
    """The token of a position written as ``text``: urlsafe base64 without its padding."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(token: str) -> bytes:
    """The bytes :func:`encode` wrote into ``token``; ``binascii.Error`` (a ``ValueError``) when
    it is not base64."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
