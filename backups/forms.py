"""Forms of Backup & Restore > System: create, upload, passphrase, schedule."""

from __future__ import annotations

from typing import Any

from django import forms

from backups.models import KEEP_LAST_MAX
from backups.services import COMMENT_MAX, PASSPHRASE_MAX, PASSPHRASE_MIN


def _passphrase_field(autocomplete: str, label: str | None = None) -> forms.CharField:
    """A passphrase box: optional, kept exactly as typed (spaces count), never filled in again."""
    return forms.CharField(
        required=False,
        max_length=PASSPHRASE_MAX,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": autocomplete}),
        label=label,
    )


class CreateBackupForm(forms.Form):
    """A comment and an optional passphrase, asked twice: a typo would lock the backup away."""

    comment = forms.CharField(max_length=COMMENT_MAX, required=False)
    passphrase = _passphrase_field("new-password", "Passphrase (optional)")
    passphrase_again = _passphrase_field("new-password", "Passphrase again")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        first = data.get("passphrase") or ""
        second = data.get("passphrase_again") or ""
        # Errors go on the fields, so the page shows each next to the box to type again.
        if first and len(first) < PASSPHRASE_MIN:
            self.add_error(
                "passphrase", f"The passphrase must have at least {PASSPHRASE_MIN} characters."
            )
        elif first != second:
            self.add_error(
                "passphrase_again", "The two passphrases differ: type the same one twice."
            )
        return data


class UploadBackupForm(forms.Form):
    """A configuration backup file (.lmibak) saved from this or another appliance."""

    backup_file = forms.FileField(label="Configuration backup file")


class PassphraseForm(forms.Form):
    """The passphrase of an encrypted backup, to compare or restore it."""

    passphrase = _passphrase_field("off")


class ScheduleForm(forms.Form):
    """Scheduled configuration backups: on or off, at which hour, how many to keep."""

    scheduled_enabled = forms.BooleanField(required=False, label="Daily configuration backups")
    scheduled_hour = forms.IntegerField(min_value=0, max_value=23, label="Hour of day")
    keep_last = forms.IntegerField(min_value=1, max_value=KEEP_LAST_MAX, label="Keep the last")
