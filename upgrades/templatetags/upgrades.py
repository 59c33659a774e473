"""Template filters of Updates & Licensing."""

from __future__ import annotations

from django import template

from jobs.templatetags.jobs import duration

register = template.Library()


register.filter("duration", duration)  # the job engine's, for the pages of updates
