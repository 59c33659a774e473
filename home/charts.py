"""Line charts as inline SVG, drawn on the server.

No chart library and no script: the page's Content-Security-Policy allows none inline, a chart
must read clearly in a screenshot and in a browser without JavaScript, and a graph of a few
hundred points is a handful of polylines. Colours come from classes in lmi.css.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from home.graphs import Graph

WIDTH = 600
HEIGHT = 190
LEFT = 52  # room for the y labels
RIGHT = 10
TOP = 10
BOTTOM = 24  # room for the x labels


def nice_max(value: float) -> float:
    """A round axis maximum at or above value (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def short_number(value: float) -> str:
    """Axis label: 1.5k, 2M, 0.5."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _time_label(epoch: int, span: int) -> str:
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.strftime("%H:%M") if span <= 86400 else moment.strftime("%b %d")


def render(graph: Graph) -> SafeString:
    """The graph as an <svg> element with gridlines, axis labels and one polyline per line."""
    starts = graph.starts
    values = [v for line in graph.series for v in line.values if v is not None]
    y_max = graph.fixed_max or nice_max(max(values, default=0.0))
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    count = max(1, len(starts) - 1)

    def x(index: int) -> float:
        return LEFT + plot_w * index / count

    def y(value: float) -> float:
        return TOP + plot_h * (1 - min(value, y_max) / y_max)

    parts: list[str] = []
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        level = y_max * fraction
        parts.append(
            format_html(
                '<line class="grid" x1="{}" y1="{}" x2="{}" y2="{}"/>'
                '<text class="axis" x="{}" y="{}" text-anchor="end">{}</text>',
                LEFT,
                _n(y(level)),
                WIDTH - RIGHT,
                _n(y(level)),
                LEFT - 6,
                _n(y(level) + 4),
                short_number(level),
            )
        )
    span = (starts[-1] - starts[0]) if len(starts) > 1 else 0
    for tick in range(5):
        index = round(tick * (len(starts) - 1) / 4)
        anchor = "start" if tick == 0 else ("end" if tick == 4 else "middle")
        parts.append(
            format_html(
                '<text class="axis" x="{}" y="{}" text-anchor="{}">{}</text>',
                _n(x(index)),
                HEIGHT - 6,
                anchor,
                _time_label(starts[index], span),
            )
        )
    for line in graph.series:
        for run in _runs(line.values):
            points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in run)
            if len(run) == 1:
                i, v = run[0]
                parts.append(
                    format_html(
                        '<circle class="line {}" cx="{}" cy="{}" r="1.5"/>',
                        line.css_class,
                        _n(x(i)),
                        _n(y(v)),
                    )
                )
            else:
                parts.append(
                    format_html('<polyline class="line {}" points="{}"/>', line.css_class, points)
                )
    title = format_html_join(
        ", ", "{}", ((line.label,) for line in graph.series)
    )  # the accessible name lists the lines
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}: {}" '
        'data-testid="chart-{}">{}</svg>',
        WIDTH,
        HEIGHT,
        graph.title,
        title,
        graph.key,
        mark_safe("".join(parts)),  # noqa: S308 - built by format_html above
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
