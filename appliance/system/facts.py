"""Firmware release, operating system release and host name (Home > System).

The upgrade planning starts here: the guide makes firmware 2.8.0.0 or later a precondition and
the OS release tells whether the box is still on SUSE Linux Enterprise Server 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.system.atomic import atomic_write_text
from appliance.system.errors import ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.paths import layout

# The order firmware-release keys are written in; unknown keys keep their place after these.
FIRMWARE_KEYS = ("FIRMWARE_VERSION", "MODEL", "BUILD", "SERIAL")


@dataclass
class SystemInfo:
    """What Home > System shows about the box."""

    firmware_version: str
    model: str
    build: str
    serial: str
    os_release: str
    hostname: str


def appliance_exists(root: Path | None = None) -> bool:
    """True when the root holds an initialised appliance.

    ``etc/firmware-release`` is the marker: ``init_demo`` writes it last, so a half-built root
    does not count as an appliance.
    """
    return layout(root).firmware_release.is_file()


def parse_key_values(text: str) -> dict[str, str]:
    """Parse ``KEY=value`` lines (shell style, optional quotes, ``#`` comments)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def read_appliance_text(path: Path, root: Path | None = None) -> str:
    """The text of an appliance file, refusing one that is not UTF-8 as damaged.

    The files come from the box (or a restored backup) and may hold any bytes; a
    ``UnicodeDecodeError`` would reach the pages as a 500, whereas
    :class:`MalformedApplianceFile` is what every page already reports as a damaged file.
    ``FileNotFoundError`` passes through: each caller knows what a missing file means.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedApplianceFile(
            f"the file {shown_path(path, root)} cannot be read: not UTF-8 (byte {exc.start})"
        ) from exc


def shown_path(path: Path, root: Path | None = None) -> str:
    """``path`` as seen on the appliance (``etc/HOSTNAME``), not the console host's path."""
    base = layout(root).root
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def read_firmware_release(root: Path | None = None) -> dict[str, str]:
    """Return every key of ``etc/firmware-release``."""
    path = layout(root).firmware_release
    try:
        return parse_key_values(read_appliance_text(path, root))
    except FileNotFoundError as exc:
        raise ApplianceNotInitialized(f"no firmware release at {path}") from exc


def write_firmware_release(values: dict[str, str], root: Path | None = None) -> None:
    """Atomically write ``etc/firmware-release`` (known keys first, then the rest in order)."""
    for key, value in values.items():
        if "\n" in key or "=" in key or "\n" in value:
            raise ValueError(f"invalid firmware-release entry: {key!r}={value!r}")
    ordered = [key for key in FIRMWARE_KEYS if key in values]
    ordered += [key for key in values if key not in FIRMWARE_KEYS]
    text = "".join(f"{key}={values[key]}\n" for key in ordered)
    atomic_write_text(layout(root).firmware_release, text)


def read_os_release(root: Path | None = None) -> str:
    """Return the first line of ``etc/SuSE-release``, e.g. "SUSE Linux Enterprise Server 10"."""
    path = layout(root).os_release
    try:
        lines = read_appliance_text(path, root).splitlines()
    except FileNotFoundError as exc:
        raise ApplianceNotInitialized(f"no OS release at {path}") from exc
    return lines[0].strip() if lines else ""


def system_info(root: Path | None = None) -> SystemInfo:
    """Read the firmware release, OS release and host name.

    Raises :class:`ApplianceNotInitialized` when the root has not been set up, and
    :class:`MalformedApplianceFile` when the firmware release lacks its version or a file is
    not text (a host name of other bytes than UTF-8, as a restored backup could once carry).
    """
    the_layout = layout(root)
    if not the_layout.root.is_dir():
        raise ApplianceNotInitialized(f"appliance root {the_layout.root} does not exist")
    release = read_firmware_release(root)
    if not release.get("FIRMWARE_VERSION"):
        raise MalformedApplianceFile(f"{the_layout.firmware_release} has no FIRMWARE_VERSION")
    try:
        hostname = read_appliance_text(the_layout.hostname_file, root).strip()
    except FileNotFoundError:
        hostname = ""
    return SystemInfo(
        firmware_version=release["FIRMWARE_VERSION"],
        model=release.get("MODEL", ""),
        build=release.get("BUILD", ""),
        serial=release.get("SERIAL", ""),
        os_release=read_os_release(root),
        hostname=hostname,
    )
