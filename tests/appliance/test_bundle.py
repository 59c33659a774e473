"""Signed firmware bundles: build, verify, extract; keys and versions.

Hostile and damaged bundles are in test_bundle_hostile.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.firmware import bundlebuild, signing
from appliance.firmware.bundle import (
    BundleDigestMismatch,
    BundleError,
    BundleManifest,
    BundleSignatureError,
    BundleUnsafePath,
    PayloadDigest,
    read_manifest,
    verify_bundle,
    version_tuple,
)
from appliance.firmware.bundlebuild import build_bundle
from appliance.firmware.bundleextract import extract_payload
from appliance.firmware.signing import generate_keypair, key_id, public_key_b64, trusted_keys

KEYS = generate_keypair()
PRIVATE, PUBLIC = KEYS


def make_tree(base: Path) -> Path:
    """A small system image: files of several modes, nested directories, relative symlinks."""
    tree = base / "image"
    files = {
        "VERSION": (b"2.8.1.0\n", 0o644),
        "etc/firmware-release": (b"FIRMWARE_VERSION=2.8.1.0\n", 0o644),
        "etc/SuSE-release": (b"SUSE Linux Enterprise Server 11 (x86_64)\n", 0o644),
        "etc/mailsec/secret.conf": (b"password=demo\n", 0o600),
        "bin/mailsecd": (b"#!/bin/sh\nexec true\n", 0o755),
        "lib/libmailsec.so.2.8.1": (os.urandom(300_000), 0o755),
        "share/empty": (b"", 0o644),
        "share/dir with spaces/ünïcode-name.txt": ("grüße\n".encode(), 0o644),
    }
    for name, (content, mode) in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    (tree / "var" / "empty-dir").mkdir(parents=True)
    (tree / "long" / ("d" * 120) / ("e" * 120)).mkdir(parents=True)
    (tree / "long" / ("d" * 120) / ("e" * 120) / "f.txt").write_bytes(b"deep\n")
    os.symlink("libmailsec.so.2.8.1", tree / "lib" / "libmailsec.so.2")
    os.symlink("../lib/libmailsec.so.2.8.1", tree / "bin" / "libmailsec")
    os.symlink("../etc", tree / "share" / "etc-link")
    return tree


def build(tree: Path, out: Path, private: bytes = PRIVATE, **overrides: str) -> BundleManifest:
    options = {
        "version": "2.8.1.0",
        "min_version": "2.8.0.0",
        "msgstore_format": "2.8.1",
        "config_format": "2.8.1",
        "os_release": "SUSE Linux Enterprise Server 11 (x86_64)",
        "release_notes": "Upgrades the operating system to SUSE Linux Enterprise Server 11.",
    }
    options.update(overrides)
    return build_bundle(tree, out, private_key=private, **options)


def snapshot(tree: Path) -> dict[str, tuple[str, object]]:
    """Every entry of a tree: kind, and content + mode (files) or target (links)."""
    result: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            relative = path.relative_to(tree).as_posix()
            if path.is_symlink():
                result[relative] = ("link", os.readlink(path))
            elif path.is_dir():
                result[relative] = ("dir", stat.S_IMODE(path.stat().st_mode))
            else:
                result[relative] = (
                    "file",
                    (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)),
                )
    return result


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


@pytest.fixture
def built(tree: Path, tmp_path: Path) -> Path:
    out = tmp_path / "lmi-firmware-2.8.1.0.bundle"
    build(tree, out)
    return out


def test_a_built_bundle_verifies_with_the_signing_key(built: Path) -> None:
    manifest = verify_bundle(built, [PUBLIC])
    assert manifest.version == "2.8.1.0"
    assert manifest.min_version == "2.8.0.0"
    assert manifest.msgstore_format == manifest.config_format == "2.8.1"
    assert manifest.os_release == "SUSE Linux Enterprise Server 11 (x86_64)"
    assert manifest.key_id == key_id(PUBLIC)
    assert manifest.total_size == built.stat().st_size
    payload = built.read_bytes()[manifest.header_size :]
    assert len(payload) == manifest.payload_size
    assert hashlib.sha256(payload).hexdigest() == manifest.payload_sha256


def test_the_file_layout_is_magic_length_canonical_manifest_signature_payload(
    built: Path,
) -> None:
    data = built.read_bytes()
    assert data[:8] == b"LMIFW\x00\x01\n"
    length = int.from_bytes(data[8:12], "big")
    manifest = data[12 : 12 + length]
    assert manifest == signing.canonical_json(json.loads(manifest))
    signature = data[12 + length : 12 + length + 64]
    Ed25519PublicKey.from_public_bytes(PUBLIC).verify(signature, manifest)
    assert tarfile.is_tarfile(io.BytesIO(data[12 + length + 64 :]))


def test_read_manifest_reads_only_the_header(built: Path) -> None:
    manifest = read_manifest(built, [PUBLIC])
    assert manifest.header_size < 2048
    assert manifest == verify_bundle(built, [PUBLIC])


@pytest.mark.parametrize("block", [1, 7, 12, 13, 4096, 1 << 20])
def test_a_payload_digest_fed_while_writing_covers_the_payload_in_any_block_size(
    built: Path, block: int
) -> None:
    """The one-pass download: the payload hashed on its way to disk, from byte 0, in the
    download's blocks (which straddle the header's end anywhere), replaces verify_bundle's pass.
    """
    data = built.read_bytes()
    digest = PayloadDigest()
    for start in range(0, len(data), block):
        digest.update(data[start : start + block])
    manifest = read_manifest(built, [PUBLIC])
    assert digest.covers(manifest)
    calls: list[tuple[int, int]] = []
    assert verify_bundle(built, [PUBLIC], progress=lambda *a: calls.append(a), payload=digest)
    assert calls == [(manifest.payload_size, manifest.payload_size)]  # no second pass


def test_a_payload_digest_that_saw_other_bytes_is_refused_and_one_short_is_not_used(
    built: Path,
) -> None:
    data = built.read_bytes()
    manifest = read_manifest(built, [PUBLIC])
    altered = bytearray(data)
    altered[-600] ^= 0xFF  # what was written differs from what the signature covers
    digest = PayloadDigest()
    digest.update(bytes(altered))
    with pytest.raises(BundleDigestMismatch, match="signed manifest"):
        verify_bundle(built, [PUBLIC], payload=digest)
    short = PayloadDigest()
    short.update(data[:-1])  # not every payload byte: verify_bundle hashes the file itself
    assert not short.covers(manifest)
    calls: list[tuple[int, int]] = []
    verify_bundle(built, [PUBLIC], progress=lambda *a: calls.append(a), payload=short)
    assert calls[0] == (0, manifest.payload_size)


def test_a_partial_download_passes_read_manifest_only_with_partial(
    built: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(built, [PUBLIC])
    part = tmp_path / "download.part"
    part.write_bytes(built.read_bytes()[: manifest.header_size + 1000])
    assert read_manifest(part, [PUBLIC], partial=True) == manifest
    with pytest.raises(BundleDigestMismatch, match="incomplete"):
        read_manifest(part, [PUBLIC])
    with pytest.raises(BundleDigestMismatch, match="incomplete"):
        verify_bundle(part, [PUBLIC])


def test_a_partial_download_without_the_whole_header_is_not_yet_readable(
    built: Path, tmp_path: Path
) -> None:
    part = tmp_path / "download.part"
    part.write_bytes(built.read_bytes()[:100])
    with pytest.raises(BundleDigestMismatch):
        read_manifest(part, [PUBLIC], partial=True)


def test_the_same_tree_gives_the_same_payload(tree: Path, tmp_path: Path) -> None:
    first = build(tree, tmp_path / "a.bundle")
    os.utime(tree / "VERSION", (1, 1))  # mtimes do not matter: the tar's are fixed
    second = build(tree, tmp_path / "b.bundle")
    assert first.payload_sha256 == second.payload_sha256
    assert first.payload_size == second.payload_size


def test_the_tar_is_sorted_with_fixed_owner_and_time(built: Path) -> None:
    manifest = read_manifest(built, [PUBLIC])
    with open(built, "rb") as handle:
        handle.seek(manifest.header_size)
        with tarfile.open(fileobj=handle, mode="r|") as tar:
            members = list(tar)
    names = [member.name for member in members]
    assert names == sorted(names)
    assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, bundlebuild.TAR_MTIME)}
    assert "lib/libmailsec.so.2" in names


def test_progress_is_reported_up_to_the_payload_size(tmp_path: Path) -> None:
    tree = tmp_path / "image"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(10 * 1024 * 1024))
    out = tmp_path / "big.bundle"
    build(tree, out)
    calls: list[tuple[int, int]] = []
    manifest = verify_bundle(
        out, [PUBLIC], progress=lambda done, total: calls.append((done, total))
    )
    assert calls[0] == (0, manifest.payload_size)
    assert calls[-1] == (manifest.payload_size, manifest.payload_size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) >= 3


def test_extract_reproduces_the_source_tree_exactly(
    tree: Path, built: Path, tmp_path: Path
) -> None:
    target = tmp_path / "rescue" / "system"
    manifest = extract_payload(built, target, [PUBLIC])
    assert manifest.version == "2.8.1.0"
    assert snapshot(target) == snapshot(tree)


def test_extract_accepts_an_empty_target(built: Path, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    extract_payload(built, target, [PUBLIC])
    assert (target / "VERSION").read_bytes() == b"2.8.1.0\n"


def test_extract_refuses_a_non_empty_target(built: Path, tmp_path: Path) -> None:
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "keep.txt").write_text("old system")
    with pytest.raises(BundleError, match="not empty"):
        extract_payload(built, target, [PUBLIC])
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_extract_refuses_a_file_or_symlink_as_target(built: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        extract_payload(built, tmp_path / "file", [PUBLIC])
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    with pytest.raises(BundleError, match="not a directory"):
        extract_payload(built, tmp_path / "link", [PUBLIC])


def test_extract_verifies_first_and_leaves_no_target_for_an_untrusted_bundle(
    built: Path, tmp_path: Path
) -> None:
    _other_private, other_public = generate_keypair()
    target = tmp_path / "stage"
    with pytest.raises(BundleSignatureError):
        extract_payload(built, target, [other_public])
    assert not target.exists()


def test_build_refuses_a_symlink_leaving_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "image"
    tree.mkdir()
    os.symlink("/etc/passwd", tree / "passwd")
    with pytest.raises(BundleUnsafePath, match="absolute"):
        build(tree, tmp_path / "out.bundle")
    assert not (tmp_path / "out.bundle").exists()
    assert not list(tmp_path.glob(".out.bundle.*"))


def test_build_refuses_a_fifo(tmp_path: Path) -> None:
    tree = tmp_path / "image"
    tree.mkdir()
    os.mkfifo(tree / "pipe")
    with pytest.raises(BundleUnsafePath, match="FIFO"):
        build(tree, tmp_path / "out.bundle")


def test_build_stores_hard_linked_files_as_separate_files(tmp_path: Path) -> None:
    tree = tmp_path / "image"
    tree.mkdir()
    (tree / "a").write_bytes(b"same inode")
    os.link(tree / "a", tree / "b")
    out = tmp_path / "out.bundle"
    build(tree, out)
    target = tmp_path / "x"
    extract_payload(out, target, [PUBLIC])
    assert (target / "b").read_bytes() == b"same inode"
    assert (target / "a").stat().st_ino != (target / "b").stat().st_ino


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", "2.8.x", '"version"'),
        ("min_version", "2.9.0.0", "newer than the version"),
        ("msgstore_format", "", '"msgstore_format"'),
        ("os_release", "two\nlines", '"os_release"'),
    ],
)
def test_build_refuses_invalid_manifest_fields(
    tree: Path, tmp_path: Path, field: str, value: str, message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        build(tree, tmp_path / "out.bundle", **{field: value})
    assert not (tmp_path / "out.bundle").exists()


def test_version_tuple_compares_firmware_levels() -> None:
    assert version_tuple("2.8.1.0") == (2, 8, 1, 0)
    assert version_tuple("2.8.1.0") > version_tuple("2.8.0.0")
    assert version_tuple("2.10.0.0") > version_tuple("2.9.9.9")
    assert version_tuple("3") == (3,)


@pytest.mark.parametrize(
    "junk", ["", "2.8.1.x", "2..8", ".2.8", "2.8.", "v2.8", "2.08.1", "-1.0", " 2.8", "2.8\n", 2.8]
)
def test_version_tuple_refuses_junk(junk: object) -> None:
    with pytest.raises(ValueError):
        version_tuple(junk)  # type: ignore[arg-type]


def test_key_id_and_base64_of_a_public_key() -> None:
    assert key_id(PUBLIC) == hashlib.sha256(PUBLIC).hexdigest()[:16]
    assert base64.b64decode(public_key_b64(PUBLIC)) == PUBLIC
    private, public = generate_keypair()
    assert len(private) == len(public) == 32
    assert signing.public_key_of(private) == public


def test_trusted_keys_come_from_settings_and_pub_files(settings, tmp_path: Path) -> None:
    first, second, third = (generate_keypair()[1] for _ in range(3))
    settings.TRUSTED_KEYS = [public_key_b64(first)]
    settings.TRUSTED_KEYS_DIR = tmp_path / "keys"
    settings.TRUSTED_KEYS_DIR.mkdir()
    (settings.TRUSTED_KEYS_DIR / "b.pub").write_text(public_key_b64(second) + "\n")
    (settings.TRUSTED_KEYS_DIR / "c.pub").write_text(public_key_b64(third))
    (settings.TRUSTED_KEYS_DIR / "ignored.txt").write_text(public_key_b64(PUBLIC))
    (settings.TRUSTED_KEYS_DIR / "dup.pub").write_text(public_key_b64(first))
    assert sorted(trusted_keys()) == sorted([first, second, third])


def test_bad_trusted_keys_are_skipped_with_a_warning(
    settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings.TRUSTED_KEYS = [
        "not base64!",
        base64.b64encode(b"short").decode(),
        public_key_b64(PUBLIC),
    ]
    settings.TRUSTED_KEYS_DIR = tmp_path / "keys"
    settings.TRUSTED_KEYS_DIR.mkdir()
    (settings.TRUSTED_KEYS_DIR / "broken.pub").write_text("garbage")
    with caplog.at_level(logging.WARNING, logger="appliance.firmware.signing"):
        assert trusted_keys() == [PUBLIC]
    assert len(caplog.records) == 3


def test_a_missing_trusted_keys_dir_means_no_file_keys(settings, tmp_path: Path) -> None:
    settings.TRUSTED_KEYS = []
    settings.TRUSTED_KEYS_DIR = tmp_path / "absent"
    assert trusted_keys() == []


def test_verify_uses_the_trusted_keys_by_default(settings, built: Path, tmp_path: Path) -> None:
    settings.TRUSTED_KEYS = []
    settings.TRUSTED_KEYS_DIR = tmp_path / "keys"
    with pytest.raises(BundleSignatureError, match="trusts no signing keys"):
        verify_bundle(built)
    settings.TRUSTED_KEYS = [public_key_b64(PUBLIC)]
    assert verify_bundle(built).version == "2.8.1.0"


def test_verify_accepts_any_of_several_trusted_keys(built: Path) -> None:
    others = [generate_keypair()[1] for _ in range(3)]
    assert verify_bundle(built, [*others, PUBLIC]).key_id == key_id(PUBLIC)
