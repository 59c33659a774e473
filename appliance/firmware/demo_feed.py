"""Demo firmware updates: a vendor key, a feed with 2.8.1.0 and 2.8.0.0 bundles, and a license.

A development setup has no vendor to download from, so ``init_appliance`` plays the vendor once:
it makes a demo signing key under ``var/demo-vendor/`` (outside the appliance root, private key
0600), trusts its public key through ``TRUSTED_KEYS_DIR``, builds two signed bundles (2.8.1.0,
the SUSE Linux Enterprise Server 11 upgrade the guide describes, and 2.8.0.0, which is not newer
than the demo appliance), publishes them into the local feed directory ``UPDATE_FEED_URL`` and
installs a license for the demo appliance's serial with a year of update entitlement.

The system images are derived from the demo appliance's 2.8.0.0 slot, with about 12 MB of
pseudo-random "binaries" in the new one so a download visibly takes its time. Every step is
skipped when its result is already in place, so running it again is cheap and changes nothing.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from django.conf import settings

from appliance import demo
from appliance.firmware.bundle import BundleError, read_manifest
from appliance.firmware.bundlebuild import build_bundle
from appliance.firmware.feed import FEED_FILE, FeedError, bundle_file_name, parse_feed, publish
from appliance.firmware.license import install_license, license_status, sign_license
from appliance.firmware.signing import decode_key, generate_keypair, public_key_b64, public_key_of
from appliance.system.atomic import atomic_write_text, exclusive_lock
from appliance.system.errors import ApplianceNotInitialized
from appliance.system.facts import parse_key_values, read_firmware_release
from appliance.system.paths import layout

VENDOR_DIR = "demo-vendor"
PRIVATE_KEY_FILE = "vendor.key"
PUBLIC_KEY_FILE = "vendor.pub"
TRUSTED_KEY_FILE = "demo-vendor.pub"
CUSTOMER = "Example Corp"
NEW_VERSION = "2.8.1.0"
MiB = 1024 * 1024

SLES11_RELEASE = "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 2\n"

NOTES_281 = """\
Lotus Protector for Mail Security 2.8.1.0 upgrades the operating system from SUSE Linux \
Enterprise Server 10 to SUSE Linux Enterprise Server 11.

Before you install, the preflight checklist (Updates > Updates & Licensing > Install) measures \
each of these on your appliance; a failed check stops the install before anything changes:
- The appliance must run firmware 2.8.0.0 or later.
- The disks of the console's database and of the message store need the free space the \
console's rule asks for (its figure is on Home > Resources). The checklist says how much to \
free; Home > Resources shows what each retention and clean-up would free.
- Files read by $(FILE) policy objects are carried over: the upgrade copies them into the new \
configuration, so there is nothing to back up by hand. The checklist lists the objects and \
their files, and warns about a file that is missing.
- An interface on DHCP may get a different address after the restart: the checklist offers to \
pin its current address as static for the upgrade.
- The system backup image on the rescue partition stays restorable until the upgrade commits: \
the new system is installed into a separate firmware slot, not onto the rescue partition. At \
the commit the image is replaced by a backup of the new system.

Downtime: the new operating system is installed while mail flows, with its writes throttled so \
that mail keeps its throughput. From the service shutdown until the services restart, mail is \
answered with 421 (try again later) and sending servers retry. The checklist estimates that \
time from the size of your message store (about 24 seconds for 1,000,000 messages, 1.9 GB, on \
the reference system).

