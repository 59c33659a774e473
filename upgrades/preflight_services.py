"""What the install checklist lets an administrator fix before the upgrade: a DHCP interface.

The guide warns that an interface on DHCP may come back from the upgrade's restart with another
address, so the checklist offers to pin the current lease as a static address, and to return
the interface to DHCP afterwards. Both change the appliance's network configuration, so both
write an event with who did it and the address involved.
"""

from __future__ import annotations

from typing import Any

from appliance.system import network
from appliance.system.errors import ApplianceError
from events.models import Category, Severity
from events.services import event_write


class PinRefused(Exception):
    """The interface cannot be pinned or unpinned; the message says why."""


def _dhcp_interface(name: str, *, want_mode: str) -> network.Interface:
    """The named interface, refused with a clear message unless it exists in ``want_mode``."""
    try:
        interfaces = {iface.name: iface for iface in network.list_interfaces()}
    except ApplianceError as exc:
        raise PinRefused(f"The network configuration cannot be read: {exc}") from exc
    interface = interfaces.get(name)
    if interface is None:
        raise PinRefused(f"There is no interface named {name[:40]!r} on this appliance.")
    if interface.mode != want_mode:
        what = "on DHCP" if want_mode == "dhcp" else "pinned as static"
        raise PinRefused(f"Interface {name} is not {what}: there is nothing to change.")
    return interface


def interface_pin_static(*, user: Any, interface: str) -> network.Interface:
    """Pin the address an interface leased over DHCP as its static address, for the upgrade."""
    current = _dhcp_interface(interface, want_mode="dhcp")
    if current.address is None:
        raise PinRefused(
            f"Interface {interface} holds no DHCP lease right now: there is no address to pin."
        )
    try:
        pinned = network.dhcp_pin_static(interface)
    except (ApplianceError, ValueError) as exc:
        event_write(
            category=Category.SYSTEM,
            severity=Severity.ERROR,
            message=f"Pinning interface {interface} as static failed: {exc}",
            user=user,
            details={"interface": interface},
        )
        raise PinRefused(f"Interface {interface} could not be pinned: {exc}") from exc
    event_write(
        category=Category.SYSTEM,
        message=(
            f"Interface {interface} pinned to its DHCP address {pinned.cidr} as static for the "
            f"firmware upgrade"
        ),
        user=user,
        details={"interface": interface, "address": pinned.cidr, "gateway": pinned.gateway},
    )
    return pinned


def interface_unpin(*, user: Any, interface: str) -> network.Interface:
    """Return an interface pinned for the upgrade to DHCP."""
    current = _dhcp_interface(interface, want_mode="static")
    if not current.pinned_from_dhcp:
        raise PinRefused(
            f"Interface {interface} was made static by hand, not pinned for the upgrade: it "
            f"stays as it is."
        )
    try:
        restored = network.dhcp_unpin(interface)
    except (ApplianceError, ValueError) as exc:
        raise PinRefused(f"Interface {interface} could not return to DHCP: {exc}") from exc
    event_write(
        category=Category.SYSTEM,
        message=f"Interface {interface} returned to DHCP after the firmware upgrade",
        user=user,
        details={"interface": interface},
    )
    return restored


def with_last_rehearsal(checks: list[Any]) -> list[Any]:
    """The checklist with the last successful rehearsal's figures and date beside the downtime
    estimate (issue 18): what this appliance measured against what the formula expects."""
    import dataclasses

    from django.utils import timezone

    from upgrades.rehearsal import last_rehearsal

    last = last_rehearsal(succeeded_only=True)
    if last is None or last.downtime_s is None or last.finished_at is None:
        return checks
    when = timezone.localtime(last.finished_at).strftime("%Y-%m-%d %H:%M")
    note = (
        f"last rehearsal ({when}, firmware {last.report.get('version', '?')}): about "
        f"{last.downtime_s:.1f} s of downtime measured on a snapshot of this appliance, "
        f"{last.warning_count} warning{'s' * (last.warning_count != 1)}"
    )
    return [
        dataclasses.replace(check, details=(*check.details, note))
        if check.key == "downtime"
        else check
        for check in checks
    ]
