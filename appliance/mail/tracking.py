"""Searching the message tracking log (Mail Security > Policy > Message Tracking / Reporting).

The log holds a row per recipient of every message, a million rows and more, so it is never
counted and never paged by OFFSET. A page is addressed by a position, the (logged_at, id) of a
row, and walks one index in the log's order from there:

    WHERE logged_at <= t AND (logged_at < t OR (logged_at = t AND id < i))
    ORDER BY logged_at DESC, id DESC LIMIT n

The index is chosen from the filters, most selective first: (sender, logged_at), then
(recipient, logged_at), then (verdict, logged_at), else (logged_at); ``INDEXED BY`` pins it so
the plan never depends on statistics. An index's entries end with the rowid, so each of them is
in exactly the page order.

Conditions no index answers in that order (a second address, a domain or part of an address,
the action, words of the subject, a release) are tested on the rows the index yields, but a
page reads at most ``SEARCH_WINDOW`` of them past its position: a rare match must not turn one
page into a scan of the whole log. When the window holds less than a page of matches, the page
says how far it searched and its Older link goes on from there.
"""

from __future__ import annotations

import binascii
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.mail import msgstore, quarantine
from lmi import pagelinks
from lmi.pagelinks import EARLIEST, LATEST, MAX_ROW_ID, Direction

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
SEARCH_WINDOW = 10_000

# The range of a position's time (lmi.pagelinks says why), in the epoch seconds it is written in.
_EARLIEST_SECOND = int(EARLIEST.timestamp())
_LATEST_SECOND = int(LATEST.timestamp())


class InvalidPosition(ValueError):
    """A page link that was not made by Position.encode."""


@dataclass(frozen=True, order=True)
class Position:
    """A place in the log: one row's time (epoch seconds) and id; compares in log order."""

    logged_at: int
    id: int

    def encode(self) -> str:
        return pagelinks.encode(f"{self.logged_at}.{self.id}")

    @classmethod
    def decode(cls, token: str) -> Position:
        try:
            when, _, ident = pagelinks.decode(token).decode("ascii").partition(".")
            position = cls(int(when), int(ident))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidPosition(pagelinks.DAMAGED) from exc
        if (
            not _EARLIEST_SECOND <= position.logged_at <= _LATEST_SECOND
            or not 0 <= position.id <= MAX_ROW_ID
        ):
            raise InvalidPosition(pagelinks.DAMAGED)
        return position


# The statuses a search can ask for: the log's own actions, and "released" (a quarantined
# message an administrator delivered on, recorded with its stored copy, not in the log).
RELEASED = "released"
STATUSES = (*msgstore.ACTIONS, RELEASED)


