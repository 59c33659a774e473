"""Template filters for mail pages."""

from __future__ import annotations

import re

from django import template
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

register = template.Library()

# After the "@" and before each dot: where a reader expects a long address to be split.
_BREAK_POINTS = re.compile(r"(@)|(?=\.)")


@register.filter
def address_breaks(value: object) -> SafeString:
    """The address, escaped, with <wbr> after its "@" and before its dots, so a narrow column
    breaks "oscar_richter@" | "example" | ".com" instead of in the middle of a name."""
    escaped = str(escape(str(value or "")))
    return mark_safe(_BREAK_POINTS.sub(lambda m: f"{m.group(1) or ''}<wbr>", escaped))  # noqa: S308
