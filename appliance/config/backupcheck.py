"""What a configuration backup may hold: every check of its files before anything is restored.

The archive itself is read by :mod:`appliance.config.backupformat`; here its content is held to
what this console makes and reads: configuration XML of known files and elements only, a valid
host name, SUSE network files the pages can read, sane store retention, and ``$(FILE)`` lists
only where :mod:`appliance.config.backupfiles` allows them, as bounded text.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lxml import etree

from appliance.config.backupfiles import (
    CPE,
    HOSTNAME,
    NETWORK,
    check_target,
    config_path,
    list_dirs_shown,
    list_path,
    macro_relative,
    scratch_root,
)
from appliance.config.backupformat import BackupRejected, loads
from appliance.config.configformat import parse_config
from appliance.config.smtp import SmtpSettings, parse_smtp_settings
from appliance.system import network
from appliance.system.errors import ApplianceError, ApplianceNotInitialized, UnsafeXMLError
from appliance.system.paths import resolve_inside
from appliance.system.safexml import parse_xml

MAX_LIST_BYTES = 8 * 1024 * 1024  # a list of addresses, domains or words, one per line

# What a restore may write, beyond "well-formed and in its place": each of these is read by
# the console's pages afterwards, so a value they cannot show must be refused here, not there.
MAX_HOSTNAME_CHARS = 253  # RFC 1123 / RFC 1035
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A SUSE interface configuration name: a Linux interface name, or the hardware-bound names of
# SLES 10 (the 2.8.0 firmware's system), such as "eth-id-00:11:22:33:44:55" or
# "eth-bus-pci-0000:00:19.0"; starting with a letter or digit, so never "." or "..", and never
# a "/" that could leave the network directory.
_INTERFACE = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
# The files of etc/sysconfig/network a backup may carry: SUSE's per-interface configuration
# and routes, the global route table and SUSE's two global settings files.
_KEY_VALUE_FILE = re.compile(rf"ifcfg-{_INTERFACE}|config|dhcp")
_ROUTES_FILE = re.compile(rf"ifroute-{_INTERFACE}|routes")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
MAX_NAME_CHARS = 200  # a message store's or a policy object's name

# The elements of each configuration file this console reads and writes, by file name: (root
# element, every element). Anything else (an XInclude, an element of another vocabulary) is not
# part of a configuration this console made and is refused rather than kept unread.
_SMTP_FIELDS = frozenset(spec.name for spec in dataclasses.fields(SmtpSettings))
_CONFIG_ELEMENTS: dict[str, tuple[str, frozenset[str]]] = {
    "mailsec_policyobjects1_1.xml": (
        "policyobjects",
        frozenset({"policyobjects", "object", "name", "value"}),
    ),
    "mailsec_policy1_0.xml": ("mailpolicy", frozenset({"mailpolicy", "rule", "quarantine"})),
    "mailsec_smtp1_0.xml": ("smtp", frozenset({"smtp"}) | _SMTP_FIELDS),
    "mailsec_config2_0.xml": (
        "mailsecConfig",
        frozenset(
            {
                "mailsecConfig",
                "policyObjects",
                "object",
                "name",
                "value",
                "fileRef",
                "mailPolicy",
                "rules",
                "rule",
                "quarantine",
                "store",
                "smtp",
                "listenPort",
                "nextHop",
                "maxMessageSize",
                "smtpLogRetentionDays",
                "trackingLogRetentionDays",
                "relayNetworks",
            }
        ),
    ),
}


def check_xml(files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if not name.startswith(CPE):
            continue
        shown = name.removeprefix(CPE)[:200]
        if "/" in name.removeprefix(CPE) or not name.endswith(".xml"):
            raise BackupRejected(f'The backup contains "{shown}" in the configuration directory.')
        try:
            document = parse_xml(data)
        except UnsafeXMLError as exc:
            raise BackupRejected(
                f"The configuration file {shown} declares a DOCTYPE or entities (as in XXE or "
                "entity expansion attacks); it is refused."
            ) from exc
        except ApplianceError as exc:
            raise BackupRejected(f"The configuration file {shown} is not well-formed XML.") from exc
        _check_elements(shown, document)


def _element_name(element: etree._Element) -> str:
    """``xi:include (namespace http://www.w3.org/2001/XInclude)``, or a plain tag as it is."""
    qname = etree.QName(element)
    name = f"{element.prefix}:{qname.localname}" if element.prefix else qname.localname
    if qname.namespace:
        name += f" (namespace {qname.namespace})"
    return name[:200]


def _check_elements(shown: str, document: etree._Element) -> None:
    """Refuse a configuration file of a name, or with an element, this console does not know.

    parse_xml already refuses DOCTYPEs and entities; an XInclude or a foreign element would
    not be expanded either, but it would be restored and kept unread in the appliance's
    configuration, where the mail-security engine might act on it: no such file is ours.
    """
    known = _CONFIG_ELEMENTS.get(shown)
    if known is None:
        raise BackupRejected(
            f"The backup contains the configuration file {shown!r}, which this console does not "
            "know; the backup is refused."
        )
    root_tag, elements = known
    if document.tag != root_tag:
        raise BackupRejected(
            f"The configuration file {shown} starts with the element <{_element_name(document)}> "
            f"instead of <{root_tag}>; the backup is refused."
        )
    for element in document.iter():
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions carry no configuration
        if element.tag not in elements:
            raise BackupRejected(
                f"The configuration file {shown} contains the element "
                f"<{_element_name(element)}>, which this console does not know (an XInclude "
                "or another foreign element is never restored); the backup is refused."
            )


def _decoded(data: bytes, encoding: str, refusal: str) -> str:
    """``data`` as text, or the backup refused with ``refusal``.

    A member the console cannot read as text cannot be checked either, so it refuses the
    whole backup rather than restoring bytes nothing has looked at.
    """
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise BackupRejected(refusal) from exc


def check_smtp(files: dict[str, bytes]) -> None:
    """The SMTP settings a restore would write must be ones SMTP > Configuration could save.

    Above all no relay network wide enough to make an open relay (``0.0.0.0/0``): restored, it
    would not open the relay (the mail service defers all mail while such a value is on disk),
    but it would stop the mail. Run on the files in the running format, after any conversion.
    """
    for relative, data in files.items():
        name = relative.removeprefix(CPE)
        try:
            if name == "mailsec_smtp1_0.xml":
                settings: SmtpSettings | None = parse_smtp_settings(data)
            elif name == "mailsec_config2_0.xml":
                settings = parse_config(data).smtp
            else:
                continue
            if settings is not None:
                settings.validate()
        except (ApplianceError, ValueError) as exc:
            raise BackupRejected(f"The backup's SMTP settings are refused: {exc}.") from exc


def check_hostname(files: dict[str, bytes]) -> None:
    """``etc/HOSTNAME`` must hold one RFC 1123 host name: every page shows it."""
    data = files.get(HOSTNAME)
    if data is None:
        return
    text = _decoded(
        data,
        "ascii",
        f"The backup's host name ({HOSTNAME}) is not ASCII text; the backup is refused.",
    )
    name = text.removesuffix("\n")
    problem = ""
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_HOSTNAME_CHARS:
        problem = f"it is longer than {MAX_HOSTNAME_CHARS} characters"
    else:
        for label in name.split("."):
            if not _HOST_LABEL.fullmatch(label):
                problem = (
                    f"the part {label[:80]!r} is not 1 to 63 letters, digits and hyphens that "
                    "neither start nor end with a hyphen"
                )
                break
    if problem:
        raise BackupRejected(
            f"The backup's host name ({HOSTNAME}) {name[:80]!r} is not a valid host name: "
            f"{problem}; the backup is refused."
        )


def check_network(files: dict[str, bytes]) -> None:
    """The network files must be SUSE's, in plain ASCII, and readable as the pages read them."""
    network_files = {name: data for name, data in files.items() if name.startswith(NETWORK)}
    for relative, data in network_files.items():
        name = relative.removeprefix(NETWORK)
        key_values = _KEY_VALUE_FILE.fullmatch(name) is not None
        if not key_values and _ROUTES_FILE.fullmatch(name) is None:
            raise BackupRejected(
                f"The backup contains the network file {name[:80]!r}, which is not an interface "
                "configuration (ifcfg-<interface>) or a route table; the backup is refused."
            )
        text = _decoded(
            data,
            "ascii",
            f"The backup's network file {name} is not ASCII text; the backup is refused.",
        )
        # split("\n"), not splitlines(): the latter would take a form feed for a line break.
        for number, line in enumerate(text.split("\n"), start=1):
            if any(not (" " <= char <= "~" or char == "\t") for char in line):
                raise BackupRejected(
                    f"The backup's network file {name} has a control character on line "
                    f"{number}; the backup is refused."
                )
            content = line.strip()
            is_setting = key_values and content and not content.startswith("#")
            if is_setting and not _ASSIGNMENT.fullmatch(content):
                raise BackupRejected(
                    f"The backup's network file {name} has line {number}, which is not "
                    "KEY=value; the backup is refused."
                )
    with scratch_root(network_files) as scratch:
        for relative in network_files:
            name = relative.removeprefix(NETWORK)
            if not name.startswith("ifcfg-"):
                continue
            try:
                network.read_interface(name.removeprefix("ifcfg-"), scratch)
            except (ApplianceError, ValueError) as exc:
                raise BackupRejected(
                    f"The backup's network file {name} cannot be used: {exc}; the backup is "
                    "refused."
                ) from exc


def _name_problem(kind: str, name: object) -> str:
    """'' when ``name`` is a usable store or object name, else what is wrong with it."""
    if not isinstance(name, str) or not name.strip():
        return f"The backup has a {kind} without a name"
    if len(name) > MAX_NAME_CHARS:
        return f"The backup's {kind} {name[:80]!r}... has a name over {MAX_NAME_CHARS} characters"
    if not name.isprintable():
        return f"The backup's {kind} {name!r} has a control character in its name"
    return ""


def check_settings(data: bytes) -> dict[str, Any]:
    from appliance.mail.retention import MAX_RETENTION_DAYS

    settings = loads(data, "appliance settings")
    stores = settings.get("store_retention") if isinstance(settings, dict) else None
    if not isinstance(stores, dict):
        raise BackupRejected("The backup's appliance settings have no store retention.")
    for name, days in stores.items():
        problem = _name_problem("message store", name)
        if problem:
            raise BackupRejected(f"{problem}; the backup is refused.")
        if (
            isinstance(days, bool)
            or not isinstance(days, int)
            or not 1 <= days <= MAX_RETENTION_DAYS
        ):
            raise BackupRejected(
                f"The backup's retention for message store {name[:80]!r} is invalid."
            )
    return settings


def _backup_macros(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """``(object name, appliance path)`` of the $(FILE) macros in a backup's policy objects."""
    from appliance.config.store import list_policy_objects

    with scratch_root({k: v for k, v in files.items() if k.startswith(CPE)}) as scratch:
        try:
            objects = list_policy_objects(scratch)
        except ApplianceNotInitialized:
            return []
        except (ApplianceError, ValueError) as exc:
            raise BackupRejected(f"The backup's policy objects cannot be read: {exc}") from exc
    for obj in objects:
        problem = _name_problem("policy object", obj.name)
        if problem:
            raise BackupRejected(f"{problem} (id {obj.id[:80]!r}); the backup is refused.")
    return [(obj.name, obj.file_path) for obj in objects if obj.file_path is not None]


def _check_list_content(object_name: str, relative: str, data: bytes) -> None:
    """A list file is bounded text: lines of printable characters (tabs allowed)."""
    shown = f"The policy object {object_name[:80]!r} reads /{relative[:200]}, which"
    if len(data) > MAX_LIST_BYTES:
        raise BackupRejected(
            f"{shown} is larger than {MAX_LIST_BYTES // (1024 * 1024)} MiB in the backup; "
            "the backup is refused."
        )
    text = _decoded(
        data, "utf-8", f"{shown} is not UTF-8 text in the backup; the backup is refused."
    )
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.removesuffix("\r").replace("\t", " ").isprintable():
            raise BackupRejected(
                f"{shown} has a control character on line {number} in the backup; the backup "
                "is refused."
            )


def check_paths(files: dict[str, bytes], root: Path) -> None:
    """Every file must land where a configuration backup may write, inside the appliance.

    A file named by a $(FILE) policy object is restored only under :data:`LIST_DIRS`, as
    bounded text; an object naming any other path may be restored (it reads what is there)
    but never carry that file.
    """
    allowed: dict[str, str] = {}
    for object_name, appliance_path in _backup_macros(files):
        relative = macro_relative(appliance_path)
        try:
            resolve_inside(root, appliance_path)
        except ValueError as exc:
            raise BackupRejected(
                f"The policy object {object_name[:80]!r} reads {appliance_path[:200]}, which "
                "lies outside the appliance; the backup is refused."
            ) from exc
        if relative is None:
            continue
        if relative in files and not list_path(relative):
            raise BackupRejected(
                f"The policy object {object_name[:80]!r} reads {appliance_path[:200]}, and the "
                f"backup carries that file: a restore writes list files only under "
                f"{list_dirs_shown()}; the backup is refused."
            )
        allowed.setdefault(relative, object_name)
    for relative, data in files.items():
        if config_path(relative):
            pass
        elif relative not in allowed:
            raise BackupRejected(
                f'The backup contains "{relative[:200]}", which no $(FILE) policy object names.'
            )
        else:
            _check_list_content(allowed[relative], relative, data)
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in files:
                raise BackupRejected(
                    f'The backup contains "{relative[:200]}" beneath one of its own files.'
                )
        check_target(relative, root)
