"""Forms of SMTP > Configuration > Maintenance."""

from __future__ import annotations

from django import forms

from appliance.config.smtp import parse_relay_networks
from mailsecurity.forms import LogRetentionForm

__all__ = ["LogRetentionForm", "MaintenanceModeForm", "RelayNetworksForm"]
MAX_RELAY_NETWORKS = 100


class MaintenanceModeForm(forms.Form):
    """Enter or leave maintenance mode; entering takes an optional reason for the event log."""

    action = forms.ChoiceField(choices=(("enter", "Enter"), ("leave", "Leave")))
    reason = forms.CharField(required=False, max_length=200, label="Reason")

    def clean_reason(self) -> str:
        reason = self.cleaned_data["reason"].strip()
        if "\n" in reason or "\r" in reason:
            raise forms.ValidationError("The reason must be a single line.")
        return reason


class RelayNetworksForm(forms.Form):
    """The networks whose clients may relay to any domain: one CIDR network per line."""

    relay_networks = forms.CharField(
        required=False,
        max_length=8000,
        label="Relay networks",
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text=(
            "One network per line, e.g. 198.51.100.0/24 or 2001:db8::/32, at most /8 (IPv4) or "
            "/16 (IPv6) wide. Empty: none."
        ),
    )

    def clean_relay_networks(self) -> list[str]:
        """Each entry parsed with ``ipaddress.ip_network(strict=False)``, in its usual form."""
        try:
            networks = parse_relay_networks(self.cleaned_data["relay_networks"])
        except ValueError as exc:
            problem = str(exc)  # its first letter up only: capitalize() would lower the rest
            raise forms.ValidationError(problem[:1].upper() + problem[1:] + ".") from exc
        if len(networks) > MAX_RELAY_NETWORKS:
            raise forms.ValidationError(f"At most {MAX_RELAY_NETWORKS} networks.")
        return [str(network) for network in networks]