The message store and the configuration are converted to the 2.8.1 format. A copy of the \
store and a configuration backup are taken first, so a failure before the commit rolls the \
appliance back to 2.8.0 automatically, with its data as it was.
"""

NOTES_280 = """\
Lotus Protector for Mail Security 2.8.0.0 on SUSE Linux Enterprise Server 10. This is the \
firmware the demo appliance already runs; it is offered to show a bundle that is not newer.
"""


@dataclass(frozen=True)
class _Release:
    """One demo bundle: its version, formats and what to add to the 2.8.0.0 slot's files."""

    version: str
    min_version: str
    data_format: str
    os_release: str
    build: str
    release_notes: str
    customise: Callable[[Path, str], None]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _binary(version: str, name: str, size: int) -> bytes:
    """Reproducible incompressible bytes standing in for a compiled file."""
    rng = random.Random(f"lmi-demo-firmware/{version}/{name}")  # noqa: S311 - filler, no secret
    return b"\x7fELF\x02\x01\x01\x00" + rng.randbytes(size - 8)


def _customise_281(tree: Path, version: str) -> None:
    (tree / "lib" / "libmailsec.so.2.8.0").unlink(missing_ok=True)
    _write(tree / "etc" / "SuSE-release", SLES11_RELEASE.encode())
    _write(tree / "lib" / "libmailsec.so.2.8.1", _binary(version, "libmailsec", 4 * MiB), 0o755)
    os.symlink("libmailsec.so.2.8.1", tree / "lib" / "libmailsec.so.2")
    _write(tree / "lib" / "libcpe.so.1.1", _binary(version, "libcpe", 1 * MiB), 0o755)
    _write(tree / "lib" / "mailsecd.bin", _binary(version, "mailsecd", 3 * MiB), 0o755)
    _write(tree / "lib" / "xpu.bin", _binary(version, "xpu", 1 * MiB), 0o755)
    kernel = "3.0.13-0.27-default"
    _write(tree / "boot" / f"vmlinuz-{kernel}", _binary(version, "vmlinuz", 3 * MiB))
    os.symlink(f"vmlinuz-{kernel}", tree / "boot" / "vmlinuz")
    _write(
        tree / "bin" / "msgstore-migrate",
        b"#!/bin/sh\n# Converts the message store from the 2.8.0 to the 2.8.1 format (phase 7)\n"
        b'exec /opt/mailsec/lib/xpu.bin --migrate-msgstore "$@"\n',
        0o755,
    )
    _write(
        tree / "bin" / "config-migrate",
        b"#!/bin/sh\n# Converts the configuration to the 2.8.1 format (phase 8)\n"
        b'exec /opt/mailsec/lib/xpu.bin --migrate-config "$@"\n',
        0o755,
    )
    _write(tree / "share" / "doc" / "RELEASE-NOTES", NOTES_281.encode())


def _customise_280(tree: Path, version: str) -> None:
    _write(tree / "lib" / "mailsecd.bin", _binary(version, "mailsecd", 2 * MiB), 0o755)
    _write(tree / "lib" / "xpu.bin", _binary(version, "xpu", 1 * MiB), 0o755)
    kernel = "2.6.16.60-0.54.5-smp"
    _write(tree / "boot" / f"vmlinuz-{kernel}", _binary(version, "vmlinuz", 2 * MiB))
    os.symlink(f"vmlinuz-{kernel}", tree / "boot" / "vmlinuz")
    _write(tree / "share" / "doc" / "RELEASE-NOTES", NOTES_280.encode())


RELEASES = (
    _Release(
        version=NEW_VERSION,
        min_version="2.8.0.0",
        data_format="2.8.1",
        os_release="SUSE Linux Enterprise Server 11 (x86_64)",
        build="20131004-0915",
        release_notes=NOTES_281,
        customise=_customise_281,
    ),
    _Release(
        version=demo.FIRMWARE_VERSION,
        min_version="2.7.0.0",
        data_format="2.8.0",
        os_release="SUSE Linux Enterprise Server 10 (x86_64)",
        build=demo.FIRMWARE_RELEASE["BUILD"],
        release_notes=NOTES_280,
        customise=_customise_280,
    ),
)


