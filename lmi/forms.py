"""Form pieces shared by the console's filter forms (event log, message tracking)."""

from __future__ import annotations

from datetime import datetime

from django import forms
from django.utils import timezone

DATETIME_HELP = "a date and time such as 2026-11-25T06:30 or 2026-11-25 06:30:00+01:00"


class TimeRangeMixin:
    """Cleans ``since`` and ``until`` (ISO or datetime-local values) into aware datetimes.

    A value without a zone is taken in the console's time zone, as a datetime-local input
    means it; a wrong value is a message on the page, never an exception.
    """

    cleaned_data: dict[str, object]

    def _clean_moment(self, name: str) -> datetime | None:
        raw = str(self.cleaned_data[name]).strip()
        if not raw:
            return None
        try:
            moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise forms.ValidationError(f"{raw!r} is not {DATETIME_HELP}.") from None
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment)
        return moment

    def clean_since(self) -> datetime | None:
        return self._clean_moment("since")

    def clean_until(self) -> datetime | None:
        return self._clean_moment("until")
