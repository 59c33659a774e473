"""Hostile and damaged firmware bundles: each is refused with the right error, nothing unpacked.

Bundles here are assembled by hand (header, manifest, signature, tar) so every field and every
tar member can be whatever an attacker likes, while still being signed by a trusted key when
the test is about what comes after the signature.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.firmware import bundle, bundleextract, signing
from appliance.firmware.bundle import (
    MAX_MANIFEST,
    MAX_PAYLOAD,
    BundleDigestMismatch,
    BundleError,
    BundleFormatError,
    BundleSignatureError,
    BundleTooLarge,
    BundleUnsafePath,
    read_manifest,
    verify_bundle,
)
from appliance.firmware.bundleextract import extract_payload
from appliance.firmware.signing import generate_keypair, key_id

PRIVATE, PUBLIC = generate_keypair()
UNTRUSTED_PRIVATE, UNTRUSTED_PUBLIC = generate_keypair()


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def good_payload() -> bytes:
    return tar_bytes(
        (member("VERSION"), b"2.8.1.0\n"),
        (member("bin", tarfile.DIRTYPE), None),
        (member("bin/mailsecd", mode=0o755), b"#!/bin/sh\n" + os.urandom(4000)),
        (member("lib", tarfile.DIRTYPE), None),
        (member("lib/libmailsec.so.2.8.1"), os.urandom(20_000)),
        (member("lib/libmailsec.so.2", tarfile.SYMTYPE, linkname="libmailsec.so.2.8.1"), None),
    )


def manifest_fields(payload: bytes, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "format": 1,
        "product": "lmi-firmware",
        "version": "2.8.1.0",
        "min_version": "2.8.0.0",
        "msgstore_format": "2.8.1",
        "config_format": "2.8.1",
        "os_release": "SUSE Linux Enterprise Server 11 (x86_64)",
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "release_notes": "notes",
        "key_id": key_id(PUBLIC),
        "created_at": "2013-10-04T09:15:00+00:00",
    }
    fields.update(overrides)
    return fields


def assemble(
    payload: bytes,
    *,
    private: bytes = PRIVATE,
    manifest: bytes | None = None,
    signature: bytes | None = None,
    magic: bytes = bundle.MAGIC,
    length: int | None = None,
    **overrides: Any,
) -> bytes:
    """A bundle of exactly these parts; the manifest is signed unless ``signature`` is given."""
    if manifest is None:
        manifest = signing.canonical_json(manifest_fields(payload, **overrides))
    if signature is None:
        signature = Ed25519PrivateKey.from_private_bytes(private).sign(manifest)
    size = len(manifest) if length is None else length
    return magic + struct.pack(">I", size) + manifest + signature + payload


@pytest.fixture
def write(tmp_path: Path):
    def write(data: bytes, name: str = "hostile.bundle") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def refused(path: Path, error: type[BundleError], match: str, tmp_path: Path) -> None:
    """Both verification and extraction refuse, with the error and message; nothing unpacked."""
    with pytest.raises(error, match=match) as caught:
        verify_bundle(path, [PUBLIC])
    assert str(caught.value).endswith(".") and str(caught.value)[0].isupper()
    target = tmp_path / "stage"
    with pytest.raises(error, match=match):
        extract_payload(path, target, [PUBLIC])
    assert not target.exists()


def test_a_hand_assembled_bundle_is_valid(write, tmp_path: Path) -> None:
    path = write(assemble(good_payload()))
    assert verify_bundle(path, [PUBLIC]).version == "2.8.1.0"
    extract_payload(path, tmp_path / "ok", [PUBLIC])
    assert (tmp_path / "ok" / "VERSION").read_bytes() == b"2.8.1.0\n"


# --- Header, signature, digest ------------------------------------------------------------


def test_it_rejects_a_tampered_manifest_byte(write, tmp_path: Path) -> None:
    data = bytearray(assemble(good_payload()))
    position = bytes(data).index(b'"notes"') + 1
    data[position] ^= 0x20  # "notes" → "Notes": still valid JSON, no longer what was signed
    refused(write(bytes(data)), BundleSignatureError, "does not match", tmp_path)


def test_it_rejects_a_tampered_payload_byte(write, tmp_path: Path) -> None:
    data = bytearray(assemble(good_payload()))
    data[-3000] ^= 0x01
    refused(write(bytes(data)), BundleDigestMismatch, "SHA-256", tmp_path)


def test_it_rejects_a_tampered_signature_byte(write, tmp_path: Path) -> None:
    data = bytearray(assemble(good_payload()))
    header = read_manifest(write(bytes(data)), [PUBLIC]).header_size
    data[header - 10] ^= 0x80
    refused(write(bytes(data)), BundleSignatureError, "does not match", tmp_path)


@pytest.mark.parametrize("where", ["magic", "length", "manifest", "signature", "payload"])
def test_it_rejects_a_truncated_file(write, tmp_path: Path, where: str) -> None:
    data = assemble(good_payload())
    length = struct.unpack(">I", data[8:12])[0]
    cut = {
        "magic": 5,
        "length": 10,
        "manifest": 12 + length // 2,
        "signature": 12 + length + 30,
        "payload": 12 + length + 64 + 700,
    }[where]
    refused(write(data[:cut]), BundleDigestMismatch, "incomplete", tmp_path)


def test_it_rejects_an_empty_file(write, tmp_path: Path) -> None:
    refused(write(b""), BundleDigestMismatch, "empty", tmp_path)


def test_it_rejects_trailing_bytes_after_the_payload(write, tmp_path: Path) -> None:
    refused(write(assemble(good_payload()) + b"\0" * 512), BundleDigestMismatch, "after", tmp_path)


def test_it_rejects_an_unsigned_bundle(write, tmp_path: Path) -> None:
    path = write(assemble(good_payload(), signature=b"\0" * 64))
    refused(path, BundleSignatureError, "not signed", tmp_path)


def test_it_rejects_a_bundle_signed_with_an_untrusted_key(write, tmp_path: Path) -> None:
    payload = good_payload()
    data = assemble(payload, private=UNTRUSTED_PRIVATE, key_id=key_id(UNTRUSTED_PUBLIC))
    refused(write(data), BundleSignatureError, "does not trust", tmp_path)


def test_an_untrusted_signature_claiming_a_trusted_key_id_does_not_match(
    write, tmp_path: Path
) -> None:
    data = assemble(good_payload(), private=UNTRUSTED_PRIVATE)  # key_id says PUBLIC
    refused(write(data), BundleSignatureError, "does not match", tmp_path)


def test_it_rejects_a_bundle_when_no_key_is_trusted(write) -> None:
    with pytest.raises(BundleSignatureError, match="trusts no signing keys"):
        verify_bundle(write(assemble(good_payload())), [])


def test_it_rejects_an_oversized_manifest_length(write, tmp_path: Path) -> None:
    data = assemble(good_payload(), length=MAX_MANIFEST + 1)
    refused(write(data), BundleTooLarge, "at most 65536 bytes", tmp_path)
    huge = bundle.MAGIC + b"\xff\xff\xff\xff" + b"x" * 100
    refused(write(huge), BundleTooLarge, "manifest", tmp_path)


def test_it_rejects_a_payload_size_above_the_limit(write, tmp_path: Path) -> None:
    data = assemble(good_payload(), payload_size=MAX_PAYLOAD + 512)
    refused(write(data), BundleTooLarge, "8 GiB", tmp_path)


def test_it_rejects_an_unknown_bundle_format(write, tmp_path: Path) -> None:
    data = assemble(good_payload(), magic=b"LMIFW\x00\x02\n")
    refused(write(data), BundleFormatError, "format 2", tmp_path)


def test_it_rejects_an_unknown_manifest_format_even_if_signed(write, tmp_path: Path) -> None:
    refused(write(assemble(good_payload(), format=2)), BundleFormatError, "format 2", tmp_path)


@pytest.mark.parametrize(
    "magic", [b"LMIFX\x00\x01\n", b"PK\x03\x04\x00\x01\x00\x00", b"LMIFW\x00\x01\r", b"\0" * 8]
)
def test_it_rejects_wrong_magic(write, tmp_path: Path, magic: bytes) -> None:
    refused(write(assemble(good_payload(), magic=magic)), BundleFormatError, "magic", tmp_path)


def test_it_rejects_a_plain_tar(write, tmp_path: Path) -> None:
    refused(write(good_payload()), BundleFormatError, "not an LMI firmware bundle", tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"version": "2.8.1.x"}, '"version"'),
        ({"version": 281}, '"version" must be a string'),
        ({"min_version": None}, '"min_version" must be a string'),
        ({"min_version": "2.9.0.0"}, "newer than the version"),
        ({"payload_size": "1024"}, '"payload_size" must be a number'),
        ({"payload_size": True}, '"payload_size" must be a number'),
        ({"payload_size": -512}, '"payload_size"'),
        ({"payload_sha256": "ABC"}, '"payload_sha256"'),
        ({"key_id": "zz"}, '"key_id"'),
        ({"created_at": "yesterday"}, '"created_at"'),
        ({"product": "other-firmware"}, "not for this product"),
        ({"os_release": "x" * 300}, '"os_release"'),
        ({"msgstore_format": "../2.8"}, '"msgstore_format"'),
        ({"surprise": 1}, 'unknown field "surprise"'),
    ],
)
def test_it_rejects_invalid_manifest_fields_naming_the_field(
    write, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    refused(write(assemble(good_payload(), **overrides)), BundleError, message, tmp_path)


def test_it_rejects_a_signed_manifest_missing_a_field(write, tmp_path: Path) -> None:
    payload = good_payload()
    fields = manifest_fields(payload)
    del fields["payload_sha256"]
    data = assemble(payload, manifest=signing.canonical_json(fields))
    refused(write(data), BundleFormatError, 'lacks the field "payload_sha256"', tmp_path)


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json at all",
        b'["a list"]',
        b"\xff\xfe",
        b"[" * 20000 + b"]" * 20000,
        b'{"format": 1}',  # not canonical (a space)
        b'{"format":1,"format":1}',
    ],
)
def test_it_rejects_a_signed_manifest_that_is_not_a_canonical_object(
    write, tmp_path: Path, manifest: bytes
) -> None:
    refused(write(assemble(good_payload(), manifest=manifest)), BundleFormatError, ".", tmp_path)


def test_it_rejects_a_key_id_other_than_the_signing_key(write, tmp_path: Path) -> None:
    data = assemble(good_payload(), key_id="0123456789abcdef")
    refused(write(data), BundleFormatError, "signed with key", tmp_path)


# --- Payload members ----------------------------------------------------------------------


def signed(write, payload: bytes) -> Path:
    return write(assemble(payload))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(member("../escape"), b"x")], "climbs|outside|\\.\\."),
        ([(member("bin/../../escape"), b"x")], '"\\.\\."'),
        ([(member("/abs"), b"x")], "absolute path"),
        ([(member("/etc/cron.d/evil"), b"x")], "absolute path"),
        ([(member("passwd", tarfile.SYMTYPE, linkname="/etc/passwd"), None)], "absolute path"),
        ([(member("x", tarfile.SYMTYPE, linkname="../../x"), None)], "outside the image"),
        ([(member("a/b", tarfile.SYMTYPE, linkname="../../x"), None)], "outside the image"),
        ([(member("hard", tarfile.LNKTYPE, linkname="VERSION"), None)], "hard link"),
        ([(member("hard", tarfile.LNKTYPE, linkname="/etc/shadow"), None)], "hard link"),
        ([(member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)], "device node"),
        ([(member("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None)], "device node"),
        ([(member("fifo", tarfile.FIFOTYPE), None)], "FIFO"),
        ([(member("sparse", tarfile.GNUTYPE_SPARSE), None)], "unsupported type"),
        ([(member("a"), b"1"), (member("a"), b"2")], "twice"),
        (
            [
                (member("lnk", tarfile.SYMTYPE, linkname="."), None),
                (member("lnk/x", tarfile.SYMTYPE, linkname="../escape"), None),
            ],
            "beneath",
        ),
        (
            [
                (member("self", tarfile.SYMTYPE, linkname="."), None),
                (member("l", tarfile.SYMTYPE, linkname="self/../escape"), None),
            ],
            "outside the image",
        ),
        ([(member("f"), b"file"), (member("f/x"), b"under a file")], "beneath"),
        (
            [(member("d/x"), b"x"), (member("d", tarfile.SYMTYPE, linkname="/tmp"), None)],
            "already has a directory",
        ),
        (
            [(member("d/x"), b"x"), (member("d", tarfile.SYMTYPE, linkname="e"), None)],
            "already has a directory",
        ),
        ([(member("empty", tarfile.SYMTYPE, linkname=""), None)], "invalid target"),
    ],
)
def test_it_rejects_unsafe_payload_members(
    write, tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], message: str
) -> None:
    path = signed(write, tar_bytes((member("VERSION"), b"2.8.1.0\n"), *members))
    refused(path, BundleUnsafePath, message, tmp_path)
    assert not (tmp_path / "escape").exists()


def directory_headers(count: int) -> bytes:
    """A tar of ``count`` directory entries (no data), built by patching one header's name."""
    template = bytearray(member("d000000", tarfile.DIRTYPE).tobuf(tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template) - sum(b"d000000")
    blocks = []
    for index in range(count):
        name = b"d%06d" % index
        block = bytearray(template)
        block[:7] = name
        block[148:156] = b"%06o\0 " % (base + sum(name))
        blocks.append(bytes(block))
    payload = b"".join(blocks) + b"\0" * 1024
    return payload + b"\0" * (-len(payload) % tarfile.RECORDSIZE)


def test_it_rejects_more_members_than_the_limit(
    write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle, "MAX_MEMBERS", 50)
    path = signed(write, directory_headers(50))
    verify_bundle(path, [PUBLIC])
    refused(signed(write, directory_headers(51)), BundleUnsafePath, "more than 50", tmp_path)


@pytest.mark.slow
def test_it_rejects_more_than_100000_members(write) -> None:
    # Directory entries have no data, so this stays a 51 MB payload.
    path = signed(write, directory_headers(bundle.MAX_MEMBERS + 1))
    with pytest.raises(BundleUnsafePath, match="more than 100,000 entries"):
        verify_bundle(path, [PUBLIC])


def test_the_unpacked_size_limit_is_enforced_per_member_total() -> None:
    checker = bundle.MemberChecker()
    checker.check(member("a", size=MAX_PAYLOAD - 10))
    with pytest.raises(BundleUnsafePath, match="more than 8 GiB"):
        checker.check(member("b", size=11))


def test_it_rejects_a_payload_that_is_not_a_tar(write, tmp_path: Path) -> None:
    payload = os.urandom(4096)
    refused(signed(write, payload), BundleFormatError, "not a valid tar", tmp_path)


def test_it_rejects_a_member_whose_data_runs_past_the_payload(write, tmp_path: Path) -> None:
    header = member("big", size=10_000_000).tobuf(tarfile.USTAR_FORMAT)
    payload = header + b"x" * 1536
    refused(signed(write, payload), BundleFormatError, "not a valid tar", tmp_path)


def test_it_rejects_data_hidden_after_the_end_of_the_archive(write, tmp_path: Path) -> None:
    visible = tar_bytes((member("VERSION"), b"2.8.1.0\n"))
    hidden = member("../escape").tobuf(tarfile.USTAR_FORMAT) + b"\0" * 512
    payload = visible[: 1024 + 512] + b"\0" * 1024 + hidden
    payload += b"\0" * (-len(payload) % 512)
    refused(signed(write, payload), BundleFormatError, "after the end", tmp_path)


def test_a_corrupt_header_inside_the_archive_is_refused(write, tmp_path: Path) -> None:
    payload = bytearray(good_payload())
    payload[1024 + 512 + 148] ^= 0x01  # the checksum of a later header
    refused(signed(write, bytes(payload)), BundleFormatError, ".", tmp_path)


# --- Extraction's own defences --------------------------------------------------------------


@pytest.fixture
def signed_past_the_walk(write, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """signed_past_the_walk(*members): a signed bundle of VERSION and ``members``, verification's
    walk over the members switched off: what is refused then is refused by extraction's own
    checks."""

    def build(*members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
        path = signed(write, tar_bytes((member("VERSION"), b"2.8.1.0\n"), *members))
        monkeypatch.setattr(bundleextract, "walk_members", lambda handle, manifest: 0)
        return path

    return build


def test_extraction_checks_members_itself_even_if_verification_was_skipped(
    signed_past_the_walk: Callable[..., Path], tmp_path: Path
) -> None:
    path = signed_past_the_walk(
        (member("out", tarfile.SYMTYPE, linkname=str(tmp_path)), None),
        (member("out/escape"), b"owned"),
    )
    target = tmp_path / "stage"
    with pytest.raises(BundleUnsafePath):
        extract_payload(path, target, [PUBLIC])
    assert not target.exists()
    assert not (tmp_path / "escape").exists()


def test_a_file_swapped_after_verification_is_caught_while_unpacking(
    write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = good_payload()
    good = assemble(payload)
    path = write(good)
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        library = tar.getmember("lib/libmailsec.so.2.8.1")
    swapped = bytearray(good)
    # Inside the library's data: still a valid tar, but not the verified one.
    swapped[len(good) - len(payload) + library.offset_data + 100] ^= 0xFF
    real_walk = bundleextract.walk_members

    def walk_then_swap(handle: Any, manifest: Any) -> int:
        count = real_walk(handle, manifest)
        with open(path, "r+b") as out:
            out.write(swapped)
        return count

    monkeypatch.setattr(bundleextract, "walk_members", walk_then_swap)
    target = tmp_path / "stage"
    with pytest.raises(BundleDigestMismatch, match="changed while"):
        extract_payload(path, target, [PUBLIC])
    assert not target.exists()


def test_a_failed_extraction_into_an_existing_empty_target_leaves_it_empty(
    signed_past_the_walk: Callable[..., Path], tmp_path: Path
) -> None:
    path = signed_past_the_walk(
        (member("bin", tarfile.DIRTYPE, mode=0o555), None),
        (member("bin/x"), b"x"),
        (member("../escape"), b"x"),
    )
    target = tmp_path / "stage"
    target.mkdir()
    with pytest.raises(BundleUnsafePath):
        extract_payload(path, target, [PUBLIC])
    assert target.is_dir() and not any(target.iterdir())


# --- Fuzzing ------------------------------------------------------------------------------


def test_random_byte_flips_are_always_refused(write, tmp_path: Path) -> None:
    """Every byte of a bundle is covered by a check: magic, length, signature, digest."""
    good = assemble(good_payload())
    rng = random.Random(2881)
    outcomes: dict[str, int] = {}
    for round_number in range(200):
        data = bytearray(good)
        for _ in range(rng.choice((1, 1, 1, 2, 8))):
            position = rng.randrange(len(data))
            data[position] ^= rng.randrange(1, 256)
        path = write(bytes(data), f"fuzz-{round_number}.bundle")
        try:
            verify_bundle(path, [PUBLIC])
        except BundleError as exc:
            assert str(exc)
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        else:  # only possible if the flips hit nothing that is checked
            pytest.fail(f"round {round_number}: a damaged bundle verified")
        path.unlink()
    assert sum(outcomes.values()) == 200
    assert {"BundleDigestMismatch", "BundleSignatureError"} <= set(outcomes)


def test_random_truncations_and_garbage_are_refused_without_unpacking(
    write, tmp_path: Path
) -> None:
    good = assemble(good_payload())
    rng = random.Random(2810)
    for round_number in range(60):
        if round_number % 2:
            data = good[: rng.randrange(len(good))]
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        path = write(data, f"junk-{round_number}.bundle")
        target = tmp_path / f"stage-{round_number}"
        with pytest.raises(BundleError):
            extract_payload(path, target, [PUBLIC])
        assert not target.exists()


def test_random_tar_member_names_never_escape(write, tmp_path: Path) -> None:
    """Signed payloads with random names and link targets: either refused or kept inside."""
    rng = random.Random(28)
    pieces = ["..", ".", "", "a", "b", "/", "etc", "..."]
    for round_number in range(80):
        members = []
        for index in range(rng.randrange(1, 5)):
            name = "/".join(rng.choice(pieces) for _ in range(rng.randrange(1, 4))) or "n"
            if rng.random() < 0.4:
                target_name = "/".join(rng.choice(pieces) for _ in range(rng.randrange(1, 4)))
                members.append(
                    (member(f"{name}{index}", tarfile.SYMTYPE, linkname=target_name), None)
                )
            else:
                members.append((member(f"{name}{index}"), b"data"))
        path = signed(write, tar_bytes(*members))
        sandbox = tmp_path / f"sandbox-{round_number}"
        target = sandbox / "stage"
        sandbox.mkdir()
        try:
            extract_payload(path, target, [PUBLIC])
        except BundleError:
            assert not target.exists()
        for dirpath, dirnames, filenames in os.walk(target):
            for entry in dirnames + filenames:
                resolved = Path(os.path.realpath(Path(dirpath, entry)))
                assert resolved.is_relative_to(target.resolve()) or not resolved.exists()
        assert sorted(p.name for p in sandbox.iterdir()) in ([], ["stage"])


def test_manifest_json_is_not_parsed_before_the_signature_holds(
    write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real_loads = json.loads

    def spy(data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(data)
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(json, "loads", spy)  # the manifest is parsed by appliance.system.safejson
    path = write(assemble(good_payload(), private=UNTRUSTED_PRIVATE))
    with pytest.raises(BundleSignatureError):
        read_manifest(path, [PUBLIC])
    assert calls == []
