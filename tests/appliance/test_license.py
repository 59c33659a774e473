"""Signed licenses: issue, verify, install for this appliance's serial, and report status."""

from __future__ import annotations

import base64
import json
from datetime import date, timedelta
from pathlib import Path

import pytest

from appliance.firmware.license import (
    MAX_LICENSE,
    License,
    LicenseError,
    install_license,
    license_status,
    parse_license,
    sign_license,
)
from appliance.firmware.signing import generate_keypair, key_id, public_key_b64
from appliance.system.paths import layout

PRIVATE, PUBLIC = generate_keypair()
OTHER_PRIVATE, OTHER_PUBLIC = generate_keypair()
SERIAL = "KQ7R2M4"  # the demo appliance's
UNTIL = date(2031, 3, 31)


def issue(private: bytes = PRIVATE, serial: str = SERIAL, until: date = UNTIL) -> bytes:
    return sign_license(private, customer="Example Corp", serial=serial, updates_until=until)


def test_a_signed_license_round_trips() -> None:
    license = parse_license(issue(), [PUBLIC])
    assert license == License(
        customer="Example Corp",
        serial=SERIAL,
        updates_until=UNTIL,
        issued_at=license.issued_at,
        key_id=key_id(PUBLIC),
    )
    document = json.loads(issue())
    assert set(document) == {"license", "signature"}
    assert len(base64.b64decode(document["signature"])) == 64


def test_reformatting_the_json_keeps_the_license_valid() -> None:
    document = json.loads(issue())
    reformatted = json.dumps(document, indent=None, sort_keys=False).encode()
    assert parse_license(reformatted, [PUBLIC]).serial == SERIAL


def test_it_rejects_a_tampered_license() -> None:
    document = json.loads(issue())
    document["license"]["updates_until"] = "2099-12-31"
    with pytest.raises(LicenseError, match="altered after it was issued"):
        parse_license(json.dumps(document).encode(), [PUBLIC])


def test_it_rejects_a_license_signed_with_an_untrusted_key() -> None:
    with pytest.raises(LicenseError, match="does not trust"):
        parse_license(issue(OTHER_PRIVATE), [PUBLIC])


def test_it_rejects_a_license_when_no_key_is_trusted(settings, tmp_path: Path) -> None:
    settings.TRUSTED_KEYS = []
    settings.TRUSTED_KEYS_DIR = tmp_path / "none"
    with pytest.raises(LicenseError, match="trusts no signing keys"):
        parse_license(issue())


def test_it_uses_the_trusted_keys_by_default(settings, tmp_path: Path) -> None:
    settings.TRUSTED_KEYS = [public_key_b64(OTHER_PUBLIC), public_key_b64(PUBLIC)]
    settings.TRUSTED_KEYS_DIR = tmp_path / "none"
    assert parse_license(issue()).customer == "Example Corp"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"x" * (MAX_LICENSE + 1), "at most 65536"),
        (b"not json", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[" * 50_000, "not valid JSON"),
        (b"[]", 'exactly "license" and "signature"'),
        (b'{"license": {}}', 'exactly "license" and "signature"'),
        (b'{"license": [], "signature": ""}', 'exactly "license" and "signature"'),
        (b'{"license": {}, "signature": "!!"}', "not valid base64"),
        (b'{"license": {}, "signature": "AAAA"}', "wrong length"),
    ],
)
def test_it_rejects_what_is_not_a_license(data: bytes, message: str) -> None:
    with pytest.raises(LicenseError, match=message):
        parse_license(data, [PUBLIC])


def test_it_rejects_a_license_that_names_a_field_twice() -> None:
    # The signature covers the last "serial" (what Python reads); another reader would take the
    # first, so a license must name each field once.
    data = issue().replace(b'"serial": ', b'"serial": "OTHER01", "serial": ', 1)
    assert json.loads(data)["license"]["serial"] == SERIAL

    with pytest.raises(LicenseError, match="not valid JSON"):
        parse_license(data, [PUBLIC])


def _signed_body(body: dict[str, object]) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.firmware.signing import canonical_json

    signature = Ed25519PrivateKey.from_private_bytes(PRIVATE).sign(canonical_json(body))
    return json.dumps({"license": body, "signature": base64.b64encode(signature).decode()}).encode()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"updates_until": "31.03.2031"}, '"updates_until" is not a date'),
        ({"updates_until": "2031-02-30"}, '"updates_until" is not a date'),
        ({"issued_at": "soon"}, '"issued_at"'),
        ({"serial": "../etc"}, "serial"),
        ({"customer": ""}, "customer"),
        ({"customer": 5}, '"customer" must be a string'),
        ({"key_id": "0000000000000000"}, "signed with key"),
        ({"extra": "x"}, 'unknown field "extra"'),
    ],
)
def test_it_rejects_invalid_fields_even_when_signed(
    change: dict[str, object], message: str
) -> None:
    body = json.loads(issue())["license"]
    body.update(change)
    with pytest.raises(LicenseError, match=message):
        parse_license(_signed_body(body), [PUBLIC])


