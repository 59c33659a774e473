"""Forms of the Cluster page."""

from __future__ import annotations

from django import forms


class JoinForm(forms.Form):
    """A member's join: the token created on Cluster Central's Cluster page."""

    token = forms.CharField(max_length=128, strip=True)
