"""Reading the message store's tables directly, for tests that check what was written."""

from __future__ import annotations

from appliance.mail import msgstore


def store_rows(sql: str, *params: object) -> list[tuple[object, ...]]:
    """The rows ``sql`` reads from the message store, on a read-only connection of its own."""
    conn = msgstore.connect(readonly=True)
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()