def test_it_rejects_a_signed_license_lacking_a_field() -> None:
    body = json.loads(issue())["license"]
    del body["updates_until"]
    with pytest.raises(LicenseError, match='lacks the field "updates_until"'):
        parse_license(_signed_body(body), [PUBLIC])


def test_sign_license_refuses_bad_input() -> None:
    with pytest.raises(LicenseError):
        sign_license(PRIVATE, customer="", serial=SERIAL, updates_until=UNTIL)
    with pytest.raises(LicenseError):
        sign_license(PRIVATE, customer="A\nB", serial=SERIAL, updates_until=UNTIL)
    with pytest.raises(LicenseError):
        sign_license(PRIVATE, customer="A", serial="a b", updates_until=UNTIL)
    with pytest.raises(LicenseError):
        sign_license(PRIVATE, customer="A", serial=SERIAL, updates_until="2031-01-01")  # type: ignore[arg-type]


def test_install_writes_the_license_for_this_appliance(demo_appliance: Path) -> None:
    data = issue()
    license = install_license(data, keys=[PUBLIC])
    path = layout().license_file
    assert path == demo_appliance / "etc" / "mailsec" / "license.json"
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o644
    assert license.serial == SERIAL


def test_install_refuses_a_license_for_another_serial(demo_appliance: Path) -> None:
    with pytest.raises(LicenseError, match="issued for serial ZZ99999, this appliance is KQ7R2M4"):
        install_license(issue(serial="ZZ99999"), keys=[PUBLIC])
    assert not layout().license_file.exists()


def test_install_refuses_a_tampered_license_and_keeps_the_old_one(demo_appliance: Path) -> None:
    install_license(issue(), keys=[PUBLIC])
    before = layout().license_file.read_bytes()
    document = json.loads(issue(until=date(2040, 1, 1)))
    document["license"]["customer"] = "Mallory"
    with pytest.raises(LicenseError):
        install_license(json.dumps(document).encode(), keys=[PUBLIC])
    assert layout().license_file.read_bytes() == before


def test_status_without_a_license_is_not_valid(demo_appliance: Path) -> None:
    status = license_status(keys=[PUBLIC])
    assert status == type(status)(None, False, False, "No license is installed.")


def test_status_of_an_entitled_license(demo_appliance: Path) -> None:
    install_license(issue(), keys=[PUBLIC])
    status = license_status(keys=[PUBLIC], today=UNTIL)
    assert status.valid and status.entitled
    assert status.license is not None and status.license.customer == "Example Corp"
    assert "2031-03-31" in status.reason


def test_status_of_an_expired_entitlement_is_valid_but_not_entitled(demo_appliance: Path) -> None:
    install_license(issue(), keys=[PUBLIC])
    status = license_status(keys=[PUBLIC], today=UNTIL + timedelta(days=1))
    assert status.valid
    assert not status.entitled
    assert "update entitlement ended on 2031-03-31" in status.reason


def test_status_of_a_tampered_file_on_disk_is_not_valid(demo_appliance: Path) -> None:
    install_license(issue(), keys=[PUBLIC])
    path = layout().license_file
    path.write_bytes(path.read_bytes().replace(b"2031-03-31", b"2099-03-31"))
    status = license_status(keys=[PUBLIC])
    assert not status.valid and not status.entitled
    assert status.license is None
    assert "altered" in status.reason


def test_status_of_a_license_copied_from_another_appliance_is_not_valid(
    demo_appliance: Path,
) -> None:
    path = layout().license_file
    path.write_bytes(issue(serial="ZZ99999"))
    status = license_status(keys=[PUBLIC])
    assert not status.valid
    assert "issued for serial ZZ99999, this appliance is KQ7R2M4" in status.reason


def test_status_when_the_signing_key_is_no_longer_trusted(demo_appliance: Path) -> None:
    install_license(issue(), keys=[PUBLIC])
    status = license_status(keys=[OTHER_PUBLIC])
    assert not status.valid
    assert "does not trust" in status.reason


def test_status_of_a_garbage_file_is_not_valid(demo_appliance: Path) -> None:
    layout().license_file.write_bytes(b"\0" * (MAX_LICENSE + 10))
    status = license_status(keys=[PUBLIC])
    assert not status.valid and "more than 65536 bytes" in status.reason
