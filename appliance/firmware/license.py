"""The signed license: who the appliance belongs to and until when firmware updates are included.

A license file is JSON::

    {"license": {"customer": "...", "serial": "...", "updates_until": "YYYY-MM-DD",
                 "issued_at": "ISO 8601", "key_id": "..."},
     "signature": "<base64 Ed25519 signature over the canonical JSON of the license object>"}

It is signed with the same vendor keys as firmware bundles and checked against the keys this
console trusts before any field is used. It lives at ``etc/mailsec/license.json`` and is bound to
the appliance's serial number (``SERIAL`` in ``etc/firmware-release``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.firmware.signing import (
    canonical_json,
    key_id,
    public_key_of,
    signing_key_for,
    trusted_keys,
)
from appliance.firmware.vendorjson import load_vendor_json
from appliance.system.atomic import atomic_write_bytes
from appliance.system.errors import ApplianceError, ApplianceNotInitialized
from appliance.system.facts import read_firmware_release
from appliance.system.paths import layout
from appliance.system.safejson import check_field_names

MAX_LICENSE = 64 * 1024
_FIELDS = ("customer", "serial", "updates_until", "issued_at", "key_id")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LicenseError(ApplianceError):
    """A license cannot be used; the message says why in an administrator's words."""


@dataclass(frozen=True)
class License:
    """A verified license."""

    customer: str
    serial: str
    updates_until: date
    issued_at: str
    key_id: str


@dataclass(frozen=True)
class LicenseStatus:
    """What Updates & Licensing shows: the license, whether it holds, whether updates are due.

    ``valid`` means a license signed by a trusted key for this appliance is installed;
    ``entitled`` means it also still includes firmware updates today.
    """

    license: License | None
    valid: bool
    entitled: bool
    reason: str


def _check_customer(customer: str) -> None:
    if not isinstance(customer, str) or not customer.strip() or len(customer) > 200:
        raise LicenseError("The license's customer must be a name of 1 to 200 characters.")
    if _CONTROL.search(customer):
        raise LicenseError("The license's customer name must be a single line.")


def _check_serial(serial: str) -> None:
    if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
        raise LicenseError(
            "The license's serial must be an appliance serial number such as KQ7R2M4."
        )


