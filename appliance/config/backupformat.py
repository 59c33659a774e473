"""The configuration backup file: its layout, and writing and reading it.

Layout of the file::

    b"LMIBAK1\\n"                  magic: tells a backup from anything else uploaded
    4 bytes, big endian            length of the header
    header (JSON, UTF-8)           what the list page shows without the passphrase
    payload                        a gzip-compressed tar, AES-256-GCM encrypted if a passphrase
                                   was given (key from scrypt, the header as associated data, so
                                   a changed header fails authentication like a changed payload)

The tar holds ``manifest.json`` (firmware, formats, SHA-256 and size of every other member),
``appliance_settings.json``, ``console.json`` and ``files/<path under the appliance root>``.

Reading refuses anything but this layout with the limits below (a hostile header, an archive
bomb, a link or a path out of the archive); what the files say is checked by
:mod:`appliance.config.backupcheck`, and the seal by :mod:`appliance.config.backupmac`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import re
import secrets
import struct
import tarfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from appliance.config.backupmac import MAC_FIELD, backup_mac, mac_valid
from appliance.system.errors import ApplianceError
from appliance.system.safejson import loads_strict

MAGIC = b"LMIBAK1\n"
FORMAT = 1
TRIGGERS = ("manual", "scheduled", "pre-install", "upload")

MAX_HEADER_BYTES = 64 * 1024
# A configuration is kilobytes; these limits only stop archives built to exhaust the console.
MAX_UNPACKED_BYTES = 128 * 1024 * 1024
MAX_MEMBER_BYTES = 32 * 1024 * 1024
MAX_MEMBERS = 2000
MAX_COMMENT_CHARS = 500
MAX_JSON_BYTES = 1024 * 1024

# scrypt: 2**15 x 8 x 128 bytes = 32 MiB and about 0.1 s per derivation. A backup names its own
# parameters, so only these values are accepted: a hostile header must not choose gigabytes.
_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1
_SALT_BYTES = 16
_NONCE_BYTES = 12

_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- Errors and the header ------------------------------------------------------------------------


class BackupError(ApplianceError):
    """A configuration backup cannot be made, read or restored; ``str()`` is for the user."""


class BackupRejected(BackupError):
    """The file is not a usable backup: hostile, damaged, altered or unsupported."""


class PassphraseRequired(BackupError):
    """The backup is encrypted and no passphrase was given."""


class WrongPassphrase(BackupError):
    """Authentication failed: the passphrase is wrong or the encrypted backup was changed."""


@dataclass(frozen=True)
class BackupHeader:
    """What the list page shows about a backup, readable without its passphrase."""

    name: str
    format: int
    created_at: datetime
    firmware_version: str
    config_format: str
    hostname: str
    created_by: str
    comment: str
    trigger: str
    encrypted: bool
    size: int  # of the file
    # True: made by this appliance and unchanged since (its MAC verifies); False: from elsewhere,
    # from before backups were sealed, or altered; None: encrypted, known once it is opened.
    verified: bool | None = False


# --- Writing --------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_bytes(members: dict[str, bytes], mtime: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _derive_key(passphrase: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return kdf.derive(passphrase.encode("utf-8"))


def _assemble(header: dict[str, Any]) -> bytes:
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes


def pack(
    header: dict[str, Any], members: dict[str, bytes], *, key: bytes, passphrase: str | None
) -> bytes:
    """The whole backup file: ``members`` and their manifest in a gzip-compressed tar.

    ``header`` holds what the list page shows (``created_at``, ``firmware_version``,
    ``config_format``, ``hostname``, ``created_by``, ``comment``, ``trigger``); the format, the
    payload's size and checksum or encryption parameters, and the seal made with ``key`` are
    added here. With a ``passphrase`` the payload is encrypted.
    """
    created_at = datetime.fromisoformat(header["created_at"])
    manifest = {
        "format": FORMAT,
        "firmware_version": header["firmware_version"],
        "config_format": header["config_format"],
        "created_at": header["created_at"],
        "files": {
            name: {"sha256": sha256(data), "size": len(data)} for name, data in members.items()
        },
    }
    tar = _tar_bytes(
        {"manifest.json": json_bytes(manifest), **members}, int(created_at.timestamp())
    )
    plain = gzip.compress(tar, compresslevel=6, mtime=0)

    header = {"format": FORMAT, **header, "encrypted": passphrase is not None}
    if passphrase is None:
        payload = plain
        header.update(payload_size=len(payload), payload_sha256=sha256(payload))
        header[MAC_FIELD] = backup_mac(key, header, sha256(plain))
        return _assemble(header) + payload
    salt = secrets.token_bytes(_SALT_BYTES)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    # The ciphertext is 16 bytes (the tag) longer than the plaintext; known before encrypting,
    # so the header, which is the associated data, can carry it.
    header.update(
        payload_size=len(plain) + 16,
        cipher="AES-256-GCM",
        nonce=_b64(nonce),
        kdf={
            "name": "scrypt",
            "n": _SCRYPT_N,
            "r": _SCRYPT_R,
            "p": _SCRYPT_P,
            "salt": _b64(salt),
        },
    )
    # Sealed before encrypting: the MAC is part of the header, the associated data.
    header[MAC_FIELD] = backup_mac(key, header, sha256(plain))
    prefix = _assemble(header)
    return prefix + AESGCM(_derive_key(passphrase, salt)).encrypt(nonce, plain, prefix)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- Reading the header ---------------------------------------------------------------------------


def loads(data: bytes, what: str) -> Any:
    try:
        return loads_strict(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BackupRejected(f"The backup's {what} is not valid JSON ({exc}).") from exc


@dataclass(frozen=True)
class Parsed:
    header: BackupHeader
    raw: dict[str, Any]
    prefix: bytes  # magic, length and header: the associated data of an encrypted payload


def _split_prefix(head: bytes) -> tuple[int, bytes]:
    """``(header length, header bytes)`` from the start of a file; rejects non-backups."""
    if not head.startswith(MAGIC):
        raise BackupRejected(
            "This file is not an LMI configuration backup (it does not start like one)."
        )
    if len(head) < len(MAGIC) + 4:
        raise BackupRejected("The backup is truncated: it ends inside its header.")
    (length,) = struct.unpack(">I", head[len(MAGIC) : len(MAGIC) + 4])
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise BackupRejected("The backup's header has an impossible length.")
    start = len(MAGIC) + 4
    header_bytes = head[start : start + length]
    if len(header_bytes) < length:
        raise BackupRejected("The backup is truncated: it ends inside its header.")
    return length, header_bytes


def _field(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BackupRejected(f"The backup's header has no valid {key!r}.")
    return value


def parse_header(head: bytes, name: str, file_size: int, key: bytes | None) -> BackupHeader:
    return parse(head, name, file_size, key).header


def parse(head: bytes, name: str, file_size: int, key: bytes | None) -> Parsed:
    """Parse and check the header; ``head`` holds at least the whole header.

    ``key`` is this appliance's backup key (None: it has none yet, so nothing verifies).
    """
    length, header_bytes = _split_prefix(head)
    raw = loads(header_bytes, "header")
    if not isinstance(raw, dict):
        raise BackupRejected("The backup's header is not a JSON object.")
    version = _field(raw, "format", int)
    if version != FORMAT:
        raise BackupRejected(
            f"The backup has format {version}; this console reads format {FORMAT} only."
        )
    try:
        created_at = datetime.fromisoformat(_field(raw, "created_at", str))
    except ValueError as exc:
        raise BackupRejected("The backup's header has an invalid creation time.") from exc
    if created_at.tzinfo is None:
        raise BackupRejected("The backup's creation time has no time zone.")
    trigger = _field(raw, "trigger", str)
    if trigger not in TRIGGERS:
        raise BackupRejected(f"The backup's header names an unknown trigger {trigger[:40]!r}.")
    encrypted = _field(raw, "encrypted", bool)
    payload_size = _field(raw, "payload_size", int)
    if payload_size < 0:
        raise BackupRejected("The backup's header has an invalid payload size.")
    if MAC_FIELD in raw and not _SHA256.fullmatch(str(raw[MAC_FIELD])):
        raise BackupRejected("The backup's header has an invalid seal.")
    verified: bool | None = None
    if encrypted:
        _check_crypto_fields(raw)
    else:
        sha = _field(raw, "payload_sha256", str)
        if not _SHA256.fullmatch(sha):
            raise BackupRejected("The backup's header has an invalid payload checksum.")
        # The payload is checked against payload_sha256 when it is loaded.
        verified = mac_valid(key, raw, sha)
    expected = len(MAGIC) + 4 + length + payload_size
    if file_size < expected:
        raise BackupRejected(
            f"The backup is truncated: {file_size:,} bytes instead of {expected:,}."
        )
    if file_size > expected:
        raise BackupRejected("The backup has unexpected data after its end.")
    if name.startswith("upload-"):
        trigger = "upload"  # what the console knows about the file, whatever made it
    header = BackupHeader(
        name=name,
        format=version,
        created_at=created_at.astimezone(UTC),
        firmware_version=_field(raw, "firmware_version", str),
        config_format=_field(raw, "config_format", str),
        hostname=_field(raw, "hostname", str),
        created_by=_field(raw, "created_by", str),
        comment=_field(raw, "comment", str)[:MAX_COMMENT_CHARS],
        trigger=trigger,
        encrypted=encrypted,
        size=file_size,
        verified=verified,
    )
    return Parsed(header, raw, head[: len(MAGIC) + 4 + length])


def _check_crypto_fields(raw: dict[str, Any]) -> None:
    kdf = raw.get("kdf")
    if (
        raw.get("cipher") != "AES-256-GCM"
        or not isinstance(kdf, dict)
        or kdf.get("name") != "scrypt"
        or kdf.get("n") != _SCRYPT_N
        or kdf.get("r") != _SCRYPT_R
        or kdf.get("p") != _SCRYPT_P
    ):
        raise BackupRejected("The backup is encrypted with parameters this console does not use.")
    try:
        salt = base64.b64decode(str(kdf.get("salt")), validate=True)
        nonce = base64.b64decode(str(raw.get("nonce")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackupRejected("The backup's encryption parameters are damaged.") from exc
    if len(salt) != _SALT_BYTES or len(nonce) != _NONCE_BYTES:
        raise BackupRejected("The backup's encryption parameters are damaged.")


# --- Reading the payload --------------------------------------------------------------------------


def _decrypt(parsed: Parsed, payload: bytes, passphrase: str | None) -> bytes:
    if not parsed.header.encrypted:
        if sha256(payload) != parsed.raw["payload_sha256"]:
            raise BackupRejected(
                "The backup's content does not match its checksum: it is damaged or was altered."
            )
        return payload
    if passphrase is None or passphrase == "":
        raise PassphraseRequired("This backup is encrypted: enter its passphrase.")
    salt = base64.b64decode(parsed.raw["kdf"]["salt"])
    nonce = base64.b64decode(parsed.raw["nonce"])
    try:
        return AESGCM(_derive_key(passphrase, salt)).decrypt(nonce, payload, parsed.prefix)
    except InvalidTag as exc:
        raise WrongPassphrase("The passphrase is wrong, or the backup was altered.") from exc


def _gunzip(data: bytes) -> bytes:
    """Decompress with a ceiling, so a small archive cannot expand into gigabytes."""
    inflater = zlib.decompressobj(wbits=31)
    out = bytearray()
    chunk = data
    try:
        while True:
            out += inflater.decompress(chunk, 1024 * 1024)
            if len(out) > MAX_UNPACKED_BYTES:
                raise BackupRejected(
                    "The backup would unpack to more than "
                    f"{MAX_UNPACKED_BYTES // (1024 * 1024)} MiB (an archive bomb?)."
                )
            chunk = inflater.unconsumed_tail
            if not chunk:
                break
        out += inflater.flush()
        if len(out) > MAX_UNPACKED_BYTES:
            raise BackupRejected("The backup would unpack to too much data (an archive bomb?).")
    except zlib.error as exc:
        raise BackupRejected(
            f"The backup's content is not a valid compressed archive: {exc}."
        ) from exc
    if not inflater.eof:
        raise BackupRejected("The backup's content is truncated.")
    if inflater.unused_data:
        raise BackupRejected("The backup's content has unexpected data after its end.")
    return bytes(out)


def _member_name_ok(name: str) -> bool:
    if name in ("manifest.json", "appliance_settings.json", "console.json"):
        return True
    if not name.startswith("files/"):
        return False
    parts = name.split("/")[1:]
    return bool(parts) and all(
        part not in ("", ".", "..") and not any(ord(char) < 32 for char in part) for part in parts
    )


def _untar(data: bytes) -> dict[str, bytes]:
    """The archive's members by name, after refusing anything but plain files we expect."""
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            while (info := tar.next()) is not None:
                name = info.name
                shown = name[:200]
                if len(members) >= MAX_MEMBERS:
                    raise BackupRejected(f"The backup has more than {MAX_MEMBERS} entries.")
                if name.startswith("/"):
                    raise BackupRejected(f'The backup contains "{shown}", an absolute path.')
                if ".." in name.split("/"):
                    raise BackupRejected(f'The backup contains "{shown}", a path with "..".')
                if not info.isreg():
                    kind = (
                        "a link"
                        if info.issym() or info.islnk()
                        else "a directory"
                        if info.isdir()
                        else "a device or special file"
                    )
                    raise BackupRejected(
                        f'The backup contains "{shown}", {kind}; a backup holds only files.'
                    )
                if not _member_name_ok(name):
                    raise BackupRejected(
                        f'The backup contains "{shown}", which is not part of a configuration '
                        "backup."
                    )
                if name in members:
                    raise BackupRejected(f'The backup contains "{shown}" twice.')
                if info.size > MAX_MEMBER_BYTES:
                    raise BackupRejected(f'The backup\'s "{shown}" is too large.')
                total += info.size
                if total > MAX_UNPACKED_BYTES:
                    raise BackupRejected("The backup's files are too large in total.")
                handle = tar.extractfile(info)
                content = handle.read() if handle is not None else b""
                if len(content) != info.size:
                    raise BackupRejected("The backup's archive is truncated.")
                members[name] = content
    except tarfile.TarError as exc:
        raise BackupRejected(f"The backup's content is not a valid archive: {exc}.") from exc
    return members


