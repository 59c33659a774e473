"""The one machine-readable line every bench prints with ``--json``.

``make bench-smoke`` (scripts/bench_smoke.py) runs each bench at a tiny size and counts a run
without this line as a failure, so a bench that rots fails loudly instead of quietly; ``make
bench`` prints the same line at full size, for comparing runs without scraping the tables.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The same ``--json`` option on every bench."""
    parser.add_argument(
        "--json", action="store_true", help='also print the figures as one JSON line ("bench" key)'
    )


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the baseline is zero (a tiny run measured nothing)."""
    return numerator / denominator if denominator else None


def _clean(value: Any) -> Any:
    """Floats to 4 significant digits, NaN and infinities to null: strict JSON, short lines."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def emit(bench: str, **figures: Any) -> None:
    """Print ``{"bench": bench, ...figures}`` as one line of its own."""
    line = json.dumps({"bench": bench, **_clean(figures)}, allow_nan=False)
    print(line, flush=True)
