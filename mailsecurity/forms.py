"""Forms of the Mail Security pages: retention values, the tracking search, the reclaim plan."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

from django import forms

from appliance.mail import msgstore, tracking
from appliance.mail.retention import MAX_RETENTION_DAYS, StoreRetention
from lmi.forms import TimeRangeMixin
from mailsecurity import services
from mailsecurity.planner import store_key

RETENTION_HELP = f"Whole days, 1 to {MAX_RETENTION_DAYS}."


def retention_field(label: str, initial: int | None = None) -> forms.IntegerField:
    """Days to keep: a whole number from 1 to MAX_RETENTION_DAYS, with messages that say so."""
    return forms.IntegerField(
        label=label,
        initial=initial,
        min_value=1,
        max_value=MAX_RETENTION_DAYS,
        help_text=RETENTION_HELP,
        error_messages={
            "required": "Enter the number of days to keep.",
            "invalid": "Enter a whole number of days.",
            "min_value": "Keep at least 1 day.",
            "max_value": f"Keep at most {MAX_RETENTION_DAYS} days (ten years).",
        },
    )


class StoreRetentionForm(forms.Form):
    """One retention field per message store, named by its key (store:<id>)."""

    def __init__(self, stores: Iterable[StoreRetention], *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        for store in stores:
            self.fields[store_key(store.id)] = retention_field(store.name, store.retention_days)

    def values(self) -> dict[str, int]:
        return {key: int(value) for key, value in self.cleaned_data.items()}


class LogRetentionForm(forms.Form):
    """The retention of one log (SMTP or tracking)."""

    retention_days = retention_field("Keep entries for")


VERDICT_CHOICES = (("", "Any"), *((v, v.capitalize()) for v in msgstore.VERDICTS))
ACTION_CHOICES = (("", "Any"), *((a, a.capitalize()) for a in tracking.STATUSES))
# The parameters that say what to look for (kept in every page link).
TRACKING_FILTER_PARAMS = ("sender", "recipient", "subject", "verdict", "action", "since", "until")
# ASCII digits only: str.isdigit() also takes "²" (which int() refuses: a 500 once) and
# str.isdecimal() takes "٣" (which int() reads as 3).
PAGE_SIZE_PATTERN = re.compile(r"[0-9]+")


class TrackingQueryForm(TimeRangeMixin, forms.Form):
    """The tracking search, bound to request.GET; bad values become messages, not errors."""

    sender = forms.CharField(required=False, max_length=320, label="Sender")
    recipient = forms.CharField(required=False, max_length=320, label="Recipient")
    subject = forms.CharField(required=False, max_length=200, label="Subject contains")
    verdict = forms.ChoiceField(choices=VERDICT_CHOICES, required=False)
    action = forms.ChoiceField(choices=ACTION_CHOICES, required=False)
    since = forms.CharField(required=False, max_length=40, label="From")
    until = forms.CharField(required=False, max_length=40, label="Until")
    after = forms.CharField(required=False, max_length=100)
    before = forms.CharField(required=False, max_length=100)
    limit = forms.CharField(required=False, max_length=10)

    def _clean_address(self, name: str) -> str:
        """A whole address, @domain, or part of an address (tracking.address_pattern)."""
        value = self.cleaned_data[name].strip()
        if not value:
            return value
        if any(char.isspace() or not char.isprintable() for char in value):
            raise forms.ValidationError(
                f"{value!r} is not an email address, a domain or part of one: it has a space or "
                "a control character."
            )
        if value == "@" or value.count("@") > 1:
            raise forms.ValidationError(
                f"{value!r} is not an email address, a domain or part of one: enter "
                "anna.schmidt@example.com, @example.com or anna."
            )
        return value

    def clean_sender(self) -> str:
        return self._clean_address("sender")

    def clean_recipient(self) -> str:
        return self._clean_address("recipient")

    def clean_subject(self) -> str:
        return self.cleaned_data["subject"].strip()

    def _clean_moment(self, name: str) -> datetime | None:
        """Refuse a time too near either end of the calendar to be converted to UTC."""
        moment = super()._clean_moment(name)
        if moment is not None and not tracking.EARLIEST <= moment <= tracking.LATEST:
            raise forms.ValidationError(
                f"{str(self.cleaned_data[name]).strip()!r} is out of range: enter a time "
                f"between {tracking.EARLIEST.date()} and {tracking.LATEST.date()} UTC."
            )
        return moment

    def _clean_position(self, name: str) -> tracking.Position | None:
        token = self.cleaned_data[name].strip()
        if not token:
            return None
        try:
            return tracking.Position.decode(token)
        except tracking.InvalidPosition as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_after(self) -> tracking.Position | None:
        return self._clean_position("after")

    def clean_before(self) -> tracking.Position | None:
        return self._clean_position("before")

    def clean_limit(self) -> int:
        raw = self.cleaned_data["limit"].strip()
        if not raw:
            return tracking.PAGE_SIZE
        if not PAGE_SIZE_PATTERN.fullmatch(raw) or int(raw) < 1:
            raise forms.ValidationError(
                f"Page size must be a number from 1 to {tracking.MAX_PAGE_SIZE}."
            )
        return min(int(raw), tracking.MAX_PAGE_SIZE)

    def clean(self) -> dict[str, object]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            self.add_error("until", "Until must be later than From.")
        if data.get("after") and data.get("before"):
            raise forms.ValidationError("A page link cannot go both older and newer.")
        return data

    def tracking_filter(self) -> tracking.TrackingFilter:
        data = self.cleaned_data
        since, until = data["since"], data["until"]
        return tracking.TrackingFilter(
            sender=data["sender"],
            recipient=data["recipient"],
            subject=data["subject"],
            verdict=data["verdict"],
            action=data["action"],
            since=int(since.timestamp()) if since else None,
            until=int(until.timestamp()) if until else None,
        )


class ReclaimApplyForm(forms.Form):
    """The plan's proposed retentions, posted back as shown, one field per source key."""

    def __init__(self, keys: Iterable[str], *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        for key in keys:
            self.fields[key] = retention_field(key)

    def values(self) -> dict[str, int]:
        return {key: int(value) for key, value in self.cleaned_data.items()}


QUARANTINE_ACTIONS = (("release", "Release"), ("delete", "Delete"))
MAX_MESSAGE_ID = 2**63 - 1  # SQLite's largest rowid


class MessageIdsField(forms.Field):
    """Repeated ``id`` parameters (the list's checkboxes) as distinct message ids, in order."""

    widget = forms.MultipleHiddenInput

    def to_python(self, value: object) -> list[int]:
        values = value if isinstance(value, list | tuple) else [value] if value else []
        ids: list[int] = []
        for raw in values:
            text = str(raw).strip()
            if not PAGE_SIZE_PATTERN.fullmatch(text) or not 1 <= int(text) <= MAX_MESSAGE_ID:
                raise forms.ValidationError(f"{text[:40]!r} is not a message number.")
            ids.append(int(text))
        return list(dict.fromkeys(ids))

    def validate(self, value: list[int]) -> None:
        if not value:
            raise forms.ValidationError("Choose at least one quarantined message.")
        if len(value) > services.MAX_BULK:
            raise forms.ValidationError(f"Choose at most {services.MAX_BULK} messages at a time.")


class QuarantineActionForm(forms.Form):
    """What to do with which quarantined messages, and the page to return to afterwards.

    Bound to request.GET for the confirmation page and to request.POST for the action."""

    action = forms.ChoiceField(
        choices=QUARANTINE_ACTIONS,
        error_messages={"required": "Choose Release or Delete.", "invalid_choice": "Choose "
                        "Release or Delete."},
    )  # fmt: skip
    id = MessageIdsField(label="Messages")
    next = forms.CharField(required=False, max_length=2000)
