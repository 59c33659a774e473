"""Reads of SMTP > Configuration > Maintenance: whom the mail service accepts mail for."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.store import read_smtp_settings
from smtp.engine import LOCAL_DOMAINS_OBJECT, compile_policy


@dataclass(frozen=True)
class RelayConfiguration:
    """The local domains (from the policy, read-only here) and the relay networks (editable)."""

    local_domains: tuple[str, ...]
    relay_networks: tuple[str, ...]
    local_domains_object: str = LOCAL_DOMAINS_OBJECT


def relay_configuration() -> RelayConfiguration:
    """As the mail service applies them; raises what reading the configuration raises
    (``ApplianceError``, or ``PolicyError`` for a policy the service would answer 451 to)."""
    policy, _ = compile_policy()
    return RelayConfiguration(
        local_domains=policy.local_domains.listed(),
        relay_networks=tuple(read_smtp_settings().relay_networks.split()),
    )
