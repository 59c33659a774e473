"""Benchmark of the retention purge on a message store of a million expired messages.

    .venv/bin/python bench/purge.py [--messages N] [--probe-seconds S] [--no-partial] [--json]

Builds a 2.8.0 message store with N messages (default 1,000,000) dated a year back, so every
message and log entry is past its retention, then runs the purge through the same service
function the worker calls (a purge job of the engine, claimed and run by
jobs.tasks.run_job), three times on copies of the same store:

0. alone, nothing else reading or writing: the purge's own throughput;
A. with the console being read meanwhile: the Message Stores and Message Tracking pages
   requested every 0.25 s each through the Django test client, in other threads;
B. with the mail service writing meanwhile as well: a thread accepting one message every 20 ms
   the way the SMTP service stores it (its own connection, busy timeout, a write transaction).

Each probe runs first without a purge, for the baseline of the same run. Prints seconds,
rows/s, bytes reclaimed, the disk's free bytes before and after, and p50/p95/p99/max of the
probes. Also times the tracking search at N rows, and (unless --no-partial) a realistic purge
that keeps the recent mail: a store filled up to now, the spam quarantine cut from 30 to 7 days.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import quarantined_spam  # bench/ is sys.path[0]
from _report import add_json_flag, emit, ratio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")

MiB = 2**20
PAGE_INTERVAL = 0.25  # seconds between two requests of one page probe
MAIL_INTERVAL = 0.02  # seconds between two messages of the mail service probe


@dataclass
class Probe:
    """Latencies of one repeated action, measured in a thread until stopped."""

    name: str
    action: Callable[[], object]
    interval: float = 0.0
    close: Callable[[], object] | None = None
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    self.action()
                except Exception as exc:  # reported, never hidden
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.samples.append(time.perf_counter() - started)
                if self.interval:
                    stop.wait(self.interval)
        finally:
            if self.close is not None:
                self.close()

    def figures(self) -> dict[str, Any]:
        """Sample count, p50/p95/p99/max in ms (None without samples) and the error count."""
        ms = sorted(s * 1000 for s in self.samples)

        def pct(p: float) -> float | None:
            return ms[min(len(ms) - 1, int(len(ms) * p))] if ms else None

        return {
            "n": len(ms),
            "p50_ms": statistics.median(ms) if ms else None,
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": ms[-1] if ms else None,
            "errors": len(self.errors),
        }

    def summary(self) -> str:
        if not self.samples:
            return f"{self.name}: no samples"
        f = self.figures()
        errors = f", {len(self.errors)} errors ({self.errors[0]})" if self.errors else ""
        return (
            f"{self.name}: n={f['n']} p50 {f['p50_ms']:.1f} p95 {f['p95_ms']:.1f} "
            f"p99 {f['p99_ms']:.1f} max {f['max_ms']:.1f} ms{errors}"
        )


def run_probes(probes: list[Probe], work: Callable[[], object] | None, seconds: float) -> object:
    """Run the probes in threads while work runs in this one (or for seconds, without work)."""
    stop = threading.Event()
    threads = [threading.Thread(target=probe.run, args=(stop,)) for probe in probes]
    for thread in threads:
        thread.start()
    try:
        if work is None:
            time.sleep(seconds)
            return None
        return work()
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def mail_probe(root: Path) -> Probe:
    """A probe accepting a message every MAIL_INTERVAL, closing its connection when stopped."""
    write, local = mail_writer(root)

    def close() -> None:
        if "conn" in local:
            local.pop("conn").close()

    return Probe("mail service write", write, interval=MAIL_INTERVAL, close=close)


def mail_writer(root: Path) -> tuple[Callable[[], object], dict[str, sqlite3.Connection]]:
    """One accepted message as the mail service stores it: message, raw copy, both logs.

    Its connection is opened on the first call, in the probe's own thread, and kept in the
    returned dict.
    """
    from appliance.mail import mailrecords
    from appliance.system import paths

    raw = b"Subject: bench\r\n\r\n" + b"x" * 2000
    counter = iter(range(10**9))
    local: dict[str, sqlite3.Connection] = {}

    if hasattr(mailrecords, "connect_writer") and hasattr(mailrecords, "MailRecord"):
        # The mail service's own write path.
        def write() -> object:
            conn = local.get("conn") or local.setdefault("conn", mailrecords.connect_writer(root))
            record = quarantined_spam(
                next(counter),
                raw,
                logged_at=int(time.time()),
                sender="bench@example.net",
                subject="Benchmark message",
            )
            return mailrecords.mail_record_many(conn, [record])

        return write, local

    # Without the mail service's writer: the same kind of transaction, written here.
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(paths.layout(root).msgstore_db, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def write_plain() -> object:
        conn = local.get("conn") or local.setdefault("conn", connect())
        now = int(time.time())
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute(
            "INSERT INTO quarantined_message (store_id, received_at, message_id, sender,"
            " recipients, subject, size, verdict) VALUES (1, ?, ?, 'b@x', 'a@x', 'b', ?, 'spam')",
            (now, f"<bench.{next(counter)}@example.net>", len(raw)),
        )
        conn.execute(
            "INSERT INTO quarantined_message_raw (message_id, raw) VALUES (?, ?)",
            (cursor.lastrowid, raw),
        )
        conn.execute(
            "INSERT INTO smtp_log (logged_at, client_ip, sender, recipient, response)"
            " VALUES (?, '203.0.113.7', 'b@x', 'a@x', '250 ok')",
            (now,),
        )
        conn.execute("COMMIT")
        return None

    return write_plain, local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--probe-seconds", type=float, default=10.0, help="baseline duration")
    parser.add_argument("--no-partial", action="store_true", help="skip the partial purge")
    add_json_flag(parser)
    args = parser.parse_args()

    temp_dir = Path(tempfile.mkdtemp(prefix="lmi-purge-bench-"))
    atexit.register(shutil.rmtree, temp_dir, ignore_errors=True)
    root = temp_dir / "appliance"
    os.environ["LMI_VAR_DIR"] = str(temp_dir / "var")
    os.environ["LMI_APPLIANCE_ROOT"] = str(root)
    os.environ.setdefault("LMI_LOG_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", message="No directory at")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client

    from accounts.services import user_create
    from appliance.demo import init_demo
    from appliance.mail import demo_store, msgstore, retention, tracking
    from appliance.system import paths
    from jobs.models import Job
    from jobs.tasks import run_job
    from mailsecurity.models import PURGE, PurgeTrigger

    settings.DEBUG = False
    call_command("migrate", verbosity=0)
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}"
    )

    # The appliance with an empty store, then a million messages dated a year back.
    init_demo(root, messages=0, graph_days=1)
    started = time.perf_counter()
    demo_store.fill_demo(root, messages=args.messages, now=datetime.now(UTC) - timedelta(days=365))
    fill_seconds = time.perf_counter() - started
    db = paths.layout(root).msgstore_db
    store_mib = db.stat().st_size / MiB
    print(
        f"filled {args.messages:,} messages (+ one SMTP and one tracking log entry each) in "
        f"{fill_seconds:.1f} s: {store_mib:,.0f} MiB"
    )
    figures: dict[str, Any] = {
        "messages": args.messages,
        "fill_s": fill_seconds,
        "store_mib": store_mib,
    }
    template = temp_dir / "template.db"
    shutil.copy(db, template)

    client = Client()
    client.force_login(user_create("bench", "bench-password-1234", administrator=True))

    def page(url: str) -> Callable[[], object]:
        def get() -> object:
            response = client.get(url)
            assert response.status_code == 200, (url, response.status_code)
            return None

        return get

    # The tracking search at full size, before anything is purged.
    print(f"\ntracking search over {args.messages:,} entries (p50 / p95 of 20, whole request):")
    sender = (
        msgstore.connect(root, readonly=True)
        .execute("SELECT sender FROM tracking_log WHERE id = ?", (args.messages // 2,))
        .fetchone()[0]
    )
    # Up to 200 keyset pages back (10,000 rows), stopping short of the oldest end, where there
    # is no cursor to go on from: a small store (make bench-smoke) has fewer pages than that.
    deep = tracking.tracking_page(tracking.TrackingFilter())
    pages_back = 0
    while pages_back < 200 and deep.older is not None:
        older = tracking.tracking_page(tracking.TrackingFilter(), after=deep.older)
        if older.older is None:
            break
        deep, pages_back = older, pages_back + 1
    deep_query = f"?after={deep.older.encode()}" if deep.older is not None else ""
    # (key in the JSON line, label, query)
    cases = [
        ("newest_page", "newest page", ""),
        ("deep_page", f"{pages_back} pages back (after= cursor)", deep_query),
        ("one_sender", "one sender", f"?sender={sender}"),
        ("verdict_virus", "verdict virus", "?verdict=virus"),
        ("action_rejected", "action rejected (window)", "?action=rejected"),
        ("subject_no_match", "subject, no match (whole window)", "?subject=zzzz"),
        (
            "clean_rejected_no_match",
            "verdict clean + action rejected (no match)",
            "?verdict=clean&action=rejected",
        ),
    ]
    figures["tracking"] = {}
    for key, label, query in cases:
        probe = Probe(label, page("/mail-security/policy/message-tracking/" + query))
        for _ in range(21):
            started = time.perf_counter()
            probe.action()
            probe.samples.append(time.perf_counter() - started)
        probe.samples = probe.samples[1:]
        figures["tracking"][key] = probe.figures()
        print("  " + probe.summary())

    def purge() -> Job:
        job = Job.objects.create(
            kind=PURGE, title="Retention purge", trigger=PurgeTrigger.RETENTION
        )
        run_job(job.pk)
        job.refresh_from_db()
        return job

    def report(job: Job) -> dict[str, Any]:
        """Print the purge's figures, and return them for the JSON line."""
        run = job.details
        assert job.state == "succeeded", (job.state, job.error, run)
        seconds = job.duration or 0.0
        rows = run["messages_deleted"] + run["smtp_log_deleted"] + run["tracking_log_deleted"]
        rows_s = ratio(rows, seconds)
        messages_s = ratio(run["messages_deleted"], seconds)
        phases = ", ".join(f"{name} {t:.1f} s" for name, t in run["phase_seconds"].items())
        print(f"  state {job.state}, {seconds:.1f} s ({phases})")
        print(
            f"  deleted {run['messages_deleted']:,} messages, {run['smtp_log_deleted']:,} SMTP "
            f"and {run['tracking_log_deleted']:,} tracking log entries: {rows:,} rows, "
            f"{rows_s or 0:,.0f} rows/s, {messages_s or 0:,.0f} messages/s"
        )
        print(
            f"  message store {run['store_bytes_before'] / MiB:,.1f} -> "
            f"{run['store_bytes_after'] / MiB:,.1f} MiB: "
            f"reclaimed {run['bytes_reclaimed'] / MiB:,.1f} MiB"
        )
        gained = run["disk_free_after"] - run["disk_free_before"]
        print(
            f"  disk free {run['disk_free_before'] / MiB:,.0f} -> "
            f"{run['disk_free_after'] / MiB:,.0f} MiB ({gained / MiB:+,.0f} MiB, other writers "
            "on the disk included)"
        )
        return {
            "state": job.state,
            "seconds": seconds,
            "phase_s": run["phase_seconds"],
            "messages_deleted": run["messages_deleted"],
            "rows_deleted": rows,
            "rows_s": rows_s,
            "messages_s": messages_s,
            "mib_before": run["store_bytes_before"] / MiB,
            "mib_after": run["store_bytes_after"] / MiB,
            "mib_reclaimed": run["bytes_reclaimed"] / MiB,
        }

    def probes(baseline: list[Probe], during: list[Probe]) -> dict[str, dict[str, Any]]:
        """Each probe's figures without and with the purge, by probe name (snake_case)."""
        return {
            before.name.lower().replace(" ", "_"): {
                "baseline": before.figures(),
                "purging": after.figures(),
            }
            for before, after in zip(baseline, during, strict=True)
        }

    def restore() -> None:
        # A new file, never the old one overwritten: a connection left open on the old one
        # could otherwise checkpoint its log into the copy.
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        shutil.copy(template, db)

    pages = [
        ("Message Stores page", "/mail-security/policy-objects/message-stores/"),
        ("Message Tracking page", "/mail-security/policy/message-tracking/"),
    ]

    # 0: the purge alone, nothing else reading or writing.
    print("\n0. purge alone")
    figures["alone"] = report(purge())
    restore()

    # A: the console is read while the purge runs.
    print(f"\nA. purge while the console is read (each page every {PAGE_INTERVAL} s)")
    baseline = [Probe(name, page(url), interval=PAGE_INTERVAL) for name, url in pages]
    run_probes(baseline, None, args.probe_seconds)
    during = [Probe(name, page(url), interval=PAGE_INTERVAL) for name, url in pages]
    run = run_probes(during, purge, 0)
    figures["console_read"] = {**report(run), "probes": probes(baseline, during)}
    for before, after in zip(baseline, during, strict=True):
        print(f"  baseline {before.summary()}\n  purging  {after.summary()}")

    # B: the mail service writes while the purge runs (and the console is read).
    print("\nB. purge while the mail service accepts a message every 20 ms")
    restore()
    baseline = [
        mail_probe(root),
        Probe(pages[0][0], page(pages[0][1]), interval=PAGE_INTERVAL),
    ]
    run_probes(baseline, None, args.probe_seconds)
    during = [
        mail_probe(root),
        Probe(pages[0][0], page(pages[0][1]), interval=PAGE_INTERVAL),
    ]
    run = run_probes(during, purge, 0)
    figures["mail_write"] = {**report(run), "probes": probes(baseline, during)}
    for before, after in zip(baseline, during, strict=True):
        print(f"  baseline {before.summary()}\n  purging  {after.summary()}")
    template.unlink()

    if not args.no_partial:
        # C: the realistic case: mail up to now, the spam quarantine cut from 30 to 7 days. The
        # vacuum must now move the pages of the mail that stays.
        print("\nC. partial purge: mail up to now, Spam quarantine 30 -> 7 days")
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        msgstore.create(root)
        demo_store.fill_demo(root, messages=args.messages)
        spam = next(
            s for s in retention.retention_settings(root).stores if s.name == "Spam quarantine"
        )
        retention.store_retention_set(spam.id, 7, root)
        baseline = [mail_probe(root)]
        run_probes(baseline, None, args.probe_seconds)
        during = [mail_probe(root)]
        run = run_probes(during, purge, 0)
        figures["partial"] = {**report(run), "probes": probes(baseline, during)}
        print(f"  baseline {baseline[0].summary()}\n  purging  {during[0].summary()}")
        with msgstore.connect(root, readonly=True) as conn:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        print(f"  quick_check after the purge: {check}")
        figures["partial"]["quick_check"] = check
    if args.json:
        emit("purge", **figures)


if __name__ == "__main__":
    main()
