"""`manage.py firmware_vendor ...`: the vendor's side of firmware updates.

    firmware_vendor keygen --out DIR
    firmware_vendor build --source DIR --version V --min-version V --key FILE --out FILE
                          [--notes TEXT] [--msgstore-format F] [--config-format F]
                          [--os-release TEXT]
    firmware_vendor publish --feed DIR BUNDLE
    firmware_vendor license --key FILE --customer C --serial S --until YYYY-MM-DD --out FILE

Nothing here touches the appliance: it makes keys, signed bundles, feeds and licenses that an
appliance (this console) then downloads and verifies against its trusted keys.
"""

from __future__ import annotations

import base64
import os
from datetime import date
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from appliance.firmware.bundle import version_tuple
from appliance.firmware.bundlebuild import build_bundle
from appliance.firmware.feed import publish
from appliance.firmware.license import sign_license
from appliance.firmware.signing import generate_keypair, key_id, public_key_b64, read_key_file
from appliance.system.atomic import atomic_write_bytes, atomic_write_text
from appliance.system.errors import ApplianceError

DEFAULT_OS_RELEASE = "SUSE Linux Enterprise Server 11 (x86_64)"


def _data_format(version: str) -> str:
    """The message store / configuration format a firmware version uses: ``2.8.1.0`` → ``2.8.1``."""
    return ".".join(version.split(".")[:3])


class Command(BaseCommand):
    help = "Vendor tools: make a signing key, build and publish signed firmware, issue licenses."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

        keygen = actions.add_parser("keygen", help="make an Ed25519 signing key pair")
        keygen.add_argument("--out", required=True, type=Path, help="directory for the keys")

        build = actions.add_parser("build", help="build and sign a firmware bundle")
        build.add_argument("--source", required=True, type=Path, help="system image tree")
        build.add_argument("--version", required=True, dest="firmware_version")
        build.add_argument("--min-version", required=True)
        build.add_argument("--key", required=True, type=Path, help="vendor.key")
        build.add_argument("--out", required=True, type=Path, help="bundle file to write")
        build.add_argument("--notes", default="", help="release notes")
        build.add_argument("--msgstore-format", help="default: the version's first 3 numbers")
        build.add_argument("--config-format", help="default: the version's first 3 numbers")
        build.add_argument("--os-release", default=DEFAULT_OS_RELEASE)

        feed = actions.add_parser("publish", help="add a bundle to a feed directory")
        feed.add_argument("--feed", required=True, type=Path, help="feed directory")
        feed.add_argument("bundle", type=Path)

        license = actions.add_parser("license", help="issue a signed license file")
        license.add_argument("--key", required=True, type=Path, help="vendor.key")
        license.add_argument("--customer", required=True)
        license.add_argument("--serial", required=True)
        license.add_argument("--until", required=True, help="last day of updates, YYYY-MM-DD")
        license.add_argument("--out", required=True, type=Path)

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        try:
            getattr(self, f"_{action}")(options)
        except (ApplianceError, ValueError, OSError) as exc:
            raise CommandError(str(exc)) from exc

    def _keygen(self, options: dict[str, Any]) -> None:
        directory: Path = options["out"]
        private_file = directory / "vendor.key"
        if private_file.exists():
            raise CommandError(f"{private_file} exists; refusing to replace a signing key.")
        directory.mkdir(parents=True, exist_ok=True)
        private, public = generate_keypair()
        atomic_write_text(private_file, base64.b64encode(private).decode("ascii") + "\n", 0o600)
        atomic_write_text(directory / "vendor.pub", public_key_b64(public) + "\n", 0o644)
        self.stdout.write(
            f"Wrote {private_file} (keep it secret) and {directory / 'vendor.pub'}.\n"
            f"Key id {key_id(public)}. Appliances trust it once vendor.pub is in their "
            f"TRUSTED_KEYS_DIR or LMI_TRUSTED_KEYS holds {public_key_b64(public)}"
        )

    def _private_key(self, path: Path) -> bytes:
        private = read_key_file(path)
        if os.stat(path).st_mode & 0o077:
            self.stderr.write(f"Warning: {path} is readable by other users; chmod 600 it.")
        return private

    def _build(self, options: dict[str, Any]) -> None:
        version: str = options["firmware_version"]
        for name, value in (("--version", version), ("--min-version", options["min_version"])):
            try:
                version_tuple(value)
            except ValueError as exc:
                raise CommandError(f"{name}: {exc}") from exc
        manifest = build_bundle(
            options["source"],
            options["out"],
            private_key=self._private_key(options["key"]),
            version=version,
            min_version=options["min_version"],
            msgstore_format=options["msgstore_format"] or _data_format(version),
            config_format=options["config_format"] or _data_format(version),
            os_release=options["os_release"],
            release_notes=options["notes"],
        )
        self.stdout.write(
            f"Built {options['out']}: firmware {manifest.version} (from {manifest.min_version}), "
            f"{manifest.total_size} bytes, signed with key {manifest.key_id}."
        )

    def _publish(self, options: dict[str, Any]) -> None:
        entry = publish(options["feed"], options["bundle"])
        self.stdout.write(
            f"Published firmware {entry.version} in {options['feed']} as {entry.url} "
            f"({entry.size} bytes, sha256 {entry.sha256})."
        )

    def _license(self, options: dict[str, Any]) -> None:
        try:
            until = date.fromisoformat(options["until"])
        except ValueError as exc:
            raise CommandError(f"--until must be a date (YYYY-MM-DD): {exc}") from exc
        data = sign_license(
            self._private_key(options["key"]),
            customer=options["customer"],
            serial=options["serial"],
            updates_until=until,
        )
        atomic_write_bytes(options["out"], data, 0o644)
        self.stdout.write(
            f"Wrote {options['out']}: license for {options['customer']}, serial "
            f"{options['serial']}, updates until {until.isoformat()}."
        )