def _base_tree(tree: Path, root: Path | None) -> None:
    """The demo appliance's active 2.8.0.0 slot, or the demo's files when there is none."""
    active = layout(root).active_system
    if active.is_dir():
        shutil.copytree(active.resolve(), tree, symlinks=True, dirs_exist_ok=True)
        return
    _write(tree / "VERSION", f"{demo.FIRMWARE_VERSION}\n".encode())
    release = "".join(f"{key}={value}\n" for key, value in demo.FIRMWARE_RELEASE.items())
    _write(tree / "etc" / "firmware-release", release.encode())
    _write(tree / "etc" / "SuSE-release", demo.OS_RELEASE.encode())
    _write(tree / "bin" / "mailsecd", b"#!/bin/sh\nexec /opt/mailsec/lib/mailsecd.bin\n", 0o755)


def _system_tree(tree: Path, release: _Release, root: Path | None) -> None:
    _base_tree(tree, root)
    release_file = tree / "etc" / "firmware-release"
    values = parse_key_values(release_file.read_text(encoding="utf-8"))
    values.update(FIRMWARE_VERSION=release.version, BUILD=release.build)
    _write(release_file, "".join(f"{key}={value}\n" for key, value in values.items()).encode())
    _write(tree / "VERSION", f"{release.version}\n".encode())
    release.customise(tree, release.version)


# --- What is missing ----------------------------------------------------------------------


def _vendor_dir(var_dir: Path) -> Path:
    return Path(var_dir) / VENDOR_DIR


def _load_keypair(vendor_dir: Path) -> tuple[bytes, bytes] | None:
    try:
        private = decode_key((vendor_dir / PRIVATE_KEY_FILE).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return private, public_key_of(private)


def _trusted_key_file() -> Path:
    return Path(settings.TRUSTED_KEYS_DIR) / TRUSTED_KEY_FILE


def _is_trusted(public: bytes) -> bool:
    try:
        return decode_key(_trusted_key_file().read_text(encoding="ascii")) == public
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def local_feed_dir() -> Path | None:
    """The directory ``UPDATE_FEED_URL`` names, or None when it is a URL."""
    url = str(settings.UPDATE_FEED_URL)
    if len(urlsplit(url).scheme) > 1:
        return None
    path = Path(url)
    return path.parent if path.name == FEED_FILE else path


def _published(feed_dir: Path, version: str, public: bytes, notes: str) -> bool:
    """Whether the feed lists ``version`` with a bundle signed by the demo key and ``notes``."""
    try:
        entries = parse_feed((feed_dir / FEED_FILE).read_bytes(), str(feed_dir))
    except (OSError, FeedError):
        return False
    for entry in entries:
        if entry.version == version:
            return entry.release_notes == notes and _bundle_ok(
                Path(entry.url), version, public, entry.size, notes
            )
    return False


def _bundle_ok(
    path: Path, version: str, public: bytes, size: int | None = None, notes: str | None = None
) -> bool:
    """Whether the bundle is signed by the demo key and is this version, size and notes.

    The release notes are part of the signed manifest, so notes changed in this module make the
    bundle outdated: it is rebuilt and signed again rather than left telling the old story.
    """
    try:
        manifest = read_manifest(path, [public])
    except (OSError, BundleError):
        return False
    return (
        manifest.version == version
        and (size is None or manifest.total_size == size)
        and (notes is None or manifest.release_notes == notes)
    )


def is_demo_appliance(root: Path | None = None) -> bool:
    """Whether the appliance is the demo one (its serial), so demo updates belong on it.

    A real appliance managed by this console must never get the demo vendor's key trusted.
    """
    try:
        serial = read_firmware_release(root).get("SERIAL")
    except ApplianceNotInitialized:
        return False
    return serial == demo.FIRMWARE_RELEASE["SERIAL"]


def demo_updates_missing(var_dir: Path, root: Path | None = None) -> list[str]:
    """What :func:`init_demo_updates` would still have to do (empty when all is in place).

    Only headers and signatures are checked, so this is quick enough to run on every start.
    """
    vendor_dir = _vendor_dir(var_dir)
    keypair = _load_keypair(vendor_dir)
    if keypair is None:
        return ["vendor key", "trusted key", "bundles", "license"]
    _private, public = keypair
    missing = []
    if not _is_trusted(public):
        missing.append("trusted key")
    feed_dir = local_feed_dir()
    for release in RELEASES:
        if feed_dir is not None:
            ready = _published(feed_dir, release.version, public, release.release_notes)
        else:
            path = vendor_dir / "bundles" / bundle_file_name(release.version)
            ready = _bundle_ok(path, release.version, public, notes=release.release_notes)
        if not ready:
            missing.append(f"bundle {release.version}")
    if not license_status(root).valid:
        missing.append("license")
    return missing


# --- Doing it -----------------------------------------------------------------------------


def _ensure_keypair(vendor_dir: Path) -> tuple[bytes, bytes]:
    keypair = _load_keypair(vendor_dir)
    if keypair is None:
        keypair = generate_keypair()
        private_text = base64.b64encode(keypair[0]).decode("ascii")
        atomic_write_text(vendor_dir / PRIVATE_KEY_FILE, private_text + "\n", 0o600)
    private, public = keypair
    pub_file = vendor_dir / PUBLIC_KEY_FILE
    text = public_key_b64(public) + "\n"
    if not pub_file.is_file() or pub_file.read_text(encoding="ascii") != text:
        atomic_write_text(pub_file, text, 0o644)
    return private, public


def _ensure_trusted(public: bytes) -> None:
    if not _is_trusted(public):
        path = _trusted_key_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, public_key_b64(public) + "\n", 0o644)


