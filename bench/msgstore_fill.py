"""Benchmark: fill a message store with 1,000,000 demo messages in a temporary directory.

The demo's message store must be quick to build at production-like sizes (a million
quarantined messages plus their SMTP and tracking log rows), so that `init_appliance` and the
upgrade tests can use realistic volumes.

Run: `.venv/bin/python bench/msgstore_fill.py [N] [--json]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import django
from _report import add_json_flag, emit, ratio  # bench/ is sys.path[0]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
django.setup()

from appliance.mail import demo_store, msgstore  # noqa: E402 - needs django.setup() first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("messages", type=int, nargs="?", default=1_000_000)
    add_json_flag(parser)
    args = parser.parse_args()
    messages: int = args.messages
    with tempfile.TemporaryDirectory(prefix="lmi-msgstore-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        demo_store.fill_demo(root, messages=messages)
        elapsed = time.perf_counter() - started
        totals = msgstore.totals(root)
        assert totals is not None and totals.messages == messages
        rows = totals.messages + totals.smtp_log + totals.tracking_log
        print(
            f"{messages:,} messages ({rows:,} rows with the SMTP and tracking logs) in "
            f"{elapsed:.1f} s: {messages / elapsed:,.0f} messages/s, {rows / elapsed:,.0f} rows/s, "
            f"{totals.bytes / 2**20:,.0f} MiB on disk"
        )
        # Baseline in the same run: writing the same number of bytes straight to the same disk
        # (1 MiB blocks, then fsync). The fill can never beat it; the ratio says how close it is.
        started = time.perf_counter()
        block = os.urandom(2**20)
        with (root / "baseline.bin").open("wb") as out:
            for _ in range(max(1, totals.bytes // len(block))):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        raw = time.perf_counter() - started
        print(
            f"baseline: the same {totals.bytes / 2**20:,.0f} MiB written raw in {raw:.1f} s; "
            f"the fill takes {elapsed / raw:.1f}x as long as the disk alone"
        )
        stores = msgstore.list_stores(root)
        for store in stores:
            print(
                f"  {store.name:<18} {store.retention_days:>3} days  "
                f"{store.message_count:>9,} messages  {store.bytes / 2**20:>8,.1f} MiB"
            )
        if args.json:
            emit(
                "msgstore_fill",
                messages=messages,
                rows=rows,
                seconds=elapsed,
                messages_s=ratio(messages, elapsed),
                rows_s=ratio(rows, elapsed),
                mib=totals.bytes / 2**20,
                raw_write_s=raw,
                ratio_to_raw_write=ratio(elapsed, raw),
                stores={store.name: store.message_count for store in stores},
            )


if __name__ == "__main__":
    main()
