"""Charts as inline SVG, drawn on the server: small multiples of bars and lines.

No chart library and no script: the page's Content-Security-Policy allows none inline, a chart
must read clearly in a screenshot and in a browser without JavaScript, and a graph of a few
hundred buckets is a handful of paths. Colours come from classes (static/css/charts.css).

Each series gets a panel of its own scale, one above the other on one time axis. Every bucket
has one transparent column across all panels whose ``<title>`` names the interval and every
figure in it: the browser shows it as a tooltip on hover, no script needed.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

from home.graphs import Graph, Series, format_value

WIDTH = 600
LEFT = 64  # room for the y labels
RIGHT = 8
TOP = 4
LABEL_H = 16  # the panel's name above its plot
PANEL_H = 56  # the plot of one panel
BOTTOM = 20  # room for the x labels


def nice_max(value: float) -> float:
    """A round axis maximum at or above value (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def nice_count_max(value: float) -> float:
    """A round axis maximum for counts whose half is a whole number too (2, 4, 6, 8, 10...)."""
    if value <= 2:
        return 2.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 4, 6, 8, 10):
        if value <= step * power:
            return float(step * power)
    return 10.0 * power  # pragma: no cover - the loop always returns


def nice_bytes_max(value: float) -> float:
    """A round axis maximum in the unit the labels use (KB, MB, GB of 1024)."""
    unit = 1.0
    while value >= unit * 1024 and unit < 1024**4:
        unit *= 1024
    return nice_max(value / unit) * unit


def short_number(value: float) -> str:
    """Axis label: 1.5k, 2M, 0.5."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def axis_label(value: float, unit: str) -> str:
    """A y-axis label: short, in the series' unit."""
    if unit == "bytes":
        return format_value(value, "bytes").replace(".0 ", " ")
    if unit == "percent":
        return f"{value:.0f}%"
    if unit == "ms":
        return f"{short_number(value)} ms"
    return short_number(value)


def _axis_max(graph: Graph, line: Series) -> float:
    if graph.fixed_max:
        return graph.fixed_max
    top = max((v for v in line.values if v is not None), default=0.0)
    if line.unit == "messages":
        return nice_count_max(top)
    if line.unit == "bytes":
        return nice_bytes_max(top)
    return nice_max(top)


def _time_label(epoch: int, span: int) -> str:
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.strftime("%H:%M") if span <= 86400 else moment.strftime("%b %d")


def bucket_label(start: int, size: int, span: int) -> str:
    """The interval a bucket covers, as a tooltip names it: "14:05-14:10 UTC"."""
    first = datetime.fromtimestamp(start, tz=UTC)
    day = "" if span <= 86400 else first.strftime("%b %d ")
    if size == 60:
        return f"{day}{first:%H:%M} UTC"
    last = datetime.fromtimestamp(start + size, tz=UTC)
    return f"{day}{first:%H:%M}-{last:%H:%M} UTC"


def point_text(graph: Graph, index: int, span: int) -> str:
    """A bucket's tooltip: its interval and every series' figure in it."""
    figures = "; ".join(
        f"{line.label} "
        + (
            "not measured"
            if line.values[index] is None
            else format_value(line.values[index] or 0.0, line.unit)
        )
        for line in graph.series
    )
    return f"{bucket_label(graph.starts[index], graph.bucket_seconds, span)}: {figures}"


def height(graph: Graph) -> int:
    return TOP + len(graph.series) * (LABEL_H + PANEL_H) + BOTTOM


