"""Tracking log search: keyset pages with no gaps or repeats, index walks, bounded windows."""

from __future__ import annotations

import random

import pytest

from appliance.mail import tracking
from appliance.mail.tracking import Position, TrackingFilter

from .conftest import NOW, MailData

SENDERS = ["anna@example.com", "ben@example.com", "offers@promo-deals.test"]
RECIPIENTS = ["carla@example.com", "david@example.com"]
VERDICTS = ["spam", "virus", "policy", "clean"]
ACTIONS = ["delivered", "quarantined", "rejected"]


@pytest.fixture
def log(mail: MailData) -> list[dict]:
    """600 entries; many share a second, so pages must split ties by id."""
    rng = random.Random(7)
    rows = []
    base = int(NOW.timestamp())
    for n in range(600):
        row = {
            "logged_at": base - (n // 4) * 60,  # four entries per minute
            "sender": rng.choice(SENDERS),
            "recipient": rng.choice(RECIPIENTS),
            "subject": rng.choice(["Invoice 12", "Lunch?", "You have WON", "100% off_now"]),
            "verdict": rng.choice(VERDICTS),
            "action": rng.choice(ACTIONS),
        }
        row["id"] = mail.tracking(0, **row)
        rows.append(row)
    mail.commit()
    return rows


def _expected(rows: list[dict], match) -> list[int]:
    chosen = [r for r in rows if match(r)]
    chosen.sort(key=lambda r: (r["logged_at"], r["id"]), reverse=True)
    return [r["id"] for r in chosen]


def _walk_older(search: TrackingFilter, limit: int) -> list[int]:
    seen: list[int] = []
    page = tracking.tracking_page(search, limit=limit)
    for _ in range(1000):
        seen += [entry.id for entry in page.entries]
        if page.older is None:
            return seen
        page = tracking.tracking_page(search, after=page.older, limit=limit)
    raise AssertionError("paging did not end")


CASES = [
    (TrackingFilter(), lambda r: True),
    (TrackingFilter(sender="ANNA@example.com"), lambda r: r["sender"] == "anna@example.com"),
    (
        TrackingFilter(recipient="david@example.com"),
        lambda r: r["recipient"] == "david@example.com",
    ),
    (TrackingFilter(verdict="virus"), lambda r: r["verdict"] == "virus"),
    (TrackingFilter(action="rejected"), lambda r: r["action"] == "rejected"),
    (TrackingFilter(subject="won"), lambda r: "WON" in r["subject"]),
    (TrackingFilter(subject="100%"), lambda r: "100%" in r["subject"]),
    (TrackingFilter(subject="f_n"), lambda r: "f_n" in r["subject"]),
    (
        TrackingFilter(sender="ben@example.com", recipient="carla@example.com", verdict="spam"),
        lambda r: (
            (r["sender"], r["recipient"], r["verdict"])
            == ("ben@example.com", "carla@example.com", "spam")
        ),
    ),
]


@pytest.mark.parametrize(("search", "match"), CASES)
@pytest.mark.parametrize("window", [10_000, 25])
def test_paging_older_visits_every_match_once_in_order(log, monkeypatch, search, match, window):
    # A small window makes the rare filters go through several "searched to" pages.
    monkeypatch.setattr(tracking, "SEARCH_WINDOW", window)

    assert _walk_older(search, limit=7) == _expected(log, match)


def test_a_time_range_includes_from_and_excludes_until(log):
    since = int(NOW.timestamp()) - 60 * 20
    until = int(NOW.timestamp()) - 60 * 10
    search = TrackingFilter(since=since, until=until)

    assert _walk_older(search, limit=9) == _expected(log, lambda r: since <= r["logged_at"] < until)


@pytest.mark.parametrize("window", [10_000, 25])
def test_paging_newer_walks_back_to_the_same_pages(log, monkeypatch, window):
    monkeypatch.setattr(tracking, "SEARCH_WINDOW", window)
    search = TrackingFilter(action="quarantined")
    pages = [tracking.tracking_page(search, limit=10)]
    for _ in range(4):
        pages.append(tracking.tracking_page(search, after=pages[-1].older, limit=10))

    back = tracking.tracking_page(search, before=pages[3].newer, limit=10)

    assert [e.id for e in back.entries] == [e.id for e in pages[2].entries]


def test_the_newest_page_has_no_newer_link_and_the_last_no_older_link(log):
    first = tracking.tracking_page(TrackingFilter(), limit=600)

    assert first.newer is None and first.older is None
    assert len(first.entries) == 600


@pytest.mark.parametrize(
    "search",
    [
        TrackingFilter(),
        TrackingFilter(sender="anna@example.com"),
        TrackingFilter(recipient="carla@example.com", subject="x"),
        TrackingFilter(verdict="spam", action="rejected", since=1, until=2**40),
    ],
)
def test_every_page_walks_an_index_in_order_without_sorting(log, search):
    plan = " | ".join(tracking.query_plan(search, after=Position(int(NOW.timestamp()), 10)))

    assert "USING INDEX tracking_log_" in plan or "USING COVERING INDEX tracking_log_" in plan
    assert "TEMP B-TREE" not in plan
    assert "OFFSET" not in plan


def test_an_entry_says_whether_its_quarantined_copy_is_still_stored(mail: MailData):
    kept = mail.message("Spam quarantine", 1)
    gone = mail.message("Spam quarantine", 2)
    mail.tracking(1, action="quarantined", quarantine_id=kept)
    mail.tracking(2, action="quarantined", quarantine_id=gone)
    mail.tracking(3, action="delivered")
    mail.conn.execute("DELETE FROM quarantined_message WHERE id = ?", (gone,))
    mail.commit()

    entries = tracking.tracking_page(TrackingFilter()).entries

    assert [(e.quarantine_id, e.stored) for e in entries] == [
        (kept, True),
        (gone, False),
        (None, False),
    ]


def test_a_copy_that_took_over_a_deleted_copys_id_is_not_shown_as_the_old_rows(mail: MailData):
    # SQLite gives the id of a deleted newest row to the next one: the old row's copy is gone.
    gone = mail.message("Virus quarantine", 2)
    mail.tracking(2, action="quarantined", quarantine_id=gone)
    mail.conn.execute("DELETE FROM quarantined_message WHERE id = ?", (gone,))
    newcomer = mail.message("Spam quarantine", 1)
    mail.tracking(1, action="quarantined", quarantine_id=newcomer)
    mail.commit()
    assert newcomer == gone

    entries = tracking.tracking_page(TrackingFilter()).entries

    assert [(e.quarantine_id, e.stored) for e in entries] == [(newcomer, True), (gone, False)]


@pytest.mark.parametrize("token", ["", "!!!", "YWJj", "MTIzLi0x"])  # "abc", "123.-1"
def test_a_damaged_page_link_is_refused(token):
    with pytest.raises(tracking.InvalidPosition):
        Position.decode(token)


def test_a_position_survives_the_url():
    position = Position(1763640000, 123456)

    assert Position.decode(position.encode()) == position