def _like(text: str) -> str:
    """text for a LIKE pattern with ESCAPE '\\': its %, _ and \\ match only themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def address_pattern(text: str) -> tuple[str, str]:
    """How an address search is matched: ("=", address) for a whole address (an index walk),
    ("LIKE", pattern) for a domain ("@example.com": addresses at exactly that domain) or any
    other part of an address ("anna", "example.com": addresses containing it). Any case."""
    local, at, domain = text.partition("@")
    if at and local and domain:
        return "=", text
    if at and not local:
        return "LIKE", "%@" + _like(domain)
    return "LIKE", "%" + _like(text) + "%"


@dataclass(frozen=True)
class TrackingFilter:
    """What to look for; every condition is optional and the given ones all apply.

    sender and recipient are a whole address, a domain (@example.com) or a part of an address
    (see :func:`address_pattern`), any case; subject is a part of the subject, any case; action
    is one of :data:`STATUSES`; since is inclusive and until exclusive (epoch seconds).
    """

    sender: str = ""
    recipient: str = ""
    subject: str = ""
    verdict: str = ""
    action: str = ""
    since: int | None = None
    until: int | None = None

    def plan(
        self, *, releases: bool = True
    ) -> tuple[str, list[str], list[object], list[str], list[object]]:
        """(index, indexed conditions, their parameters, other conditions, their parameters).

        releases: whether the store has a release record at all (none was ever released
        otherwise, and the table does not exist yet).
        """
        keyed: list[tuple[str, str, str, str]] = []
        for name, column, value in (
            ("tracking_log_sender", "sender", self.sender),
            ("tracking_log_recipient", "recipient", self.recipient),
        ):
            if value:
                keyed.append((name, column, *address_pattern(value)))
        if self.verdict:
            keyed.append(("tracking_log_verdict", "verdict", "=", self.verdict))
        index = "tracking_log_logged_at"
        indexed: list[str] = []
        indexed_params: list[object] = []
        other: list[str] = []
        other_params: list[object] = []
        for name, column, operator, value in keyed:
            if operator == "=" and not indexed:
                index = name
                indexed.append(f"{column} = ?")
                indexed_params.append(value)
            elif operator == "=":
                other.append(f"{column} = ?")
                other_params.append(value)
            else:
                other.append(f"{column} LIKE ? ESCAPE '\\'")
                other_params.append(value)
        if self.since is not None:
            indexed.append("logged_at >= ?")
            indexed_params.append(self.since)
        if self.until is not None:
            indexed.append("logged_at < ?")
            indexed_params.append(self.until)
        if self.action == RELEASED:
            # quarantine_release is small (one row per release) and keyed by the message.
            other.append(
                "quarantine_id IN (SELECT message_id FROM quarantine_release"
                " WHERE state = 'released')"
                if releases
                else "0"
            )
        elif self.action:
            other.append("action = ?")
            other_params.append(self.action)
        if self.subject:
            other.append("subject LIKE ? ESCAPE '\\'")
            other_params.append(f"%{_like(self.subject)}%")
        return index, indexed, indexed_params, other, other_params


@dataclass(frozen=True)
class TrackingEntry:
    """One row of the log; stored says whether the quarantined copy is still kept, released
    whether an administrator delivered that copy on."""

    id: int
    logged_at: datetime
    message_id: str
    sender: str
    recipient: str
    subject: str
    verdict: str
    action: str
    size: int
    quarantine_id: int | None
    stored: bool
    released: bool = False

    @property
    def position(self) -> Position:
        return Position(int(self.logged_at.timestamp()), self.id)


@dataclass(frozen=True)
class TrackingPage:
    """One page, newest first, and where its neighbours start (see events.selectors.EventPage).

    older: the position the next page back starts after (None at the oldest end); newer: the
    one the page before starts before (None on the newest page). searched_to: set when the
    search window ended before a page was filled; older then points past it.
    """

    entries: list[TrackingEntry]
    older: Position | None
    newer: Position | None
    searched_to: Position | None = None


_COLUMNS = (
    "id, logged_at, message_id, sender, recipient, subject, verdict, action, size, quarantine_id"
)


def _beyond(position: Position, direction: Direction) -> tuple[str, list[object]]:
    t, i = position.logged_at, position.id
    if direction == "older":
        return "logged_at <= ? AND (logged_at < ? OR (logged_at = ? AND id < ?))", [t, t, t, i]
    return "logged_at >= ? AND (logged_at > ? OR (logged_at = ? AND id > ?))", [t, t, t, i]


def _up_to(position: Position, direction: Direction) -> tuple[str, list[object]]:
    """Rows no further than position, its own row included: the far end of a search window."""
    t, i = position.logged_at, position.id
    if direction == "older":
        return "logged_at >= ? AND (logged_at > ? OR (logged_at = ? AND id >= ?))", [t, t, t, i]
    return "logged_at <= ? AND (logged_at < ? OR (logged_at = ? AND id <= ?))", [t, t, t, i]


def _order(direction: Direction) -> str:
    return "logged_at DESC, id DESC" if direction == "older" else "logged_at ASC, id ASC"


def _where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def _slice(
    conn: sqlite3.Connection,
    search: TrackingFilter,
    position: Position | None,
    direction: Direction,
    count: int,
) -> tuple[list[sqlite3.Row], Position | None]:
    """Up to count matching rows beyond position, nearest first, and the window's far end
    when the window was read to its end without finding count rows."""
    index, conditions, params, other, other_params = search.plan(
        releases=quarantine.has_release_table(conn)
    )
    conditions, params = list(conditions), list(params)
    if position is not None:
        beyond, beyond_params = _beyond(position, direction)
        conditions.append(beyond)
        params += beyond_params
    source = f"tracking_log INDEXED BY {index}"
    edge: Position | None = None
    if other:
        # The window: the next SEARCH_WINDOW entries of the index, read from the index alone.
        # Its far end is the last of them; a window shorter than that reaches the log's end.
        window = (
            f"SELECT logged_at, id FROM {source}{_where(conditions)}"  # noqa: S608
            f" ORDER BY {_order(direction)} LIMIT ?"
        )
        far = "logged_at ASC, id ASC" if direction == "older" else "logged_at DESC, id DESC"
        row = conn.execute(
            f"SELECT logged_at, id, count(*) OVER () FROM ({window}) ORDER BY {far} LIMIT 1",  # noqa: S608
            (*params, SEARCH_WINDOW),
        ).fetchone()
        if row is not None and row[2] >= SEARCH_WINDOW:
            edge = Position(row[0], row[1])
            up_to, up_to_params = _up_to(edge, direction)
            conditions.append(up_to)
            params += up_to_params
        conditions += other
        params += other_params
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM {source}{_where(conditions)}"  # noqa: S608
        f" ORDER BY {_order(direction)} LIMIT ?",
        (*params, count),
    ).fetchall()
    if len(rows) < count and edge is not None:
        return rows, edge
    return rows, None


def _entries(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[TrackingEntry]:
    """The rows as entries, each knowing whether its quarantined copy is still stored and
    whether it was released.

    A copy counts as this row's only when its Message-ID and the second it was received match
    the row's too: the store's ids are SQLite rowids, so deleting the newest copy frees its id
    for the next message quarantined, and a bare id match would show (and offer to delete)
    someone else's mail as this row's.
    """
    ids = [row["quarantine_id"] for row in rows if row["quarantine_id"] is not None]
    copies: dict[int, tuple[str, int]] = {}
    released: set[int] = set()
    if ids:
        marks = ",".join("?" * len(ids))
        copies = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT id, message_id, received_at FROM quarantined_message"  # noqa: S608
                f" WHERE id IN ({marks})",
                ids,
            )
        }
        if quarantine.has_release_table(conn):
            released = {
                r[0]
                for r in conn.execute(
                    "SELECT message_id FROM quarantine_release"  # noqa: S608
                    f" WHERE state = 'released' AND message_id IN ({marks})",
                    ids,
                )
            }
    return [
        TrackingEntry(
            id=row["id"],
            logged_at=datetime.fromtimestamp(row["logged_at"], tz=UTC),
            message_id=row["message_id"],
            sender=row["sender"],
            recipient=row["recipient"],
            subject=row["subject"],
            verdict=row["verdict"],
            action=row["action"],
            size=row["size"],
            quarantine_id=row["quarantine_id"],
            stored=copies.get(row["quarantine_id"]) == (row["message_id"], row["logged_at"]),
            released=row["quarantine_id"] in released,
        )
        for row in rows
    ]


def message_entries(
    copy: quarantine.QuarantinedCopy, root: Path | None = None
) -> list[TrackingEntry]:
    """The log's rows of one stored message (one per recipient), found through the sender
    index at the second it was received: the log has no index on quarantine_id."""
    conn = msgstore.connect(root, readonly=True)
    try:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM tracking_log INDEXED BY tracking_log_sender"  # noqa: S608
            " WHERE sender = ? AND logged_at = ? AND quarantine_id = ? ORDER BY id LIMIT ?",
            (copy.sender, copy.received_at, copy.id, MAX_PAGE_SIZE),
        ).fetchall()
        return _entries(conn, rows)
    finally:
        conn.close()


def _position(row: sqlite3.Row) -> Position:
    return Position(row["logged_at"], row["id"])


def tracking_page(
    search: TrackingFilter,
    *,
    after: Position | None = None,
    before: Position | None = None,
    limit: int = PAGE_SIZE,
    root: Path | None = None,
) -> TrackingPage:
    """The page older than after, newer than before, or (neither) the newest one."""
    if after is not None and before is not None:
        raise ValueError("a page starts after one row or before one, not both")
    conn = msgstore.connect(root, readonly=True)
    try:
        if before is not None:
            rows, searched_to = _slice(conn, search, before, "newer", limit + 1)
            if len(rows) > limit or searched_to is not None:
                rows = rows[:limit]
                rows.reverse()
                newer = searched_to or _position(rows[0])
                return TrackingPage(_entries(conn, rows), before, newer, searched_to)
            # Less than a page of newer rows is left: the newest page instead.
            after = None
        rows, searched_to = _slice(conn, search, after, "older", limit + 1)
        older: Position | None = None
        if len(rows) > limit:
            rows = rows[:limit]
            older = _position(rows[-1])
        elif searched_to is not None:
            older = searched_to
        newer = (_position(rows[0]) if rows else after) if after is not None else None
        return TrackingPage(_entries(conn, rows), older, newer, searched_to)
    finally:
        conn.close()


def query_plan(search: TrackingFilter, after: Position | None = None) -> list[str]:
    """SQLite's plan for a page's main query (tests check it walks an index in order)."""
    index, conditions, params, other, other_params = search.plan()
    conditions, params = list(conditions) + list(other), list(params) + list(other_params)
    if after is not None:
        beyond, beyond_params = _beyond(after, "older")
        conditions.append(beyond)
        params += beyond_params
    conn = msgstore.connect(readonly=True)
    try:
        rows = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT {_COLUMNS} FROM tracking_log INDEXED BY {index}"  # noqa: S608
            f"{_where(conditions)} ORDER BY {_order('older')} LIMIT ?",
            (*params, PAGE_SIZE + 1),
        ).fetchall()
    finally:
        conn.close()
    return [row[3] for row in rows]
