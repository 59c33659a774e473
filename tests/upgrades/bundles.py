"""Making good and bad firmware bundles for the tests, and feeds that list them.

Good bundles come from the vendor's own ``build_bundle``; bad ones are good ones with bytes
changed, or headers signed by hand (an oversized payload claim, a tar whose member climbs out
of the image), so each test says exactly which defence it expects to hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.firmware import bundle, bundlebuild, signing


@dataclass(frozen=True)
class Vendor:
    """A signing key pair the test's console trusts (or not)."""

    private: bytes
    public: bytes

    @property
    def public_b64(self) -> str:
        return signing.public_key_b64(self.public)


def new_vendor() -> Vendor:
    private, public = signing.generate_keypair()
    return Vendor(private, public)


def make_image(directory: Path, payload_bytes: int = 2 * 1024 * 1024, seed: int = 1) -> Path:
    """A small system image tree: a few text files and one file of random bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "etc").mkdir(exist_ok=True)
    (directory / "etc" / "SuSE-release").write_text("SUSE Linux Enterprise Server 11 (x86_64)\n")
    (directory / "etc" / "firmware-release").write_text("FIRMWARE_VERSION=2.8.1.0\n")
    (directory / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (directory / "usr" / "lib" / "mailsec.img").write_bytes(rng.randbytes(payload_bytes))
    return directory


def build(
    vendor: Vendor,
    out: Path,
    *,
    version: str = "2.8.1.0",
    min_version: str = "2.8.0.0",
    payload_bytes: int = 2 * 1024 * 1024,
    notes: str = "Upgrades the operating system to SUSE Linux Enterprise Server 11.",
) -> Path:
    image = make_image(out.parent / f"image-{out.stem}", payload_bytes)
    bundlebuild.build_bundle(
        image,
        out,
        private_key=vendor.private,
        version=version,
        min_version=min_version,
        msgstore_format="2.8.1",
        config_format="2.8.1",
        os_release="SUSE Linux Enterprise Server 11",
        release_notes=notes,
    )
    return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_feed(directory: Path, *bundles: tuple[Path, str, str], notes: str = "") -> Path:
    """feed.json in ``directory`` listing (file, version, min_version), real sizes and digests."""
    entries = []
    for path, version, min_version in bundles:
        entries.append(
            {
                "version": version,
                "min_version": min_version,
                "file": path.name,
                "size": path.stat().st_size,
                "sha256": sha256_of(path),
                "release_notes": notes or f"Firmware {version}: bug fixes and SLES 11.",
            }
        )
    feed = directory / "feed.json"
    feed.write_text(json.dumps({"format": 1, "bundles": entries}))
    return feed


def header_size(path: Path) -> int:
    with path.open("rb") as handle:
        handle.seek(8)
        (length,) = struct.unpack(">I", handle.read(4))
    return 8 + 4 + length + 64


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tamper_payload(path: Path) -> None:
    """Change one byte in the middle of the payload (the signed manifest no longer matches)."""
    start = header_size(path)
    flip_byte(path, start + (path.stat().st_size - start) // 2)


def truncate(path: Path, keep: int) -> None:
    with path.open("rb+") as handle:
        handle.truncate(keep)


def unsign(path: Path) -> None:
    """Zero the signature: an unsigned bundle."""
    data = bytearray(path.read_bytes())
    end = header_size(path)
    data[end - 64 : end] = bytes(64)
    path.write_bytes(bytes(data))


def signed_by_hand(
    vendor: Vendor, out: Path, payload: bytes, *, version: str = "2.8.1.0", **overrides: object
) -> Path:
    """A bundle whose manifest is written and signed here (to lie about the payload, say)."""
    public = vendor.public
    fields: dict[str, object] = {
        "format": 1,
        "product": bundle.PRODUCT,
        "version": version,
        "min_version": "2.8.0.0",
        "msgstore_format": "2.8.1",
        "config_format": "2.8.1",
        "os_release": "SUSE Linux Enterprise Server 11",
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "release_notes": "hand made",
        "key_id": signing.key_id(public),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    fields.update(overrides)
    manifest = signing.canonical_json(fields)
    signature = Ed25519PrivateKey.from_private_bytes(vendor.private).sign(manifest)
    out.write_bytes(
        bundle.MAGIC + struct.pack(">I", len(manifest)) + manifest + signature + payload
    )
    return out


def escaping_tar() -> bytes:
    """A tar whose second member climbs out of the image with ``..``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("etc/motd", b"hello\n"),
            ("../../etc/cron.d/evil", b"* * * * * root sh\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_380_585_600
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return data + bytes((-len(data)) % 512)


def random_bytes(count: int) -> bytes:
    return os.urandom(count)