def _build(release: _Release, private: bytes, out: Path, work: Path, root: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="image-", dir=work) as temporary:
        tree = Path(temporary) / "system"
        tree.mkdir()
        _system_tree(tree, release, root)
        build_bundle(
            tree,
            out,
            private_key=private,
            version=release.version,
            min_version=release.min_version,
            msgstore_format=release.data_format,
            config_format=release.data_format,
            os_release=release.os_release,
            release_notes=release.release_notes,
        )


def init_demo_updates(
    var_dir: Path, root: Path | None = None, *, out: TextIO | None = None
) -> None:
    """Put the demo vendor key, feed and license in place, doing only what is missing.

    ``var_dir`` holds the demo vendor's key (never under the appliance root); the appliance at
    ``root`` (default: the configured one) must exist, since the license is bound to its serial.
    Notes (such as a feed that is a URL and so is not published to) go to ``out`` (stdout).
    """
    out = out or sys.stdout
    vendor_dir = _vendor_dir(var_dir)
    vendor_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(vendor_dir, 0o700)
    with exclusive_lock(vendor_dir / ".lock", 0o600):
        private, public = _ensure_keypair(vendor_dir)
        _ensure_trusted(public)

        feed_dir = local_feed_dir()
        if feed_dir is None:
            out.write(
                f"The update feed {settings.UPDATE_FEED_URL} is a URL, so the demo bundles were "
                f"not published; they are in {vendor_dir / 'bundles'}.\n"
            )
        for release in RELEASES:
            name = bundle_file_name(release.version)
            if feed_dir is not None:
                if _published(feed_dir, release.version, public, release.release_notes):
                    continue
                feed_dir.mkdir(parents=True, exist_ok=True)
                _build(release, private, feed_dir / name, vendor_dir, root)
                publish(feed_dir, feed_dir / name)
            else:
                path = vendor_dir / "bundles" / name
                if not _bundle_ok(path, release.version, public, notes=release.release_notes):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _build(release, private, path, vendor_dir, root)

        if not license_status(root).valid:
            serial = read_firmware_release(root).get("SERIAL", "")
            data = sign_license(
                private,
                customer=CUSTOMER,
                serial=serial,
                updates_until=_one_year_after(date.today()),
            )
            install_license(data, root, keys=[public])


def _one_year_after(day: date) -> date:
    try:
        return day.replace(year=day.year + 1)
    except ValueError:  # 29 February
        return day + timedelta(days=365)
