"""A notice on Home (and on the pages that repeat it): what holds now, and where to act.

Its own module so every app can produce notices without importing Home, which gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    """One notification: level is info, warning or error."""

    level: str
    message: str
    link_label: str = ""
    link_url: str = ""
