"""Network interfaces as configured in SUSE sysconfig files.

The upgrade guide warns that a DHCP interface may come back with a different address after the
restart, so the console must show which interfaces use DHCP, what address each currently holds
(from the dhcpcd lease), and be able to pin that address as static and later return to DHCP.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.system.atomic import atomic_write_text
from appliance.system.errors import ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.facts import parse_key_values, read_appliance_text, shown_path
from appliance.system.paths import Layout, layout

Mode = Literal["dhcp", "static"]

# Marks an ifcfg that dhcp_pin_static made static, so dhcp_unpin knows it may return it to DHCP.
PINNED_KEY = "LMI_PINNED_FROM_DHCP"

_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=")


@dataclass
class Interface:
    """One configured interface; for DHCP, ``address`` is the currently leased address."""

    name: str
    mode: Mode
    address: str | None
    prefix: int | None
    gateway: str | None
    # Static only because the upgrade pinned its DHCP lease (``LMI_PINNED_FROM_DHCP='yes'``).
    pinned_from_dhcp: bool = False

    @property
    def netmask(self) -> str | None:
        """Dotted netmask of ``prefix`` (SUSE files and dhcpcd use both notations)."""
        if self.prefix is None:
            return None
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    @property
    def cidr(self) -> str | None:
        """``address/prefix`` as written to ``IPADDR``, or None without an address."""
        if self.address is None:
            return None
        return f"{self.address}/{self.prefix}" if self.prefix is not None else self.address


def _mode(bootproto: str, path: Path, root: Path | None) -> Mode:
    value = bootproto.lower()
    if value.startswith("dhcp"):
        return "dhcp"
    if value == "static":
        return "static"
    raise MalformedApplianceFile(
        f"the file {shown_path(path, root)} has an unsupported BOOTPROTO {bootproto[:80]!r}"
    )


def _address(
    ipaddr: str, netmask: str | None, path: Path, root: Path | None
) -> tuple[str | None, int | None]:
    if not ipaddr:
        return None, None
    if "/" not in ipaddr and netmask:
        ipaddr = f"{ipaddr}/{netmask}"
    try:
        iface = ipaddress.ip_interface(ipaddr)
    except ValueError as exc:
        # A hand-edited or restored file: the page reports it instead of failing with a 500.
        raise MalformedApplianceFile(
            f"the file {shown_path(path, root)} has an invalid address {ipaddr[:80]!r}"
        ) from exc
    prefix = iface.network.prefixlen if ("/" in ipaddr) else None
    return str(iface.ip), prefix


def _default_routes(the_layout: Layout) -> list[tuple[str, str]]:
    """``(gateway, interface or "-")`` of each default route in ``etc/sysconfig/network/routes``."""
    try:
        text = read_appliance_text(the_layout.routes_file, the_layout.root)
    except FileNotFoundError:
        return []
    routes = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "default":
            routes.append((fields[1], fields[3] if len(fields) >= 4 else "-"))
    return routes


def _static_gateway(
    name: str, address: str | None, prefix: int | None, routes: list[tuple[str, str]]
) -> str | None:
    """The default gateway that belongs to this interface: named for it, or on its subnet."""
    for gateway, device in routes:
        if device == name:
            return gateway
    if address is None or prefix is None:
        return None
    network = ipaddress.ip_interface(f"{address}/{prefix}").network
    for gateway, device in routes:
        if device == "-" and ipaddress.ip_address(gateway) in network:
            return gateway
    return None


def read_interface(name: str, root: Path | None = None) -> Interface:
    """Read one interface's configuration (and its DHCP lease, if it uses DHCP)."""
    the_layout = layout(root)
    path = the_layout.ifcfg(name)
    try:
        config = parse_key_values(read_appliance_text(path, root))
    except FileNotFoundError as exc:
        raise ApplianceNotInitialized(f"no interface configuration at {path}") from exc
    mode = _mode(config.get("BOOTPROTO", "static"), path, root)
    if mode == "dhcp":
        lease_path = the_layout.dhcp_lease(name)
        try:
            lease = parse_key_values(read_appliance_text(lease_path, root))
        except FileNotFoundError:
            lease = {}
        address, prefix = _address(lease.get("IPADDR", ""), lease.get("NETMASK"), lease_path, root)
        return Interface(name, "dhcp", address, prefix, lease.get("GATEWAY") or None)
    address, prefix = _address(config.get("IPADDR", ""), config.get("NETMASK"), path, root)
    routes = _default_routes(the_layout)
    try:
        gateway = _static_gateway(name, address, prefix, routes)
    except ValueError as exc:
        raise MalformedApplianceFile(
            f"the file {shown_path(the_layout.routes_file, root)} has an invalid default route"
        ) from exc
    pinned = config.get(PINNED_KEY, "").lower() == "yes"
    return Interface(name, "static", address, prefix, gateway, pinned_from_dhcp=pinned)


def list_interfaces(root: Path | None = None) -> list[Interface]:
    """All configured interfaces except loopback, sorted by name."""
    network_dir = layout(root).network_dir
    if not network_dir.is_dir():
        raise ApplianceNotInitialized(f"no network configuration at {network_dir}")
    names = sorted(
        path.name.removeprefix("ifcfg-")
        for path in network_dir.glob("ifcfg-*")
        if path.is_file()
        and path.name != "ifcfg-lo"
        and not path.name.endswith("~")
        # ``ifcfg-`` or ``ifcfg-.x`` names no interface (and Layout.ifcfg refuses them).
        and not path.name.removeprefix("ifcfg-").startswith(".")
        and path.name != "ifcfg-"
    )
    return [read_interface(name, root) for name in names]


