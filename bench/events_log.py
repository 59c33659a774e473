"""Benchmark of System > Events over a million-row event log.

    .venv/bin/python bench/events_log.py      # a fresh SQLite database in a temp dir
    LMI_DATABASE_URL=postgres://postgres@127.0.0.1:5432/lmi_bench \
        .venv/bin/python bench/events_log.py

Fills the log with 1,000,000 events over 90 days, then requests the pages through the Django
test client, logged in, so the figures include middleware, the form, the query and the templates.
Each case is requested --repeat times (after one warm-up request); p50 and p95 are printed in ms.
With --json the figures are printed once more as one JSON line. A PostgreSQL database must have
"bench" in its name: the script empties its event table.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from _report import add_json_flag, emit, ratio  # bench/ is sys.path[0]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")

NODES = ("central", "central", "mx1", "mx2", "mx3", "mx4")
USERS = ("admin", "jsmith", "mchen", "operator", "backup-svc", "akowalski")
SEVERITIES = ((10, 0.15), (20, 0.65), (30, 0.13), (40, 0.06), (50, 0.01))
CATEGORIES = (
    ("mail", 0.40),
    ("smtp", 0.25),
    ("auth", 0.12),
    ("system", 0.08),
    ("config", 0.05),
    ("cluster", 0.05),
    ("update", 0.03),
    ("backup", 0.02),
)
DOMAINS = ("example.com", "contoso.net", "mail.ru", "bigcorp.de", "uni-graz.at", "acme.io")


def _message(rng: random.Random, category: str, severity: int, user: str) -> tuple[str, dict]:
    """A message of the kind the appliance writes for this category, with its details."""
    ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    sender = f"{rng.choice(('info', 'news', 'j.doe', 'billing', 'noreply'))}@{rng.choice(DOMAINS)}"
    msgid = f"{rng.getrandbits(40):010x}"
    if category == "mail":
        score = round(rng.uniform(0, 15), 1)
        verdict = rng.choice(("quarantined as spam", "delivered", "virus found, dropped", "held"))
        return f"Message {msgid} from {sender} {verdict} (score {score})", {
            "message_id": msgid,
            "score": score,
            "policy": rng.choice(("Default", "Executives", "Inbound strict")),
        }
    if category == "smtp":
        code = rng.choice((250, 421, 450, 550, 554))
        return f"SMTP {code} from {ip} for {sender}", {"peer": ip, "code": code, "queue": msgid}
    if category == "auth":
        if severity >= 30:
            return f"Login failed for {user} from {ip}", {"client_ip": ip, "failures": 3}
        return f"User {user} logged in from {ip}", {"client_ip": ip}
    if category == "config":
        section = rng.choice(("Policy Objects", "SMTP relay", "Network", "Time", "LDAP"))
        return f"{section} changed by {user}", {"section": section, "revision": rng.randrange(9999)}
    if category == "cluster":
        return f"Member {rng.choice(NODES[2:])} heartbeat {rng.choice(('ok', 'late', 'lost'))}", {}
    if category == "update":
        return f"Update check: {rng.choice(('no new firmware', 'XPU 3.41 available'))}", {}
    if category == "backup":
        return f"Configuration snapshot {msgid} {rng.choice(('created', 'restored'))}", {}
    return f"Service {rng.choice(('postfix', 'clamd', 'celery', 'ntpd'))} restarted", {}


def _weighted(rng: random.Random, table: tuple[tuple[object, float], ...], n: int) -> list:
    values, weights = zip(*table, strict=True)
    return rng.choices(values, weights=weights, k=n)


def event_rows(total: int, days: int, seed: int = 2026) -> Iterator[tuple]:
    """(created_at, severity, category, node, username, message, details) oldest first, with
    the odd burst of events sharing one timestamp, as when a cluster member reports late."""
    rng = random.Random(seed)
    from django.utils import timezone

    end = timezone.now().replace(microsecond=0)
    moment = end - timedelta(days=days)
    mean_gap = days * 86400 / (total * 0.95)  # one event in twenty shares the previous time
    severities = _weighted(rng, SEVERITIES, total)
    categories = _weighted(rng, CATEGORIES, total)
    for n in range(total):
        if rng.random() > 0.05:
            moment += timedelta(seconds=rng.expovariate(1 / mean_gap))
        category = categories[n]
        user = rng.choice(USERS) if category in ("auth", "config", "backup", "update") else ""
        message, details = _message(rng, category, severities[n], user)
        yield (moment, severities[n], category, rng.choice(NODES), user, message, details)


def fill(total: int, days: int, batch: int = 20_000) -> float:
    """Insert the events with executemany in large transactions; returns the seconds taken."""
    from django.db import connection, transaction

    from events.models import Event

    fields = [Event._meta.get_field(name) for name in ("created_at", "details")]
    created_field, details_field = fields
    table = connection.ops.quote_name(Event._meta.db_table)
    sql = (
        f"INSERT INTO {table} (created_at, severity, category, node, username, message, details) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)"
    )
    started = time.perf_counter()
    rows: list[tuple] = []

    def flush() -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(sql, rows)
        rows.clear()

    for created_at, *middle, details in event_rows(total, days):
        rows.append(
            (
                created_field.get_db_prep_value(created_at, connection),
                *middle,
                details_field.get_db_prep_value(details, connection),
            )
        )
        if len(rows) >= batch:
            flush()
    if rows:
        flush()
    return time.perf_counter() - started


def measure(repeat: int, action: Callable[[], object]) -> tuple[float, float, object]:
    """p50 and p95 in ms of repeat calls (after one warm-up), and the last result."""
    result = action()
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = action()
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    p95 = timings[min(len(timings) - 1, round(0.95 * (len(timings) - 1)))]
    return statistics.median(timings), p95, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--exports", type=int, default=3, help="full CSV exports to time")
    parser.add_argument(
        "--var-dir",
        help="LMI_VAR_DIR to use and keep (default: a temp dir, a fresh SQLite db, removed after)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep the events already there if there are --rows"
    )
    parser.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run ANALYZE after the fill (default: on PostgreSQL, as autovacuum would; not on"
        " SQLite, where Django never does)",
    )
    add_json_flag(parser)
    args = parser.parse_args()

    if args.var_dir:
        os.environ["LMI_VAR_DIR"] = args.var_dir
    else:
        temp_dir = tempfile.mkdtemp(prefix="lmi-bench-")
        atexit.register(shutil.rmtree, temp_dir, ignore_errors=True)
        os.environ["LMI_VAR_DIR"] = temp_dir
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from accounts.services import user_create
    from events.models import Event
    from events.selectors import Cursor, EventFilter, event_page

    # No setup_test_environment(): its template instrumentation would be measured too.
    settings.DEBUG = False
    vendor = connection.vendor
    database = settings.DATABASES["default"]["NAME"]
    if vendor != "sqlite" and "bench" not in str(database):
        sys.exit(f"refusing to empty the event table of {database!r}: name it *bench*")
    call_command("migrate", verbosity=0)
    print(f"database: {vendor} {database}")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    fill_seconds: float | None = None
    if args.reuse and Event.objects.count() >= args.rows:
        print(f"reusing the {Event.objects.count():,} events already there")
    else:
        table = connection.ops.quote_name(Event._meta.db_table)
        with connection.cursor() as cursor:
            if vendor == "postgresql":
                cursor.execute(f"TRUNCATE {table} RESTART IDENTITY")
            else:
                cursor.execute(f"DELETE FROM {table}")
        fill_seconds = fill(args.rows, args.days)
        print(
            f"filled {args.rows:,} events in {fill_seconds:.1f} s "
            f"({args.rows / fill_seconds:,.0f} rows/s)"
        )
    analyze = args.analyze if args.analyze is not None else vendor == "postgresql"
    if analyze:
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE" if vendor == "postgresql" else "ANALYZE")
    print(f"planner statistics: {'ANALYZE run' if analyze else 'none (no ANALYZE)'}\n")
    rows = Event.objects.count()

    from django.contrib.auth import get_user_model

    get_user_model().objects.filter(username="bench").delete()
    client = Client()
    client.force_login(user_create("bench", "bench-password-1234", administrator=True))

    def get(url: str) -> Callable[[], int]:
        def request() -> int:
            response = client.get(url)
            assert response.status_code in (200, 204), (url, response.status_code)
            return len(response.content)

        return request

    deep = min(900_000, rows - 100)
    newest = Event.objects.order_by("-created_at", "-id")
    deep_row = newest.values_list("created_at", "id")[deep - 1 : deep][0]
    deep_cursor = Cursor(*deep_row).encode()
    middle = newest.values_list("created_at", flat=True)[rows // 2]
    local = timezone.localtime(middle).replace(tzinfo=None)
    day = f"since={local:%Y-%m-%dT%H:%M}&until={local + timedelta(days=1):%Y-%m-%dT%H:%M}"
    # (key in the JSON line, label, URL)
    cases = [
        ("first_page", "first page", "/system/events/"),
        (
            "deep_page",
            f"deep page (keyset, ~{deep:,} rows back)",
            f"/system/events/?after={deep_cursor}",
        ),
        (
            "warning_auth",
            "severity >= warning + category auth",
            "/system/events/?severity=warning&category=auth",
        ),
        (
            "critical_cluster",
            "severity >= critical + category cluster",
            "/system/events/?severity=critical&category=cluster",
        ),
        (
            "error_deep_page",
            "severity >= error, deep page",
            f"/system/events/?severity=error&after={deep_cursor}",
        ),
        ("time_range", "time range (one day, 45 days ago)", f"/system/events/?{day}"),
        (
            "time_range_error",
            "time range + severity >= error",
            f"/system/events/?{day}&severity=error",
        ),
        (
            "search_common",
            "text search, common word (q=quarantined)",
            "/system/events/?q=quarantined",
        ),
        ("search_user", "text search, user name (q=akowalski)", "/system/events/?q=akowalski"),
        ("search_no_match", "text search, no match (q=zzzz)", "/system/events/?q=zzzz"),
        (
            "search_no_match_deep",
            "text search, no match, deep page",
            f"/system/events/?q=zzzz&after={deep_cursor}",
        ),
        (
            "tail_poll",
            "live tail poll, nothing new",
            "/system/events/tail/?newest="
            + Cursor(*newest.values_list("created_at", "id")[0]).encode(),
        ),
    ]
    pages: dict[str, dict[str, float]] = {}
    print(f"{'case':58} {'p50 ms':>8} {'p95 ms':>8}")
    for key, label, url in cases:
        p50, p95, _ = measure(args.repeat, get(url))
        pages[key] = {"p50_ms": p50, "p95_ms": p95}
        print(f"{label:58} {p50:8.1f} {p95:8.1f}")

    # The same deep page read both ways, the query alone (no request, no template).
    everything = EventFilter()
    keyset = lambda: event_page(everything, after=Cursor(*deep_row)).events  # noqa: E731
    offset = lambda: list(newest[deep : deep + 50])  # noqa: E731
    k50, k95, k_rows = measure(args.repeat, keyset)
    o50, o95, o_rows = measure(max(5, args.repeat // 3), offset)
    assert [e.id for e in k_rows] == [e.id for e in o_rows], "keyset and OFFSET pages differ"
    print(
        f"\ndeep page query alone: keyset p50 {k50:.2f} ms p95 {k95:.2f} ms;"
        f" OFFSET [{deep}:{deep + 50}] p50 {o50:.1f} ms p95 {o95:.1f} ms;"
        f" OFFSET/keyset {o50 / k50:,.0f}x at p50"
    )

    def export(query: str = "") -> Callable[[], int]:
        def request() -> int:
            response = client.get("/system/events/export.csv" + query)
            assert response.status_code == 200, (query, response.status_code)
            return sum(chunk.count(b"\n") for chunk in response.streaming_content) - 1

        return request

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    durations = []
    for _ in range(args.exports):
        started = time.perf_counter()
        exported = export()()
        durations.append(time.perf_counter() - started)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = statistics.median(durations)
    print(
        f"\nCSV export of all {exported:,} rows: {exported / seconds:,.0f} rows/s"
        f" ({seconds:.1f} s, median of {args.exports});"
        f" peak RSS {rss_before / 1024:.0f} MB before the exports, {rss_after / 1024:.0f} MB after"
    )
    p50, p95, filtered = measure(args.repeat, export("?severity=critical&category=auth"))
    print(f"CSV export, critical + auth ({filtered:,} rows): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    if args.json:
        emit(
            "events_log",
            database=vendor,
            rows=rows,
            repeat=args.repeat,
            fill_s=fill_seconds,
            fill_rows_s=None if fill_seconds is None else ratio(args.rows, fill_seconds),
            pages=pages,
            deep_query={
                "keyset_p50_ms": k50,
                "keyset_p95_ms": k95,
                "offset_p50_ms": o50,
                "offset_p95_ms": o95,
                "offset_over_keyset": ratio(o50, k50),
            },
            export_rows=exported,
            export_s=seconds,
            export_rows_s=ratio(exported, seconds),
            rss_mb_before=rss_before / 1024,
            rss_mb_after=rss_after / 1024,
            export_filtered={"rows": filtered, "p50_ms": p50, "p95_ms": p95},
        )


if __name__ == "__main__":
    main()