def sign_license(private_key: bytes, *, customer: str, serial: str, updates_until: date) -> bytes:
    """Vendor side: issue a license file (JSON bytes) signed with ``private_key``."""
    _check_customer(customer)
    _check_serial(serial)
    if not isinstance(updates_until, date) or isinstance(updates_until, datetime):
        raise LicenseError("updates_until must be a date.")
    body = {
        "customer": customer,
        "serial": serial,
        "updates_until": updates_until.isoformat(),
        "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "key_id": key_id(public_key_of(private_key)),
    }
    signature = Ed25519PrivateKey.from_private_bytes(private_key).sign(canonical_json(body))
    document = {"license": body, "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _load(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The license object and its signature, structure checked, nothing trusted yet."""
    document = load_vendor_json(
        data,
        MAX_LICENSE,
        LicenseError,
        not_bytes="A license file must be given as bytes.",
        too_large="This file has {size} bytes; a license file has at most {limit}.",
        not_json="This file is not a license: it is not valid JSON.",
    )
    if (
        not isinstance(document, dict)
        or set(document) != {"license", "signature"}
        or not isinstance(document["license"], dict)
        or not isinstance(document["signature"], str)
    ):
        raise LicenseError(
            'This file is not a license: it must hold exactly "license" and "signature".'
        )
    try:
        signature = base64.b64decode(document["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise LicenseError("The license's signature is not valid base64.") from None
    if len(signature) != 64:
        raise LicenseError("The license's signature has the wrong length; it is not signed.")
    return document["license"], signature


def parse_license(data: bytes, keys: list[bytes] | None = None) -> License:
    """Verify a license file against ``keys`` (default: the trusted keys) and return it.

    The signature over the canonical JSON of the license object is checked before any of its
    fields is used. Raises :class:`LicenseError` with a message for the administrator.
    """
    body, signature = _load(data)
    if keys is None:
        keys = trusted_keys()
    if not keys:
        raise LicenseError(
            "This console trusts no signing keys, so it cannot verify the license: add the "
            "vendor's public key to LMI_TRUSTED_KEYS or TRUSTED_KEYS_DIR."
        )
    signer = signing_key_for(canonical_json(body), signature, keys)
    if signer is None:
        # Already refused; the unauthenticated key id only chooses the wording.
        claimed = body.get("key_id")
        if isinstance(claimed, str) and claimed not in {key_id(key) for key in keys}:
            raise LicenseError(
                f"The license is signed by a key this console does not trust "
                f"(key id {claimed[:16]})."
            )
        raise LicenseError(
            "The license's signature does not match its contents: the file was altered after "
            "it was issued."
        )
    return _license_from_fields(body, key_id(signer))


def _license_from_fields(body: dict[str, Any], signer_id: str) -> License:
    check_field_names(body, _FIELDS, "The license", LicenseError)
    for name in _FIELDS:
        if not isinstance(body[name], str):
            raise LicenseError(f'The license field "{name}" must be a string.')
    _check_customer(body["customer"])
    _check_serial(body["serial"])
    try:
        if not _DATE.fullmatch(body["updates_until"]):
            raise ValueError
        updates_until = date.fromisoformat(body["updates_until"])
    except ValueError:
        raise LicenseError(
            'The license field "updates_until" is not a date (YYYY-MM-DD).'
        ) from None
    try:
        datetime.fromisoformat(body["issued_at"])
    except ValueError:
        raise LicenseError('The license field "issued_at" is not an ISO 8601 time.') from None
    if not _KEY_ID.fullmatch(body["key_id"]) or body["key_id"] != signer_id:
        raise LicenseError(
            f'The license names signing key "{body["key_id"][:16]}" but was signed with key '
            f"{signer_id}."
        )
    return License(
        customer=body["customer"],
        serial=body["serial"],
        updates_until=updates_until,
        issued_at=body["issued_at"],
        key_id=body["key_id"],
    )


def _appliance_serial(root: Path | None) -> str:
    serial = read_firmware_release(root).get("SERIAL", "")
    if not serial:
        raise LicenseError("This appliance has no serial number in etc/firmware-release.")
    return serial


def _check_bound(license: License, serial: str) -> None:
    if license.serial != serial:
        raise LicenseError(
            f"This license was issued for serial {license.serial}, this appliance is {serial}."
        )


def install_license(
    data: bytes, root: Path | None = None, keys: list[bytes] | None = None
) -> License:
    """Verify a license for this appliance and install it (atomically) as ``license.json``."""
    license = parse_license(data, keys)
    _check_bound(license, _appliance_serial(root))
    path = layout(root).license_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, bytes(data), 0o644)
    return license


def license_status(
    root: Path | None = None, keys: list[bytes] | None = None, today: date | None = None
) -> LicenseStatus:
    """The installed license and whether it holds today; never raises for a bad license file."""
    path = layout(root).license_file
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LICENSE + 1)
    except FileNotFoundError:
        return LicenseStatus(None, False, False, "No license is installed.")
    except OSError as exc:
        return LicenseStatus(None, False, False, f"The license file cannot be read: {exc}.")
    if len(data) > MAX_LICENSE:
        return LicenseStatus(
            None,
            False,
            False,
            f"The installed license is not valid: the file has more than {MAX_LICENSE} bytes.",
        )
    try:
        license = parse_license(data, keys)
    except LicenseError as exc:
        return LicenseStatus(None, False, False, f"The installed license is not valid: {exc}")
    try:
        _check_bound(license, _appliance_serial(root))
    except (LicenseError, ApplianceNotInitialized) as exc:
        return LicenseStatus(license, False, False, f"The installed license is not valid: {exc}")
    today = today or date.today()
    if today > license.updates_until:
        return LicenseStatus(
            license,
            True,
            False,
            f"The update entitlement ended on {license.updates_until.isoformat()}.",
        )
    return LicenseStatus(
        license,
        True,
        True,
        f"Licensed to {license.customer}; firmware updates are included until "
        f"{license.updates_until.isoformat()}.",
    )