def _set_keys(text: str, updates: dict[str, str | None]) -> str:
    """Update ``KEY='value'`` lines in place, append new keys, drop keys mapped to None.

    Comments and unrelated keys are kept so an edit from the console does not erase what an
    administrator put in the file by hand.
    """
    pending = dict(updates)
    lines = []
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match and match.group(1) in updates:
            value = pending.pop(match.group(1), None)
            if value is not None:
                lines.append(f"{match.group(1)}='{value}'")
            continue
        lines.append(line)
    lines += [f"{key}='{value}'" for key, value in pending.items() if value is not None]
    return "\n".join(lines) + "\n"


def write_interface(interface: Interface, root: Path | None = None) -> None:
    """Write an interface's addressing back to its ``ifcfg`` file (and routes for a gateway).

    Static: ``BOOTPROTO='static'`` with ``IPADDR='a.b.c.d/prefix'``; the gateway, if given,
    becomes the interface's default route in ``routes``. DHCP: ``BOOTPROTO='dhcp'`` and the
    static address is removed; any default route bound to this interface is dropped too, since
    DHCP supplies it.
    """
    the_layout = layout(root)
    path = the_layout.ifcfg(interface.name)
    try:
        text = read_appliance_text(path, root)
    except FileNotFoundError:
        text = f"STARTMODE='auto'\nNAME='{interface.name}'\n"
    if interface.mode == "static":
        if interface.address is None or interface.prefix is None:
            raise ValueError("a static interface needs an address and a prefix")
        ipaddress.ip_interface(f"{interface.address}/{interface.prefix}")  # validates both
        updates: dict[str, str | None] = {
            "BOOTPROTO": "static",
            "IPADDR": f"{interface.address}/{interface.prefix}",
            "NETMASK": None,
        }
    else:
        updates = {"BOOTPROTO": "dhcp", "IPADDR": None, "NETMASK": None}
    atomic_write_text(path, _set_keys(text, updates))
    gateway = interface.gateway if interface.mode == "static" else None
    _write_default_route(the_layout, interface.name, gateway)


def _write_default_route(the_layout: Layout, name: str, gateway: str | None) -> None:
    try:
        lines = read_appliance_text(the_layout.routes_file, the_layout.root).splitlines()
    except FileNotFoundError:
        lines = []
    kept = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 4 and fields[0] == "default" and fields[3] == name:
            continue
        if gateway and len(fields) >= 2 and fields[0] == "default" and fields[1] == gateway:
            continue
        kept.append(line)
    if gateway:
        ipaddress.ip_address(gateway)
        kept.append(f"default {gateway} - {name}")
    new_text = "\n".join(kept) + "\n" if kept else ""
    if kept != lines:
        atomic_write_text(the_layout.routes_file, new_text)


def dhcp_pin_static(interface: str, root: Path | None = None) -> Interface:
    """Make a DHCP interface static on its current lease (address, netmask, gateway).

    The guide asks for a static address during the upgrade because a DHCP interface may come
    back with another one after the restart. The ifcfg keeps ``LMI_PINNED_FROM_DHCP='yes'`` so
    :func:`dhcp_unpin` can return it to DHCP afterwards. Idempotent for an interface already
    pinned; refuses (``ValueError``, nothing written) a static interface or one without a lease.
    """
    the_layout = layout(root)
    current = read_interface(interface, root)
    if current.mode == "static":
        if current.pinned_from_dhcp:
            return current
        raise ValueError(f"{interface} already has a static address; there is nothing to pin.")
    if current.address is None or current.prefix is None:
        raise ValueError(
            f"{interface} has no current DHCP lease with an address and netmask to pin; renew "
            "the lease or assign a static address by hand."
        )
    ipaddress.ip_interface(f"{current.address}/{current.prefix}")
    if current.gateway is not None:
        ipaddress.ip_address(current.gateway)
    path = the_layout.ifcfg(interface)
    text = read_appliance_text(path, root)
    updates: dict[str, str | None] = {
        "BOOTPROTO": "static",
        "IPADDR": f"{current.address}/{current.prefix}",
        "NETMASK": None,
        PINNED_KEY: "yes",
    }
    atomic_write_text(path, _set_keys(text, updates))
    _write_default_route(the_layout, interface, current.gateway)
    return read_interface(interface, root)


def dhcp_unpin(interface: str, root: Path | None = None) -> Interface:
    """Return an interface pinned by :func:`dhcp_pin_static` to DHCP (idempotent).

    Refuses (``ValueError``) a static interface that was configured static by hand: only the
    upgrade's own pin is undone.
    """
    the_layout = layout(root)
    current = read_interface(interface, root)
    if current.mode == "dhcp":
        return current
    if not current.pinned_from_dhcp:
        raise ValueError(
            f"{interface} was configured with a static address, not pinned from DHCP; it is left "
            "as it is."
        )
    path = the_layout.ifcfg(interface)
    text = read_appliance_text(path, root)
    updates: dict[str, str | None] = {
        "BOOTPROTO": "dhcp",
        "IPADDR": None,
        "NETMASK": None,
        PINNED_KEY: None,
    }
    # The route first: a crash in between leaves a pinned interface, which unpin can finish.
    _write_default_route(the_layout, interface, None)
    atomic_write_text(path, _set_keys(text, updates))
    return read_interface(interface, root)
