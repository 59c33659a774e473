"""SMTP settings (``etc/mailsec/cpe/mailsec_smtp1_0.xml``).

Besides the listener and next hop, this file holds the SMTP log and message tracking log
retention, which the upgrade guide tells administrators to lower to reclaim disk space. After
the 2.8.1 conversion the settings live in the 2.8.1 configuration file
(:mod:`appliance.config.configformat`); read and write here use whichever format is on disk.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from xml.sax.saxutils import escape

from appliance.system.errors import MalformedApplianceFile
from appliance.system.safexml import parse_xml

_SCHEMA_VERSION = "1.0"


@dataclass
class SmtpSettings:
    """SMTP > Configuration, plus the retention of the SMTP and tracking logs (in days)."""

    listen_port: int = 25
    next_hop: str = ""
    max_message_size: int = 20 * 1024 * 1024
    smtp_log_retention_days: int = 90
    tracking_log_retention_days: int = 90
    # Client networks (CIDR, space-separated) that may relay to any domain; empty by default,
    # so only mail for the local domains is accepted (see smtp.engine.check_relay).
    relay_networks: str = ""

    def validate(self) -> None:
        """Refuse values the mail daemon would reject, before they reach the disk."""
        if not 1 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port out of range: {self.listen_port}")
        if self.max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        if self.smtp_log_retention_days < 1 or self.tracking_log_retention_days < 1:
            raise ValueError("log retention must be at least one day")
        if "\n" in self.next_hop:
            raise ValueError("next_hop must be a single line")
        self.relay_network_list()

    def relay_network_list(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The relay networks parsed; ValueError names the first entry that is not one."""
        return parse_relay_networks(self.relay_networks)


# The widest relay network allowed, by IP version: one organisation's largest block (the old
# class A; the largest IPv6 allocations). Anything wider, 0.0.0.0/0 first, relays for a large
# part of the Internet: an open relay by one line, refused rather than written.
WIDEST_RELAY_PREFIX = {4: 8, 6: 16}


def parse_relay_networks(
    text: str,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Networks separated by spaces, commas or line breaks; host bits are cleared
    (``10.1.2.3/8`` is ``10.0.0.0/8``), a bare address is a one-host network.

    ValueError names the first entry that is not a network or is wider than
    :data:`WIDEST_RELAY_PREFIX` allows; the settings refuse it, and the mail service defers
    mail (4xx) while such a value is on disk rather than relay for everyone.
    """
    networks = []
    for entry in text.replace(",", " ").split():
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(f"relay network {entry!r} is not an IP network") from exc
        widest = WIDEST_RELAY_PREFIX[network.version]
        if network.prefixlen < widest:
            raise ValueError(
                f"relay network {entry!r} is too wide: it would relay mail for a large part of "
                f"the Internet (an open relay); the widest allowed is /{widest}"
            )
        networks.append(network)
    return tuple(dict.fromkeys(networks))


def parse_smtp_settings(data: bytes) -> SmtpSettings:
    """Parse the SMTP settings file; missing elements keep their defaults."""
    root = parse_xml(data)
    values: dict[str, object] = {}
    for spec in fields(SmtpSettings):
        text = root.findtext(spec.name)
        if text is None:
            continue
        text = text.strip()
        if spec.type in ("int", int):
            try:
                values[spec.name] = int(text)
            except ValueError as exc:
                raise MalformedApplianceFile(f"SMTP setting {spec.name} is not a number") from exc
        else:
            values[spec.name] = text
    return SmtpSettings(**values)  # type: ignore[arg-type]


def render_smtp_settings(smtp: SmtpSettings) -> bytes:
    """Serialise the settings one element per line, in field order."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', f'<smtp version="{_SCHEMA_VERSION}">']
    for spec in fields(SmtpSettings):
        lines.append(f"  <{spec.name}>{escape(str(getattr(smtp, spec.name)))}</{spec.name}>")
    lines.append("</smtp>")
    return ("\n".join(lines) + "\n").encode("utf-8")