def render(graph: Graph) -> SafeString:
    """The graph as an <svg>: one panel per series, axis labels, and a tooltip per bucket."""
    starts = graph.starts
    count = max(1, len(starts))
    plot_w = WIDTH - LEFT - RIGHT
    step = plot_w / count  # the width of one bucket
    total_h = height(graph)
    span = (starts[-1] - starts[0]) if len(starts) > 1 else 0

    def x(index: int) -> float:
        return LEFT + step * index

    parts: list[str] = []
    for number, line in enumerate(graph.series):
        top = TOP + number * (LABEL_H + PANEL_H) + LABEL_H
        base = top + PANEL_H
        y_max = _axis_max(graph, line)

        def y(value: float, top: float = top, y_max: float = y_max) -> float:
            return top + PANEL_H * (1 - min(value, y_max) / y_max)

        parts.append(
            format_html(
                '<text class="panel-label" x="{}" y="{}">{}</text>'
                '<line class="grid" x1="{}" y1="{}" x2="{}" y2="{}"/>'
                '<line class="grid" x1="{}" y1="{}" x2="{}" y2="{}"/>'
                '<line class="grid base" x1="{}" y1="{}" x2="{}" y2="{}"/>'
                '<text class="axis" x="{}" y="{}" text-anchor="end">{}</text>'
                '<text class="axis" x="{}" y="{}" text-anchor="end">{}</text>',
                LEFT,
                _n(top - 4),
                line.label,
                LEFT,
                _n(top),
                WIDTH - RIGHT,
                _n(top),
                LEFT,
                _n(top + PANEL_H / 2),
                WIDTH - RIGHT,
                _n(top + PANEL_H / 2),
                LEFT,
                _n(base),
                WIDTH - RIGHT,
                _n(base),
                LEFT - 6,
                _n(top + 8),
                axis_label(y_max, line.unit),
                LEFT - 6,
                _n(base),
                axis_label(0, line.unit),
            )
        )
        if line.bars:
            width = step if step < 3 else step * 0.8
            bars = "".join(
                f"M{x(i):.1f} {base:.1f}V{y(v):.1f}h{width:.1f}V{base:.1f}z"
                for i, v in enumerate(line.values)
                if v
            )
            if bars:
                parts.append(f'<path class="bar {escape(line.css_class)}" d="{bars}"/>')
            continue
        for run in _runs(line.values):
            if len(run) == 1:
                i, v = run[0]
                parts.append(
                    f'<circle class="line {escape(line.css_class)}" '
                    f'cx="{x(i) + step / 2:.1f}" cy="{y(v):.1f}" r="1.5"/>'
                )
            else:
                points = " ".join(f"{x(i) + step / 2:.1f},{y(v):.1f}" for i, v in run)
                parts.append(f'<polyline class="line {escape(line.css_class)}" points="{points}"/>')
    for tick in range(5):
        index = round(tick * (len(starts) - 1) / 4)
        anchor = "start" if tick == 0 else ("end" if tick == 4 else "middle")
        position = x(index) if tick < 4 else x(index) + step
        parts.append(
            format_html(
                '<text class="axis" x="{}" y="{}" text-anchor="{}">{}</text>',
                _n(position),
                total_h - 6,
                anchor,
                _time_label(starts[index], span),
            )
        )
    # One column per bucket across every panel: hovering anywhere above a time reads it all.
    hit_h = total_h - BOTTOM
    parts.append('<g class="hits" fill="transparent">')
    parts.extend(
        f'<rect x="{x(i):.1f}" width="{step:.2f}" height="{hit_h}">'
        f"<title>{escape(point_text(graph, i, span))}</title></rect>"
        for i in range(len(starts))
    )
    parts.append("</g>")
    summary = "; ".join(f"{line.label}: {line.summary}" for line in graph.series)
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}: {}" '
        'data-testid="chart-{}">{}</svg>',
        WIDTH,
        total_h,
        graph.title,
        summary,
        graph.key,
        mark_safe("".join(parts)),  # noqa: S308 - numbers, and text escaped above
    )


def _n(value: float) -> str:
    """A coordinate with one decimal (format_html escapes its arguments to strings first)."""
    return f"{value:.1f}"


def _runs(values: list[float | None]) -> list[list[tuple[int, float]]]:
    """Split a line at its gaps (None) into runs of consecutive measured points."""
    runs: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for index, value in enumerate(values):
        if value is None:
            if current:
                runs.append(current)
                current = []
        else:
            current.append((index, value))
    if current:
        runs.append(current)
    return runs