def _check_manifest(members: dict[str, bytes], header: BackupHeader) -> dict[str, Any]:
    if "manifest.json" not in members:
        raise BackupRejected("The backup has no manifest.")
    manifest = loads(members["manifest.json"], "manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BackupRejected("The backup's manifest lists no files.")
    if manifest.get("format") != FORMAT:
        raise BackupRejected("The backup's manifest has an unsupported format.")
    for key in ("firmware_version", "config_format"):
        if manifest.get(key) != getattr(header, key):
            raise BackupRejected(
                f"The backup's header and manifest disagree about its {key.replace('_', ' ')}."
            )
    listed: dict[str, Any] = manifest["files"]
    present = set(members) - {"manifest.json"}
    for name in sorted(set(listed) - present):
        raise BackupRejected(f'The backup\'s manifest lists "{name[:200]}", which is missing.')
    for name in sorted(present - set(listed)):
        raise BackupRejected(f'The backup contains "{name[:200]}", which its manifest omits.')
    for name, entry in listed.items():
        data = members[name]
        if (
            not isinstance(entry, dict)
            or entry.get("size") != len(data)
            or entry.get("sha256") != sha256(data)
        ):
            raise BackupRejected(
                f'The backup\'s "{name[:200]}" does not match its checksum in the manifest.'
            )
    for name in ("appliance_settings.json", "console.json"):
        if name not in members:
            raise BackupRejected(f"The backup has no {name}.")
        if len(members[name]) > MAX_JSON_BYTES:
            raise BackupRejected(f"The backup's {name} is too large.")
    return manifest


def unpack(
    parsed: Parsed, payload: bytes, passphrase: str | None, key: bytes | None
) -> tuple[dict[str, bytes], bool]:
    """``(members by name, verified)`` of a parsed backup's payload, every member checked.

    ``verified``: the seal holds (see :mod:`appliance.config.backupmac`), known for an
    encrypted backup only once its passphrase opened it.
    """
    plain = _decrypt(parsed, payload, passphrase)  # unencrypted gzip
    verified = mac_valid(key, parsed.raw, sha256(plain))
    members = _untar(_gunzip(plain))
    _check_manifest(members, parsed.header)
    return members, verified
