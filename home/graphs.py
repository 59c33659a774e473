"""The processing graphs of the home page: mail per minute by verdict, bytes, processing time,
and CPU, memory and disk.

Every range is cut into at most a few hundred buckets on the database side (mail figures from
the message store's ``processing_minute``, resources from ``ResourceSample``), so the page
carries the same small number of points whether it shows an hour or 30 days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.db.models import Avg, F, Sum

from appliance.mail import processing
from appliance.system.errors import ApplianceError
from home.models import ResourceHour, ResourceSample


@dataclass(frozen=True)
class GraphRange:
    """A range the graphs offer, and the bucket that keeps it to a few hundred points."""

    key: str
    label: str
    seconds: int
    bucket_seconds: int


RANGES: dict[str, GraphRange] = {
    r.key: r
    for r in (
        GraphRange("1h", "1 hour", 3600, 60),
        GraphRange("24h", "24 hours", 86400, 300),
        GraphRange("7d", "7 days", 7 * 86400, 3600),
        GraphRange("30d", "30 days", 30 * 86400, 7200),
    )
}
DEFAULT_RANGE = "24h"


@dataclass(frozen=True)
class Series:
    """One line of a graph; ``None`` is a bucket without a measurement (a gap in the line)."""

    label: str
    css_class: str
    values: list[float | None]


@dataclass(frozen=True)
class Graph:
    """One chart: its buckets' start times (epoch seconds) and its lines."""

    key: str
    title: str
    unit: str
    starts: list[int]
    series: list[Series]
    fixed_max: float | None = None

    @property
    def averages(self) -> list[tuple[Series, float | None]]:
        """Each line's average over the range, for the legend (None: nothing measured)."""
        result = []
        for line in self.series:
            measured = [v for v in line.values if v is not None]
            result.append((line, sum(measured) / len(measured) if measured else None))
        return result

    @property
    def empty(self) -> bool:
        return all(v is None for line in self.series for v in line.values)


def graph_range(key: str | None) -> GraphRange:
    """The requested range, or the default for a missing or unknown key."""
    return RANGES.get(key or "", RANGES[DEFAULT_RANGE])


def bucket_starts(rng: GraphRange, now: float) -> list[int]:
    """Aligned bucket starts covering the last ``rng.seconds`` up to and including now."""
    size = rng.bucket_seconds
    last = int(now) // size * size
    first = last - (rng.seconds // size - 1) * size
    return list(range(first, last + size, size))


def _minutes_in(start: int, size: int, now: float) -> float:
    """Minutes of a bucket that have passed: the newest bucket is still filling."""
    return max(1.0, min(size, now - start) / 60)


def mail_graphs(rng: GraphRange, now: float) -> list[Graph]:
    """Messages per minute by verdict, bytes per minute and average processing time."""
    starts = bucket_starts(rng, now)
    size = rng.bucket_seconds
    by_start = {b.start: b for b in processing.series(starts[0], starts[-1] + size, size)}
    empty = processing.ProcessingBucket(start=0, **dict.fromkeys(_SUMS, 0))
    buckets = [by_start.get(start, empty) for start in starts]
    minutes = [_minutes_in(start, size, now) for start in starts]

    def per_minute(field: str) -> list[float | None]:
        values: list[float | None] = [
            getattr(b, field) / m for b, m in zip(buckets, minutes, strict=True)
        ]
        if buckets[-1] is empty:
            # The newest bucket is still filling; with nothing in it yet it is unknown, not 0.
            values[-1] = None
        return values

    return [
        Graph(
            "messages",
            "Messages per minute by verdict",
            "msg/min",
            starts,
            [
                Series("Received", "s-received", per_minute("received")),
                Series("Delivered", "s-delivered", per_minute("delivered")),
                Series("Spam", "s-spam", per_minute("spam")),
                Series("Virus", "s-virus", per_minute("virus")),
                Series("Rejected", "s-rejected", per_minute("rejected")),
            ],
        ),
        Graph(
            "bytes",
            "Bytes per minute",
            "B/min",
            starts,
            [Series("Received", "s-bytes", per_minute("bytes"))],
        ),
        Graph(
            "latency",
            "Average processing time",
            "ms",
            starts,
            [Series("Per message", "s-latency", [b.average_ms for b in buckets])],
        ),
    ]


_SUMS = (
    "received", "delivered", "quarantined", "rejected", "virus", "spam", "bytes", "processing_ms",
)  # fmt: skip


def resource_graph(rng: GraphRange, now: float) -> Graph:
    """CPU, memory and the two upgrade disks in %, averaged per bucket."""
    starts = bucket_starts(rng, now)
    size = rng.bucket_seconds
    if size % 3600 == 0:
        # Whole hours: average the hourly sums, 24 times fewer rows than the minutes.
        rows = (
            ResourceHour.objects.filter(hour__gte=starts[0], hour__lt=starts[-1] + size)
            .annotate(bucket=F("hour") / size * size)
            .values("bucket")
            .annotate(
                **{
                    name: Sum(f"{name}_sum") / Sum("samples")
                    for name in ("cpu", "memory", "store_disk", "console_disk")
                }
            )
            .order_by("bucket")
        )
    else:
        rows = (
            ResourceSample.objects.filter(minute__gte=starts[0], minute__lt=starts[-1] + size)
            .annotate(bucket=F("minute") / size * size)
            .values("bucket")
            .annotate(
                cpu=Avg("cpu_percent"),
                memory=Avg("memory_percent"),
                store_disk=Avg("store_disk_percent"),
                console_disk=Avg("console_disk_percent"),
            )
            .order_by("bucket")
        )
    by_start = {row["bucket"]: row for row in rows}

    def line(field: str) -> list[float | None]:
        return [by_start[s][field] if s in by_start else None for s in starts]

    return Graph(
        "resources",
        "CPU, memory and disk",
        "%",
        starts,
        [
            Series("CPU", "s-cpu", line("cpu")),
            Series("Memory", "s-memory", line("memory")),
            Series("Message store disk", "s-store-disk", line("store_disk")),
            Series("Console database disk", "s-console-disk", line("console_disk")),
        ],
        fixed_max=100.0,
    )


@dataclass(frozen=True)
class Graphs:
    """Everything the graph panel shows, or why the mail figures are missing."""

    range: GraphRange
    graphs: list[Graph]
    error: str


def processing_graphs(range_key: str | None, now: float | None = None) -> Graphs:
    """The home page's graphs for one range."""
    rng = graph_range(range_key)
    now = time.time() if now is None else now
    graphs: list[Graph] = []
    error = ""
    try:
        graphs.extend(mail_graphs(rng, now))
    except ApplianceError as exc:
        error = f"Mail figures are not available: {exc}"
    graphs.append(resource_graph(rng, now))
    return Graphs(rng, graphs, error)
