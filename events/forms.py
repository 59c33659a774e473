"""The System > Events query string: filters, page cursor and page size, checked in one place."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from django import forms
from django.utils import timezone

from events.models import Category, Severity
from events.selectors import (
    EARLIEST,
    LATEST,
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    Cursor,
    EventFilter,
    InvalidCursor,
)
from lmi.forms import TimeRangeMixin

PERIODS: dict[str, timedelta | None] = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "all": None,
}
PERIOD_CHOICES = (
    ("all", "All time"),
    ("1h", "Last hour"),
    ("24h", "Last 24 hours"),
    ("7d", "Last 7 days"),
    ("30d", "Last 30 days"),
)
SEVERITY_CHOICES = (("", "Any"), *((s.name.lower(), f"{s.label} and above") for s in Severity))
CATEGORY_CHOICES = (("", "Any"), *Category.choices)
# The parameters that say what to show (kept in every link); the others say where the page is.
FILTER_PARAMS = ("severity", "category", "period", "since", "until", "q")
# ASCII digits only: str.isdigit() also takes "²" and str.isdecimal() "٣", and int() refuses
# the first (a 500 once) and reads the second as 3, a page size nobody typed.
PAGE_SIZE_PATTERN = re.compile(r"[0-9]+")


class EventQueryForm(TimeRangeMixin, forms.Form):
    """Bound to request.GET. Invalid values become messages on the page, never an exception."""

    severity = forms.ChoiceField(choices=SEVERITY_CHOICES, required=False)
    category = forms.ChoiceField(choices=CATEGORY_CHOICES, required=False)
    period = forms.ChoiceField(choices=PERIOD_CHOICES, required=False)
    since = forms.CharField(required=False, max_length=40, label="From")
    until = forms.CharField(required=False, max_length=40, label="Until")
    q = forms.CharField(required=False, max_length=200, label="Text")
    after = forms.CharField(required=False, max_length=200)
    before = forms.CharField(required=False, max_length=200)
    newest = forms.CharField(required=False, max_length=200)
    limit = forms.CharField(required=False, max_length=10)

    def _clean_moment(self, name: str) -> datetime | None:
        """Refuse a time too near either end of the calendar to be converted to UTC."""
        moment = super()._clean_moment(name)
        if moment is not None and not EARLIEST <= moment <= LATEST:
            raise forms.ValidationError(
                f"{str(self.cleaned_data[name]).strip()!r} is out of range: enter a time "
                f"between {EARLIEST.date()} and {LATEST.date()} UTC."
            )
        return moment

    def _clean_cursor(self, name: str) -> Cursor | None:
        token = self.cleaned_data[name].strip()
        if not token:
            return None
        try:
            return Cursor.decode(token)
        except InvalidCursor as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_after(self) -> Cursor | None:
        return self._clean_cursor("after")

    def clean_before(self) -> Cursor | None:
        return self._clean_cursor("before")

    def clean_newest(self) -> Cursor | None:
        return self._clean_cursor("newest")

    def clean_limit(self) -> int:
        raw = self.cleaned_data["limit"].strip()
        if not raw:
            return PAGE_SIZE
        if not PAGE_SIZE_PATTERN.fullmatch(raw) or int(raw) < 1:
            raise forms.ValidationError(f"Page size must be a number from 1 to {MAX_PAGE_SIZE}.")
        return min(int(raw), MAX_PAGE_SIZE)

    def clean(self) -> dict[str, object]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if data.get("period") not in ("", "all", None) and (since or until):
            raise forms.ValidationError(
                "Choose either a period or a custom From/Until range, not both."
            )
        if since and until and since >= until:
            self.add_error("until", "Until must be later than From.")
        if data.get("after") and data.get("before"):
            raise forms.ValidationError("A page link cannot go both older and newer.")
        return data

    def event_filter(self) -> EventFilter:
        """The filter the valid form describes; presets are taken relative to now."""
        data = self.cleaned_data
        since = data["since"]
        preset = PERIODS.get(data["period"] or "all")
        if preset is not None:
            since = timezone.now() - preset
        return EventFilter(
            severity=Severity[data["severity"].upper()] if data["severity"] else None,
            category=Category(data["category"]) if data["category"] else None,
            since=since,
            until=data["until"],
            text=data["q"],
        )
