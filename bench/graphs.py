"""Benchmark: the processing graphs at 30 days of per-minute data.

Fills a fresh appliance with 30 days of per-minute mail figures (43,200 minutes) and 30 days of
resource samples, then requests the graph partial (the real request path: middleware, query,
SVG drawing, template) for each range through Django's test client, logged in. Baseline in the
same run: reading the same 30 days as raw per-minute rows and serialising them to JSON, which is
what a page that shipped every point to the browser would do before drawing anything.

    .venv/bin/python bench/graphs.py [--repeat 30] [--json]

The temporary appliance and database are removed at the end.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import add_json_flag, emit, ratio  # bench/ is sys.path[0]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30)
    add_json_flag(parser)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmi-graphs-bench-"))
    # Every run filled a fresh one and left it behind: 30 days of figures per run in /tmp.
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    os.environ["LMI_VAR_DIR"] = str(tmp / "var")
    os.environ["LMI_APPLIANCE_ROOT"] = str(tmp / "appliance")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    from accounts.services import user_create
    from appliance.demo import init_demo
    from appliance.mail import msgstore
    from home.models import ResourceHour, ResourceSample

    call_command("migrate", verbosity=0)
    init_demo(messages=100, graph_days=30)
    now = int(time.time()) // 60 * 60
    ResourceSample.objects.bulk_create(
        (
            ResourceSample(
                minute=minute,
                cpu_percent=(minute // 60) % 97,
                memory_percent=40 + (minute // 3600) % 20,
                console_disk_percent=70.0,
                store_disk_percent=70.0,
            )
            for minute in range(now - 30 * 86400, now, 60)
        ),
        batch_size=5000,
    )
    hours: dict[int, ResourceHour] = {}
    for sample in ResourceSample.objects.all():
        hour = hours.setdefault(sample.minute // 3600 * 3600, ResourceHour(hour=0))
        hour.hour = sample.minute // 3600 * 3600
        hour.samples += 1
        hour.cpu_sum += sample.cpu_percent
        hour.memory_sum += sample.memory_percent
        hour.console_disk_sum += sample.console_disk_percent
        hour.store_disk_sum += sample.store_disk_percent
    ResourceHour.objects.bulk_create(hours.values())
    user = user_create("bench", "bench password 2026", administrator=False)
    client = Client()
    client.force_login(user)

    with msgstore.connect(readonly=True) as conn:
        (minutes,) = conn.execute("SELECT count(*) FROM processing_minute").fetchone()
    print(f"{minutes:,} minutes of mail figures, {ResourceSample.objects.count():,} samples")
    print(f"{'request':<34} {'p50 ms':>8} {'p95 ms':>8} {'bytes':>9}")
    results: dict[str, dict[str, float]] = {}
    for key in ("1h", "24h", "7d", "30d"):
        url = f"/home/graphs/?range={key}"
        client.get(url)  # warm-up
        samples = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            response = client.get(url)
            samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
        p50, p95 = _percentiles(samples)
        results[key] = {"p50_ms": p50, "p95_ms": p95, "bytes": len(response.content)}
        print(f"{'graphs partial, ' + key:<34} {p50:>8.1f} {p95:>8.1f} {len(response.content):>9,}")

    samples = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        with msgstore.connect(readonly=True) as conn:
            mail = conn.execute(
                "SELECT * FROM processing_minute WHERE minute >= ? ORDER BY minute",
                (now - 30 * 86400,),
            ).fetchall()
        resources = list(
            ResourceSample.objects.filter(minute__gte=now - 30 * 86400)
            .order_by("minute")
            .values_list("minute", "cpu_percent", "memory_percent", "store_disk_percent")
        )
        payload = json.dumps({"mail": [tuple(r) for r in mail], "resources": resources})
        samples.append((time.perf_counter() - started) * 1000)
    p50, p95 = _percentiles(samples)
    print(f"{'baseline: raw 30 d rows as JSON':<34} {p50:>8.1f} {p95:>8.1f} {len(payload):>9,}")
    over_baseline = ratio(results["30d"]["p50_ms"], p50)
    print(f"30 d graphs partial vs raw baseline at p50: {over_baseline:.2f}x the time")
    if args.json:
        emit(
            "graphs",
            repeat=args.repeat,
            minutes=minutes,
            samples=ResourceSample.objects.count(),
            partial=results,
            baseline_raw_json={"p50_ms": p50, "p95_ms": p95, "bytes": len(payload)},
            ratio_30d_to_baseline=over_baseline,
        )


if __name__ == "__main__":
    main()
