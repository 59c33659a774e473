"""Build hostile configuration backups from a good one, as an attacker would: take the file
apart (header, gzip, tar), change one thing, and put it back together with valid checksums so
that the check under test is the one that refuses it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Callable

MAGIC = b"LMIBAK1\n"

XXE = b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<r>&x;</r>\n'
BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>\n<lolz>&lol2;</lolz>\n'
)


def split(data: bytes) -> tuple[dict, dict[str, bytes]]:
    """(header, tar members by name) of an unencrypted backup."""
    assert data.startswith(MAGIC)
    (length,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + length])
    tar = gzip.decompress(data[start + length :])
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for info in archive.getmembers():
            members[info.name] = archive.extractfile(info).read()
    return header, members


def join(header: dict, members: dict[str, bytes], *, extra: Callable | None = None) -> bytes:
    """A backup of these members with a manifest and checksums that match them."""
    manifest = json.loads(members["manifest.json"])
    manifest["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
        if name != "manifest.json"
    }
    members = {**members, "manifest.json": json.dumps(manifest).encode()}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(archive)
    payload = gzip.compress(buffer.getvalue())
    header = {**header, "payload_size": len(payload)}
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    header_bytes = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes + payload


def with_xml(data: bytes, xml: bytes) -> bytes:
    """The backup with its first configuration XML replaced by ``xml``."""
    header, members = split(data)
    name = next(n for n in members if n.startswith("files/etc/mailsec/cpe/"))
    return join(header, {**members, name: xml})


def with_member(data: bytes, name: str, content: bytes = b"x") -> bytes:
    header, members = split(data)
    return join(header, {**members, name: content})


def with_symlink(data: bytes) -> bytes:
    header, members = split(data)

    def link(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("files/etc/mailsec/cpe/evil.xml")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        archive.addfile(info)

    return join(header, members, extra=link)


def tampered(data: bytes) -> bytes:
    """One payload byte flipped, the header's checksum left as it was."""
    buffer = bytearray(data)
    buffer[-20] ^= 0xFF
    return bytes(buffer)


def newer_firmware(data: bytes) -> bytes:
    header, members = split(data)
    manifest = json.loads(members["manifest.json"])
    manifest["firmware_version"] = "9.9.9.9"
    header["firmware_version"] = "9.9.9.9"
    return join(header, {**members, "manifest.json": json.dumps(manifest).encode()})
