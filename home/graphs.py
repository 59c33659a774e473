"""The processing graphs of the home page: messages, spam, virus and rejected per interval, the
data received, processing time, and CPU, memory and disk; and the totals of each range.

Every range is cut into at most a few hundred buckets on the database side (mail figures from
the message store's ``processing_minute``, resources from ``ResourceSample``), so the page
carries the same small number of points whether it shows an hour or 30 days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    """One line or row of bars; ``None`` is a bucket without a measurement (a gap).

    ``summary`` is what the legend says about the whole range: a total for counts and bytes
    (an average of per-bucket counts says nothing: "Virus avg 0.0"), an average for
    percentages and processing time.
    """

    label: str
    css_class: str
    values: list[float | None]
    summary: str = ""
    unit: str = "messages"  # one of UNITS

    @property
    def bars(self) -> bool:
        """Counts and bytes are per bucket and drawn as bars; measurements as lines."""
        return self.unit in ("messages", "bytes")


@dataclass(frozen=True)
class Graph:
    """One chart: its buckets' start times (epoch seconds) and its series.

    Every series gets a panel of its own with its own scale, one above the other on a shared
    time axis (small multiples): lines on one scale hid each other, and a count of viruses was
    a flat line under the count of messages. Each bucket shows all its figures at once on hover.
    """

    key: str
    title: str
    starts: list[int]
    series: list[Series]
    fixed_max: float | None = None
    bucket_seconds: int = 60

    @property
    def interval(self) -> str:
        """What a bar stands for: "per 5 minutes"."""
        return interval_label(self.bucket_seconds)

    @property
    def empty(self) -> bool:
        """Nothing measured and nothing counted in the whole range."""
        return all(v is None or (line.bars and not v) for line in self.series for v in line.values)


UNITS = ("messages", "bytes", "ms", "percent")


def human_bytes(value: float) -> str:
    """Bytes in the largest unit that keeps a number of at least 1: 512 B, 166.6 KB, 2.3 GB.

    Units of 1024, like Django's ``filesizeformat`` elsewhere on the same page.
    """
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(amount) < 1024 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_value(value: float, unit: str) -> str:
    """One value as a person reads it, in a tooltip or a legend."""
    if unit == "bytes":
        return human_bytes(value)
    if unit == "messages":
        return f"{value:,.0f}"
    if unit == "percent":
        return f"{value:.1f}%"
    return f"{value:,.0f} {unit}"


def interval_label(seconds: int) -> str:
    """ "per minute", "per 5 minutes", "per hour", "per 2 hours"."""
    for size, name in ((3600, "hour"), (60, "minute")):
        if seconds % size == 0:
            count = seconds // size
            return f"per {name}" if count == 1 else f"per {count} {name}s"
    return f"per {seconds} s"


def graph_range(key: str | None) -> GraphRange:
    """The requested range, or the default for a missing or unknown key."""
    return RANGES.get(key or "", RANGES[DEFAULT_RANGE])


def bucket_starts(rng: GraphRange, now: float) -> list[int]:
    """Aligned bucket starts covering the last ``rng.seconds`` up to and including now."""
    size = rng.bucket_seconds
    last = int(now) // size * size
    first = last - (rng.seconds // size - 1) * size
    return list(range(first, last + size, size))


def mail_graph(rng: GraphRange, now: float) -> Graph:
    """Messages, spam, virus and rejected per bucket, bytes per bucket, processing time.

    Counts per bucket, not per minute: a bar reads "14:05-14:10: 212 messages", and the bars
    of a range add up to its total. Each count is a panel of its own scale: on one shared scale
    the handful of viruses was a flat line under thousands of messages.
    """
    starts = bucket_starts(rng, now)
    size = rng.bucket_seconds
    by_start = {b.start: b for b in processing.series(starts[0], starts[-1] + size, size)}
    buckets = [by_start.get(start) for start in starts]

    def counts(field: str) -> list[float | None]:
        # A bucket without a row saw no mail: zero, not a gap (the newest one: none so far).
        return [float(getattr(b, field)) if b is not None else 0.0 for b in buckets]

    def count(label: str, field: str, css_class: str) -> Series:
        values = counts(field)
        total = sum(v or 0.0 for v in values)
        return Series(label, css_class, values, f"{total:,.0f} in the last {rng.label}")

    traffic = counts("bytes")
    received = sum(b.received for b in buckets if b is not None)
    processing_ms = sum(b.processing_ms for b in buckets if b is not None)
    return Graph(
        "messages",
        "Mail",
        starts,
        [
            count("Messages", "received", "s-received"),
            count("Spam", "spam", "s-spam"),
            count("Virus", "virus", "s-virus"),
            count("Rejected", "rejected", "s-rejected"),
            Series(
                "Data received",
                "s-bytes",
                traffic,
                f"{human_bytes(sum(v or 0.0 for v in traffic))} in the last {rng.label}",
                unit="bytes",
            ),
            Series(
                "Processing time",
                "s-latency",
                [b.average_ms if b is not None else None for b in buckets],
                # Weighted by the messages, not an average of the buckets' averages.
                f"{processing_ms / received:,.0f} ms per message on average"
                if received
                else "no mail",
                unit="ms",
            ),
        ],
        bucket_seconds=size,
    )


def resource_graph(rng: GraphRange, now: float) -> Graph:
    """CPU, memory and the two upgrade disks in %, averaged per bucket, a panel each.

    The disks change slowly and often share a file system: on one scale their lines lay on top
    of each other and of the memory line.
    """
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

    def line(label: str, css_class: str, column: str) -> Series:
        values = [by_start[s][column] if s in by_start else None for s in starts]
        measured = [v for v in values if v is not None]
        summary = f"average {sum(measured) / len(measured):.1f}%" if measured else "not measured"
        return Series(label, css_class, values, summary, unit="percent")

    return Graph(
        "resources",
        "CPU, memory and disk",
        starts,
        [
            line("CPU", "s-cpu", "cpu"),
            line("Memory", "s-memory", "memory"),
            line("Message store disk", "s-store-disk", "store_disk"),
            line("Console database disk", "s-console-disk", "console_disk"),
        ],
        fixed_max=100.0,
        bucket_seconds=size,
    )


@dataclass(frozen=True)
class WindowTotals:
    """What the mail service handled over one range, for the totals table."""

    range: GraphRange
    received: int
    spam: int
    virus: int
    rejected: int
    bytes: int


def window_totals(now: float) -> list[WindowTotals]:
    """Totals over each range the graphs offer, over the same buckets the graphs show.

    One indexed range query per range: at most 1,440 minute rows (24 hours), or whole hours
    from the hourly roll-up for 7 and 30 days.
    """
    windows = []
    for rng in RANGES.values():
        starts = bucket_starts(rng, now)
        windows.append((starts[0], starts[-1] + rng.bucket_seconds))
    return [
        WindowTotals(rng, t.received, t.spam, t.virus, t.rejected, t.bytes)
        for rng, t in zip(RANGES.values(), processing.totals(windows), strict=True)
    ]


@dataclass(frozen=True)
class Graphs:
    """Everything the graph panel shows, or why the mail figures are missing."""

    range: GraphRange
    graphs: list[Graph]
    error: str
    totals: list[WindowTotals] = field(default_factory=list)

    @property
    def totals_rows(self) -> list[tuple[str, list[str]]]:
        """The totals table, a row per figure and a column per range, formatted."""
        return [
            (label, [fmt(getattr(t, name)) for t in self.totals])
            for label, name, fmt in (
                ("Messages", "received", _count),
                ("Spam", "spam", _count),
                ("Virus", "virus", _count),
                ("Rejected", "rejected", _count),
                ("Data received", "bytes", human_bytes),
            )
        ]


def _count(value: float) -> str:
    return f"{value:,.0f}"


def processing_graphs(range_key: str | None, now: float | None = None) -> Graphs:
    """The home page's graphs for one range."""
    rng = graph_range(range_key)
    now = time.time() if now is None else now
    graphs: list[Graph] = []
    totals: list[WindowTotals] = []
    error = ""
    try:
        graphs.append(mail_graph(rng, now))
        totals = window_totals(now)
    except ApplianceError as exc:
        error = f"Mail figures are not available: {exc}"
    graphs.append(resource_graph(rng, now))
    return Graphs(rng, graphs, error, totals)
