"""The last rehearsal's figures beside the preflight's estimate, wherever the figures are shown."""

from __future__ import annotations

from django import template

from upgrades.rehearsal import LastRehearsal, last_rehearsal

register = template.Library()


@register.simple_tag
def last_successful_rehearsal() -> LastRehearsal | None:
    """The latest rehearsal that succeeded (its report and date), or None."""
    return last_rehearsal(succeeded_only=True)
