"""Benchmark: the 2.8.1 message store conversion of a 1,000,000-message store vs a file copy.

The guide allows 30 minutes of downtime for the conversion; the aim is under 30 s. Only the
phase-4 backup and phase-7 finish fall into the downtime; phase 2 (prepare) runs while mail
flows. The baseline is ``cp`` of the store file (plus sync) in the same run, on the same disk.

Run: `.venv/bin/python bench/upgrade_msgstore.py [N] [--store PATH] [--late N] [--json]`;
``--store`` reuses a filled store (a msgstore.db), which is copied, never changed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import django
from _common import quarantined_spam  # bench/ is sys.path[0]
from _report import add_json_flag, emit, ratio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
django.setup()

from appliance.mail import demo_store, mailrecords, msgbackup, msgmigrate  # noqa: E402 - needs django.setup() first
from appliance.system.paths import layout  # noqa: E402


def _late_mail(root: Path, count: int) -> None:
    """Mail that arrives between prepare and finish, for finish to carry over."""
    now = int(datetime.now(UTC).timestamp())
    conn = mailrecords.connect_writer(root)
    try:
        records = []
        for n in range(count):
            raw = f"From: bench{n}@example.net\r\nSubject: late\r\n\r\n{'x' * 2000}\r\n".encode()
            records.append(
                quarantined_spam(
                    n, raw, logged_at=now, sender=f"bench{n}@example.net", subject="late"
                )
            )
        for start in range(0, count, 100):
            mailrecords.mail_record_many(conn, records[start : start + 100])
    finally:
        conn.close()


def _timed(label: str, func):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = func()
    elapsed = time.perf_counter() - started
    print(f"{label:<44} {elapsed:8.1f} s", flush=True)
    return result, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("messages", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--late", type=int, default=2000, help="messages between prepare/finish")
    add_json_flag(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmi-upgrade-bench-") as tmp:
        root = Path(tmp) / "appliance"
        db = layout(root).msgstore_db
        db.parent.mkdir(parents=True)
        if args.store:
            _, fill_s = _timed("copy the given store in", lambda: shutil.copyfile(args.store, db))
        else:
            _, fill_s = _timed(
                f"fill {args.messages:,} messages",
                lambda: demo_store.fill_demo(root, messages=args.messages),
            )
        size = db.stat().st_size
        print(f"store: {size / 2**20:,.0f} MiB")

        _, cp_seconds = _timed(
            "baseline: cp + sync of the store file",
            lambda: subprocess.run(
                ["sh", "-c", f"cp '{db}' '{tmp}/cp.db' && sync '{tmp}/cp.db'"], check=True
            ),
        )
        os.unlink(f"{tmp}/cp.db")

        prepared, prepare_s = _timed(
            "phase 2 prepare (online, no pause)", lambda: msgmigrate.migrate_prepare(root)
        )
        print(
            f"  chunks {prepared.chunks_copied}, in sync {prepared.in_sync},"
            f" new file {prepared.bytes / 2**20:,.0f} MiB"
        )
        _timed(f"mail {args.late} messages while still online", lambda: _late_mail(root, args.late))
        _, catch_up_s = _timed("phase 2 rerun (catch up)", lambda: msgmigrate.migrate_prepare(root))
        _late_mail(root, 100)

        backup, backup_s = _timed(
            "phase 4 backup (checkpoint, copy, sha256, fsync)",
            lambda: msgbackup.msgstore_backup(Path(tmp) / "backup" / "msgstore.db", root),
        )
        result, finish_s = _timed(
            "phase 7 finish (delta, verify, swap)", lambda: msgmigrate.migrate_finish(root)
        )
        print(
            f"  chunks copied in finish {result.chunks_copied}, messages {result.counts.messages:,}"
        )
        print(
            f"  store {result.store_bytes_before / 2**20:,.0f} MiB"
            f" -> {result.store_bytes_after / 2**20:,.0f} MiB"
        )
        downtime = backup_s + finish_s
        downtime_over_cp = ratio(downtime, cp_seconds)
        finish_over_cp = ratio(finish_s, cp_seconds)
        print(
            f"downtime share (backup + finish): {downtime:.1f} s = {downtime_over_cp or 0:.1f}x"
            f" a cp+sync of the store ({cp_seconds:.1f} s);"
            f" finish alone {finish_over_cp or 0:.2f}x"
        )
        _, restore_s = _timed(
            "rollback: msgstore_restore", lambda: msgbackup.msgstore_restore(backup, root)
        )
        _, whole_s = _timed(
            "finish without prepare (whole conversion)",
            lambda: (msgmigrate.migrate_discard(root), msgmigrate.migrate_finish(root)),
        )
        if args.json:
            emit(
                "upgrade_msgstore",
                messages=None if args.store else args.messages,  # filled here
                late=args.late,
                messages_after=result.counts.messages,
                store_mib=size / 2**20,
                fill_s=fill_s,
                cp_s=cp_seconds,
                prepare_s=prepare_s,
                catch_up_s=catch_up_s,
                backup_s=backup_s,
                finish_s=finish_s,
                finish_chunks_copied=result.chunks_copied,
                downtime_s=downtime,
                downtime_over_cp=downtime_over_cp,
                finish_over_cp=finish_over_cp,
                restore_s=restore_s,
                whole_conversion_s=whole_s,
                store_mib_before=result.store_bytes_before / 2**20,
                store_mib_after=result.store_bytes_after / 2**20,
            )


if __name__ == "__main__":
    main()
