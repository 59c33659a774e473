"""Forms of SMTP > Configuration > Maintenance."""

from __future__ import annotations

from django import forms

from mailsecurity.forms import LogRetentionForm

__all__ = ["LogRetentionForm", "MaintenanceModeForm"]


class MaintenanceModeForm(forms.Form):
    """Enter or leave maintenance mode; entering takes an optional reason for the event log."""

    action = forms.ChoiceField(choices=(("enter", "Enter"), ("leave", "Leave")))
    reason = forms.CharField(required=False, max_length=200, label="Reason")

    def clean_reason(self) -> str:
        reason = self.cleaned_data["reason"].strip()
        if "\n" in reason or "\r" in reason:
            raise forms.ValidationError("The reason must be a single line.")
        return reason
