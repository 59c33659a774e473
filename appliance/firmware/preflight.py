"""The checklist the upgrade must pass before Install is allowed (the appliance's part).

Each check measures something on the box, says pass, warn or fail, and tells the administrator
what to do; a single fail stops the install before anything changes. The checks follow the
guide's "Before you upgrade" section: firmware 2.8.0.0 or later, the free-space rule on the
disks of the database and of the message store (the guide's 50%, or LMI_UPGRADE_MIN_FREE_PERCENT:
every text states the figure in force), DHCP interfaces, ``$(FILE)`` policy objects (which this
upgrade carries over), the rescue partition's system backup (restorable until the commit), and
the expected downtime. The console adds the bundle, entitlement
and cluster checks itself. Every check is read-only: running the preflight changes nothing.

Disk figures come from ``psutil.disk_usage``; tests pass their own ``disk_usage`` because a real
disk cannot be filled to the rule on demand.

The downtime estimate (phases 3-10: mail answered with 421) no longer grows with the store:
phase 3 ends when the mail service says its last transaction ended, phase 4 keeps the store by a
hard link, and phase 7 reads only the chunks the old store's journal names, the mail of the last
moments of phase 2, about one chunk of each of the four big tables. So it is

    ``DOWNTIME_FIXED_S + CAUGHT_UP_CHUNKS * chunk_bytes / CATCH_UP_BYTES_PER_S``

where ``chunk_bytes`` is :data:`CHUNK_MESSAGES` messages at the store's average size (a chunk
is copied, compressed and digested whole). The figures come from bench/upgrade.py on this
machine (2 cores, virtual disk; docs/performance.md): 1.06 s of downtime at 200,000 messages and
1.24 s at 1,000,000, both about 2 KB a message, against 1.1 s by this formula.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
from django.conf import settings

from appliance.config import policy, store
from appliance.firmware import firmware
from appliance.firmware.bundle import version_tuple
from appliance.mail import msgstore
from appliance.system import network, rescue
from appliance.system.errors import ApplianceError
from appliance.system.facts import read_firmware_release
from appliance.system.paths import layout

Status = Literal["pass", "warn", "fail", "pending"]
PASS: Status = "pass"  # noqa: S105 - a check verdict, not a password
WARN: Status = "warn"
FAIL: Status = "fail"
# Cannot be measured yet (no firmware downloaded to compare with): the checklist is a plan that
# can be read at any time, so such a check waits instead of stopping the others.
PENDING: Status = "pending"

# The guide: "at least 50% free space on the disks" of the database and of the message store;
# settings.UPGRADE_MIN_FREE_PERCENT overrides it (see min_free_fraction).
MIN_FREE_FRACTION = 0.5


def min_free_fraction() -> float:
    """The free fraction the rule asks for: the guide's 50% unless LMI_UPGRADE_MIN_FREE_PERCENT
    lowers it (a development host whose disk also holds unrelated data)."""
    percent = getattr(settings, "UPGRADE_MIN_FREE_PERCENT", None)
    return MIN_FREE_FRACTION if percent is None else float(percent) / 100


# Drain, store and configuration backups, switch, configuration conversion, health check:
# bench/upgrade.py, 2 cores, 2026-12-06: downtime minus phase 7 was 0.12 s at 200k messages and
# 0.17 s at 1M once phase 4 stopped paying for the store's log file (it was 0.4-1.6 s before).
DOWNTIME_FIXED_S = 0.25
CAUGHT_UP_CHUNKS = 4
CHUNK_MESSAGES = 8192  # appliance.mail.msgcounts.CHUNK_BITS
CATCH_UP_BYTES_PER_S = 130_000_000

RECLAIM_ADVICE = (
    "Lower retention and purge (Mail Security > Message Stores, Reclaim disk space), then run "
    "the checks again. Home > Resources shows what each retention, the old configuration "
    "backups and the firmware logs free on this disk, and what to do when all of it is not "
    "enough."
)


def reclaim_advice(total: int, free: int) -> str:
    """What a disk below the rule must free, in figures, then where to find the levers."""
    percent = min_free_fraction() * 100
    needed = max(0, math.ceil(total * min_free_fraction()) - free)
    return (
        f"Free {human_bytes(needed)} more on this disk to reach the {percent:.0f}% rule "
        f"({human_bytes(math.ceil(total * min_free_fraction()))} of {human_bytes(total)}). "
        + RECLAIM_ADVICE
    )


DiskUsage = Callable[[str], Any]  # returns an object with .total and .free (bytes)


@dataclass(frozen=True)
class Check:
    """One line of the checklist: what was measured, the verdict and what to do about it."""

    key: str
    title: str
    status: Status
    value: str
    advice: str
    details: tuple[str, ...] = ()


def preflight_passed(checks: list[Check]) -> bool:
    """Whether the install may start: no check failed (warnings are the administrator's call)."""
    return all(check.status != FAIL for check in checks)


def human_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KB"``: sizes the way the console's pages show them."""
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def downtime_estimate_seconds(store_bytes: int, messages: int) -> float:
    """Seconds of downtime expected for a store of this size (see the module docstring)."""
    return DOWNTIME_FIXED_S + CAUGHT_UP_CHUNKS * _chunk_bytes(store_bytes, messages) / (
        CATCH_UP_BYTES_PER_S
    )


def _chunk_bytes(store_bytes: int, messages: int) -> float:
    """A chunk of the store at its average message size (the whole store when it holds less
    than a chunk; none while it is empty)."""
    return min(CHUNK_MESSAGES, messages) * store_bytes / messages if messages else 0.0


def downtime_text(seconds: float) -> str:
    """``about 1.2 s`` (tenths below 10 s: the whole downtime is about a second now)."""
    return f"about {seconds:.1f} s" if seconds < 10 else f"about {round(seconds)} s"


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing ancestor: the disk it is (or will be) on."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- The checks -----------------------------------------------------------------------------


def _check_firmware(
    bundle_version: str | None, bundle_min_version: str, root: Path | None
) -> Check:
    title = "Firmware level"
    installed = read_firmware_release(root).get("FIRMWARE_VERSION", "")
    try:
        have = version_tuple(installed)
    except ValueError:
        return Check(
            "firmware",
            title,
            FAIL,
            f"installed: {installed or 'unknown'}",
            "The installed firmware level cannot be read; contact support before upgrading.",
        )
    if bundle_version is None:
        return Check(
            "firmware",
            title,
            PENDING,
            f"installed {installed}; no newer firmware to compare with",
            "Measured again once a newer firmware is available.",
        )
    try:
        new, minimum = version_tuple(bundle_version), version_tuple(bundle_min_version)
    except ValueError as exc:
        return Check(
            "firmware", title, FAIL, f"installed: {installed}", f"The bundle is unusable: {exc}"
        )
    value = f"installed {installed}, bundle {bundle_version} (requires {bundle_min_version})"
    if have < minimum:
        return Check(
            "firmware",
            title,
            FAIL,
            value,
            f"Upgrade to {bundle_min_version} first, then install {bundle_version}.",
        )
    if new <= have:
        return Check(
            "firmware",
            title,
            FAIL,
            value,
            f"Firmware {bundle_version} is not newer than the installed {installed}; there is "
            "nothing to install.",
        )
    return Check("firmware", title, PASS, value, "")


def _disk_check(key: str, title: str, path: Path, disk_usage: DiskUsage) -> Check:
    usage = disk_usage(str(_existing(path)))
    total, free = int(usage.total), int(usage.free)
    fraction = free / total if total > 0 else 0.0
    value = (
        f"{fraction:.0%} free ({human_bytes(free)} of {human_bytes(total)}); "
        f"the rule asks {min_free_fraction():.0%}"
    )
    details = (f"measured on the disk holding {path}",)
    if fraction < min_free_fraction():
        return Check(key, title, FAIL, value, reclaim_advice(total, free), details)
    return Check(key, title, PASS, value, "", details)


def _check_console_disk(console_db_path: Path | None, disk_usage: DiskUsage) -> Check:
    title = "Free space on the console database's disk"
    if console_db_path is None:
        return Check(
            "disk-console",
            title,
            PASS,
            "PostgreSQL: not on this disk",
            "",
            ("The console's database runs on a database server, not on the appliance's disks.",),
        )
    return _disk_check("disk-console", title, Path(console_db_path), disk_usage)


def _check_space_for_upgrade(
    root: Path | None,
    bundle_version: str | None,
    image_bytes: int | None,
    disk_usage: DiskUsage,
) -> Check:
    """The staged slot, the phase-4 copy and the 2.8.1 store must fit beside what is there."""
    the_layout = layout(root)
    totals = msgstore.totals(root)
    store_bytes = totals.bytes if totals else 0
    if image_bytes is None:
        active = the_layout.active_system.resolve()
        image_bytes = sum(
            entry.stat().st_size
            for entry in active.rglob("*")
            if entry.is_file() and not entry.is_symlink()
        )
    target = firmware.inactive_slot(root)
    if firmware.slot_bootable(target, root) and (
        firmware.slot_firmware_version(target, root) == bundle_version
    ):
        image_bytes = 0  # phase 2 already staged this image
    needs: list[tuple[Path, int, str]] = [
        (the_layout.system_dir, image_bytes, "the new system image"),
        (the_layout.xpu_dir, store_bytes, "the copy of the message store (phase 4)"),
        (the_layout.msgstore_dir, store_bytes, "the 2.8.1 message store (phase 7)"),
    ]
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for path, count, what in needs:
        where = _existing(path)
        device = os.stat(where).st_dev
        first, total, whats = by_device.get(device, (where, 0, []))
        by_device[device] = (first, total + count, [*whats, f"{what}: {human_bytes(count)}"])
    short: list[str] = []
    details: list[str] = []
    needed_total = 0
    free_total = 0
    for where, needed, whats in by_device.values():
        free = int(disk_usage(str(where)).free)
        needed_total += needed
        free_total += free
        details.append(
            f"disk of {where}: needs {human_bytes(needed)}, {human_bytes(free)} free "
            f"({'; '.join(whats)})"
        )
        if needed > free:
            short.append(f"{human_bytes(needed - free)} short on the disk of {where}")
    # Reserved above, so a disk that fills during the install cannot strand a rollback.
    details.append("a rollback needs no more: it renames the phase-4 copy back over the store")
    value = f"needs {human_bytes(needed_total)}, {human_bytes(free_total)} free"
    if short:
        return Check(
            "space-for-upgrade",
            "Space for the upgrade",
            FAIL,
            value,
            f"{'; '.join(short)}. {RECLAIM_ADVICE}",
            tuple(details),
        )
    return Check("space-for-upgrade", "Space for the upgrade", PASS, value, "", tuple(details))


def _check_dhcp(root: Path | None) -> Check:
    title = "Interfaces on DHCP"
    on_dhcp: list[str] = []
    pinned: list[str] = []
    details: list[str] = []
    for interface in network.list_interfaces(root):
        if interface.mode == "dhcp":
            on_dhcp.append(interface.name)
            gateway = f", gateway {interface.gateway}" if interface.gateway else ""
            lease = f"leased {interface.cidr}{gateway}" if interface.address else "no lease"
            details.append(f"{interface.name}: DHCP, {lease}")
        elif interface.pinned_from_dhcp:
            pinned.append(interface.name)
            details.append(f"{interface.name}: pinned to {interface.cidr} for the upgrade")
    if on_dhcp:
        return Check(
            "dhcp",
            title,
            WARN,
            f"{', '.join(on_dhcp)} on DHCP",
            "An interface on DHCP may get another address after the restart, which disrupts "
            "mail traffic: pin its current address as static for the upgrade, and return to "
            "DHCP afterwards.",
            tuple(details),
        )
    if pinned:
        return Check(
            "dhcp",
            title,
            PASS,
            f"{', '.join(pinned)} pinned from DHCP",
            f"Return {', '.join(pinned)} to DHCP after the upgrade.",
            tuple(details),
        )
    return Check("dhcp", title, PASS, "no interface on DHCP", "")


def _check_file_macros(root: Path | None) -> Check:
    title = "Policy objects using $(FILE)"
    objects = store.file_macro_objects(root)
    details: list[str] = []
    problems: list[str] = []
    for obj in objects:
        try:
            path = policy.object_file(obj, root)
        except ValueError:
            problems.append(obj.name)
            details.append(f"{obj.name}: {obj.file_path} (outside the appliance, not carried)")
            continue
        if path.is_file():
            details.append(f"{obj.name}: {obj.file_path} ({human_bytes(path.stat().st_size)})")
        else:
            problems.append(obj.name)
            details.append(f"{obj.name}: {obj.file_path} (missing)")
    if not objects:
        return Check("file-macros", title, PASS, "none", "", ())
    value = f"{len(objects)} policy object{'s' if len(objects) != 1 else ''} read files"
    if problems:
        return Check(
            "file-macros",
            title,
            WARN,
            value,
            f"The file of {', '.join(problems)} is missing or outside the appliance, so the "
            "object is empty now and after the upgrade: restore the file or change the object.",
            tuple(details),
        )
    return Check(
        "file-macros",
        title,
        PASS,
        value,
        f"The {len(objects)} file{'s are' if len(objects) != 1 else ' is'} carried over "
        "automatically into the new configuration (phase 8), and a rollback puts the old "
        "configuration back: nothing to back up by hand (information only).",
        tuple(details),
    )


def _check_rescue(root: Path | None) -> Check:
    title = "System backup on the rescue partition"
    advice = (
        "Nothing to do before the install: the image stays restorable until the upgrade "
        "commits, and a configuration backup is taken automatically when the install starts. "
        "Download one too if you want a copy off the appliance."
    )
    try:
        info = rescue.system_backup_info(root)
    except ApplianceError as exc:
        return Check("rescue", title, WARN, "unreadable", advice, (str(exc),))
    if info is None:
        return Check(
            "rescue",
            title,
            WARN,
            "no system backup image",
            advice,
            ("A new system backup of the upgraded system is made when the upgrade completes.",),
        )
    return Check(
        "rescue",
        title,
        WARN,
        f"firmware {info.firmware_version}, {info.created_at:%Y-%m-%d %H:%M} UTC, "
        f"{human_bytes(info.size)}",
        advice,
        (
            "The new system is installed into a firmware slot, not onto the rescue partition, so "
            "this image is not deleted when the upgrade starts and stays restorable throughout "
            "the run (a rollback needs no image). Only the commit (phase 10) replaces it with a "
            "backup of the new system; from then on this image cannot be restored.",
        ),
    )


def _check_downtime(root: Path | None) -> Check:
    totals = msgstore.totals(root)
    store_bytes = totals.bytes if totals else 0
    messages = totals.messages if totals else 0
    seconds = downtime_estimate_seconds(store_bytes, messages)
    return Check(
        "downtime",
        "Expected downtime",
        PASS,
        downtime_text(seconds),
        "Mail is answered with 421 (try again later) from the service shutdown until the "
        "services restart; sending servers retry.",
        (
            f"message store: {messages} messages, {human_bytes(store_bytes)}",
            f"whatever its size: about {CAUGHT_UP_CHUNKS} chunks of {CHUNK_MESSAGES:,} messages "
            f"({human_bytes(CAUGHT_UP_CHUNKS * _chunk_bytes(store_bytes, messages))}) caught up "
            f"at {human_bytes(CATCH_UP_BYTES_PER_S)}/s, {DOWNTIME_FIXED_S:.1f} s fixed",
        ),
    )


def preflight_checks(
    bundle_version: str | None,
    bundle_min_version: str,
    root: Path | None = None,
    *,
    console_db_path: Path | None = None,
    image_bytes: int | None = None,
    disk_usage: DiskUsage | None = None,
) -> list[Check]:
    """Run every appliance check (read-only) and return them in the checklist's order.

    ``bundle_version``: the firmware to install (the bundle's, or the newest offer's before a
    download); None when there is none, so the firmware check is pending.
    ``image_bytes``: the size of the new system image (the bundle's payload size); without it
    the running slot's size stands in. ``disk_usage`` replaces ``psutil.disk_usage`` (tests).
    A check that cannot be measured fails with the reason, rather than letting the install go on
    blind.
    """
    usage = disk_usage or psutil.disk_usage
    the_layout = layout(root)
    steps: list[tuple[str, str, Callable[[], Check]]] = [
        (
            "firmware",
            "Firmware level",
            lambda: _check_firmware(bundle_version, bundle_min_version, root),
        ),
        (
            "disk-msgstore",
            "Free space on the message store's disk",
            lambda: _disk_check(
                "disk-msgstore",
                "Free space on the message store's disk",
                the_layout.msgstore_dir,
                usage,
            ),
        ),
        (
            "disk-console",
            "Free space on the console database's disk",
            lambda: _check_console_disk(console_db_path, usage),
        ),
        (
            "space-for-upgrade",
            "Space for the upgrade",
            lambda: _check_space_for_upgrade(root, bundle_version, image_bytes, usage),
        ),
        ("dhcp", "Interfaces on DHCP", lambda: _check_dhcp(root)),
        ("file-macros", "Policy objects using $(FILE)", lambda: _check_file_macros(root)),
        ("rescue", "System backup on the rescue partition", lambda: _check_rescue(root)),
        ("downtime", "Expected downtime", lambda: _check_downtime(root)),
    ]
    checks = []
    for key, title, run in steps:
        try:
            checks.append(run())
        except (ApplianceError, OSError, ValueError) as exc:
            checks.append(
                Check(key, title, FAIL, "could not be measured", f"{exc}", (type(exc).__name__,))
            )
    return checks
