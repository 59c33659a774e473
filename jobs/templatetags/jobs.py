"""Template filters of the job engine's progress partial (templates/jobs/_progress.html)."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def duration(seconds: int | float | None) -> str:
    """Seconds as "2 h 05 min", "3 min 20 s" or "40 s"; an em dash while unknown."""
    if seconds is None:
        return "—"
    if 0 < seconds < 0.5:
        return "under 1 s"  # not "0 s": the work did take time
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
