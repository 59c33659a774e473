"""Configuration backups (Backup & Restore > System > Manage Configuration Backups).

A configuration backup is one file (suffix ``.lmibak``) that brings an appliance back to the
configuration it had: the configuration XML of ``etc/mailsec/cpe``, the files that
``$(FILE/...)`` policy objects name (the 2.8.1 upgrade is known to lose those), the network
settings, the message stores' retention and an opaque dict of the console's own settings.

Layout of the file::

    b"LMIBAK1\\n"                  magic: tells a backup from anything else uploaded
    4 bytes, big endian            length of the header
    header (JSON, UTF-8)           what the list page shows without the passphrase
    payload                        a gzip-compressed tar, AES-256-GCM encrypted if a passphrase
                                   was given (key from scrypt, the header as associated data, so
                                   a changed header fails authentication like a changed payload)

The tar holds ``manifest.json`` (firmware, formats, SHA-256 and size of every other member),
``appliance_settings.json``, ``console.json`` and ``files/<path under the appliance root>``.

Everything read from a backup is treated as hostile until proven otherwise: the whole archive is
checked (:func:`backup_load`) before a single byte of the appliance is changed, and the restore
itself is all or nothing (staged files, a journal, renames, crash recovery from the journal).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import sqlite3
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from lxml import etree

from appliance.config.backupmac import MAC_FIELD, appliance_key, backup_mac, mac_valid
from appliance.config.smtp import SmtpSettings
from appliance.mail import msgstore
from appliance.system import network
from appliance.system.atomic import atomic_write_bytes, atomic_write_text, exclusive_lock, fsync_dir
from appliance.system.errors import (
    ApplianceError,
    ApplianceNotInitialized,
    MalformedApplianceFile,
    UnsafeXMLError,
)
from appliance.system.facts import parse_key_values, read_appliance_text, read_firmware_release
from appliance.system.paths import Layout, appliance_root, layout, resolve_inside
from appliance.system.safexml import parse_xml

MAGIC = b"LMIBAK1\n"
FORMAT = 1
SUFFIX = ".lmibak"
TRIGGERS = ("manual", "scheduled", "pre-install", "upload")
# The configuration format the 2.8.0 firmware writes; configconvert knows the others.
BASE_CONFIG_FORMAT = "2.8.0"

MAX_BACKUP_BYTES = 64 * 1024 * 1024
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

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}\.lmibak")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CPE = "etc/mailsec/cpe/"
_NETWORK = "etc/sysconfig/network/"
_HOSTNAME = "etc/HOSTNAME"
# The only places a $(FILE) list is backed up from and restored to, whatever a backup's policy
# objects say: an allow-list, so a file the console does not know about (cron, ssh keys, a
# library, a lease) is never written. Under each, any depth, no symbolic link out.
LIST_DIRS = ("etc/mailsec/lists/",)
MAX_LIST_BYTES = 8 * 1024 * 1024  # a list of addresses, domains or words, one per line
_STAGED = ".lmirestore-new"
_OLD = ".lmirestore-old"

# What a restore may write, beyond "well-formed and in its place": each of these is read by
# the console's pages afterwards, so a value they cannot show must be refused here, not there.
MAX_HOSTNAME_CHARS = 253  # RFC 1123 / RFC 1035
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A SUSE interface configuration name: a Linux interface name, or the hardware-bound names of
# SLES 10 (the 2.8.0 firmware's system), such as "eth-id-00:11:22:33:44:55" or
# "eth-bus-pci-0000:00:19.0"; starting with a letter or digit, so never "." or "..", and never
# a "/" that could leave the network directory.
_INTERFACE = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
# The files of etc/sysconfig/network a backup may carry: SUSE's per-interface configuration
# and routes, the global route table and SUSE's two global settings files.
_KEY_VALUE_FILE = re.compile(rf"ifcfg-{_INTERFACE}|config|dhcp")
_ROUTES_FILE = re.compile(rf"ifroute-{_INTERFACE}|routes")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
MAX_NAME_CHARS = 200  # a message store's or a policy object's name
# The elements of each configuration file this console reads and writes, by file name: (root
# element, every element). Anything else (an XInclude, an element of another vocabulary) is not
# part of a configuration this console made and is refused rather than kept unread.
_SMTP_FIELDS = frozenset(spec.name for spec in dataclasses.fields(SmtpSettings))
_CONFIG_ELEMENTS: dict[str, tuple[str, frozenset[str]]] = {
    "mailsec_policyobjects1_1.xml": (
        "policyobjects",
        frozenset({"policyobjects", "object", "name", "value"}),
    ),
    "mailsec_policy1_0.xml": ("mailpolicy", frozenset({"mailpolicy", "rule", "quarantine"})),
    "mailsec_smtp1_0.xml": ("smtp", frozenset({"smtp"}) | _SMTP_FIELDS),
    "mailsec_config2_0.xml": (
        "mailsecConfig",
        frozenset(
            {
                "mailsecConfig",
                "policyObjects",
                "object",
                "name",
                "value",
                "fileRef",
                "mailPolicy",
                "rules",
                "rule",
                "quarantine",
                "store",
                "smtp",
                "listenPort",
                "nextHop",
                "maxMessageSize",
                "smtpLogRetentionDays",
                "trackingLogRetentionDays",
                "relayNetworks",
            }
        ),
    ),
}


# --- Errors and results ---------------------------------------------------------------------


class BackupError(ApplianceError):
    """A configuration backup cannot be made, read or restored; ``str()`` is for the user."""


class BackupRejected(BackupError):
    """The file is not a usable backup: hostile, damaged, altered or unsupported."""


class ConfirmationRequired(BackupError):
    """An unverified backup: restored only once an administrator confirmed ``files``."""

    def __init__(self, message: str, files: list[str]) -> None:
        super().__init__(message)
        self.files = files


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


@dataclass(frozen=True)
class DiffItem:
    """One difference between a backup and the running configuration."""

    section: str
    name: str
    change: str  # "added" | "removed" | "changed" (what the restore would do)
    before: str | None  # running now
    after: str | None  # after the restore


@dataclass(frozen=True)
class LoadedBackup:
    """A fully validated backup, converted to the running configuration format if needed.

    ``files`` maps paths under the appliance root (``etc/mailsec/cpe/...``) to their content.
    """

    header: BackupHeader
    files: dict[str, bytes]
    appliance_settings: dict[str, Any]
    console: dict[str, Any]
    converted_from: str | None = None
    verified: bool = False  # see BackupHeader.verified; known here for encrypted ones too


@dataclass(frozen=True)
class RestorePlan:
    """What a restore would do to the appliance as it is now (paths under the root)."""

    writes: list[str]
    removes: list[str]


@dataclass(frozen=True)
class RestoreResult:
    """What a restore changed."""

    files_written: int
    files_removed: int
    stores_updated: int
    converted_from: str | None


# --- Paths and names -------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise KeyError(name)


def backup_path(name: str, root: Path | None = None) -> Path:
    """The file of the backup ``name``; ``KeyError`` for an invalid name or a missing file.

    Names come from URLs, so anything but our own plain file names (no ``/``, no ``..``, the
    ``.lmibak`` suffix) is refused before it is joined to a path.
    """
    _check_name(name)
    path = layout(root).config_backups_dir / name
    if not path.is_file() or path.is_symlink():
        raise KeyError(name)
    return path


def _new_name(directory: Path, created_at: datetime, trigger: str) -> str:
    stamp = created_at.strftime("%Y%m%d-%H%M%S")
    while True:
        name = f"{stamp}-{trigger}-{secrets.token_hex(3)}{SUFFIX}"
        if not (directory / name).exists():
            return name


# --- Reading the running configuration ------------------------------------------------------


def _running_firmware(root: Path) -> str:
    version = read_firmware_release(root).get("FIRMWARE_VERSION")
    if not version:
        raise ApplianceNotInitialized("the appliance's firmware release has no FIRMWARE_VERSION")
    return version


def _configconvert() -> Any:
    """The configuration converter, or None while the firmware knows only one format."""
    try:
        from appliance.config import configconvert
    except ImportError:
        return None
    return configconvert


def _running_config_format(root: Path) -> str:
    converter = _configconvert()
    if converter is None:
        return BASE_CONFIG_FORMAT
    return str(converter.config_format(root))


def _hostname(the_layout: Layout) -> str:
    """The running host name; :class:`MalformedApplianceFile` when ``etc/HOSTNAME`` is damaged.

    A backup is not made of a damaged host name: its restore would be refused.
    """
    try:
        return read_appliance_text(the_layout.hostname_file, the_layout.root).strip()
    except FileNotFoundError:
        return ""


def _plain_files(directory: Path, pattern: str) -> list[Path]:
    """Regular, non-hidden files directly in ``directory`` (symlinks and subdirectories not)."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.glob(pattern)
        if path.is_file() and not path.is_symlink() and not path.name.startswith(".")
    )


def _macro_files(root: Path) -> dict[str, Path]:
    """``{relative path: host path}`` of the files named by $(FILE) macros on this appliance."""
    from appliance.config.store import file_macro_objects

    try:
        objects = file_macro_objects(root)
    except ApplianceNotInitialized:
        return {}
    found: dict[str, Path] = {}
    real_root = Path(os.path.realpath(root))
    for obj in objects:
        relative = _macro_relative(obj.file_path or "")
        if relative is None or not _list_path(relative):
            continue  # a restore would refuse it: it is not backed up either
        try:
            path = resolve_inside(real_root, "/" + relative)
        except ValueError:
            continue  # a path outside the root is never backed up (nor restored)
        if not _list_path(path.relative_to(real_root).as_posix()):
            continue  # a symbolic link out of the list directories
        if path.is_file():
            found[relative] = path
    return found


def _macro_relative(appliance_path: str) -> str | None:
    parts = [part for part in appliance_path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _list_path(relative: str) -> bool:
    """A path a $(FILE) list may have: a file somewhere under one of :data:`LIST_DIRS`."""
    return any(relative.startswith(directory) and relative != directory for directory in LIST_DIRS)


def _list_dirs_shown() -> str:
    return ", ".join("/" + directory for directory in LIST_DIRS)


def _config_path(relative: str) -> bool:
    """A file restored by its place (configuration XML, network, host name), not by a macro."""
    if relative.startswith(_CPE):
        rest = relative.removeprefix(_CPE)
        return "/" not in rest and rest.endswith(".xml")
    if relative.startswith(_NETWORK):
        return "/" not in relative.removeprefix(_NETWORK)
    return relative == _HOSTNAME


def _check_target(relative: str, root: Path) -> Path:
    """The host path a backup file would be written to, refusing any way out of its place.

    The path is resolved as it is on disk now (symbolic links followed): a configuration file
    must land exactly at its own path, and a $(FILE) list inside the list directories, on a
    regular file or none, even through a symbolic link.
    """
    real_root = Path(os.path.realpath(root))
    try:
        target = resolve_inside(real_root, "/" + relative)
    except ValueError as exc:
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" would be written outside the appliance; the backup '
            "is refused."
        ) from exc
    landing = target.relative_to(real_root).as_posix()
    if _config_path(relative) and landing != relative:
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" would be redirected to "{landing[:200]}"; the '
            "backup is refused."
        )
    if not _config_path(relative) and not _list_path(landing):
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" would be written to "{landing[:200]}", outside the '
            f"list directories ({_list_dirs_shown()}); the backup is refused."
        )
    if target.is_dir():
        raise BackupRejected(f'The backup\'s "{relative[:200]}" is a directory on this appliance.')
    if target.exists() and not target.is_file():
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" is a device or special file on this appliance.'
        )
    return target


def _store_retention(root: Path) -> dict[str, int]:
    if not layout(root).msgstore_db.is_file():
        return {}
    conn = msgstore.connect(root, readonly=True)
    try:
        rows = conn.execute("SELECT name, retention_days FROM message_store ORDER BY id").fetchall()
    finally:
        conn.close()
    return {str(name): int(days) for name, days in rows}


def _collect_files(root: Path) -> dict[str, bytes]:
    the_layout = layout(root)
    files: dict[str, bytes] = {}
    sources = [
        *_plain_files(the_layout.cpe_dir, "*.xml"),
        *_plain_files(the_layout.network_dir, "*"),
    ]
    if the_layout.hostname_file.is_file():
        sources.append(the_layout.hostname_file)
    for path in sources:
        files[path.relative_to(root).as_posix()] = path.read_bytes()
    for relative, path in _macro_files(root).items():
        files[relative] = path.read_bytes()
    return files


# --- Writing an archive ------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
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


def backup_create(
    *,
    created_by: str,
    comment: str = "",
    trigger: str = "manual",
    passphrase: str | None = None,
    console: dict[str, Any] | None = None,
    root: Path | None = None,
) -> BackupHeader:
    """Back up the running configuration into a new file in the backups directory.

    The file appears complete or not at all (written to a temporary file and renamed). With a
    ``passphrase`` the payload is encrypted; the header stays readable for the list page.
    """
    base = appliance_root(root)
    the_layout = layout(base)
    if trigger not in TRIGGERS:
        raise BackupError(f"Unknown backup trigger {trigger!r}.")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
        raise BackupError(f"The comment must be at most {MAX_COMMENT_CHARS} characters.")
    if passphrase is not None and (not isinstance(passphrase, str) or not passphrase):
        raise BackupError("The passphrase must not be empty.")
    console = dict(console or {})
    try:
        json.dumps(console)
    except (TypeError, ValueError) as exc:
        raise BackupError(f"The console settings cannot be stored in a backup: {exc}") from exc
    firmware_version = _running_firmware(base)
    config_format = _running_config_format(base)
    key = appliance_key(base, create=True)
    assert key is not None
    files = _collect_files(base)
    if not any(name.startswith(_CPE) for name in files):
        raise ApplianceNotInitialized(f"no configuration XML in {the_layout.cpe_dir}")
    created_at = datetime.now(UTC).replace(microsecond=0)

    members: dict[str, bytes] = {
        "appliance_settings.json": _json_bytes({"store_retention": _store_retention(base)}),
        "console.json": _json_bytes(console),
    }
    for relative, data in files.items():
        members["files/" + relative] = data
    manifest = {
        "format": FORMAT,
        "firmware_version": firmware_version,
        "config_format": config_format,
        "created_at": created_at.isoformat(),
        "files": {
            name: {"sha256": _sha256(data), "size": len(data)} for name, data in members.items()
        },
    }
    tar = _tar_bytes(
        {"manifest.json": _json_bytes(manifest), **members}, int(created_at.timestamp())
    )
    plain = gzip.compress(tar, compresslevel=6, mtime=0)

    header: dict[str, Any] = {
        "format": FORMAT,
        "created_at": created_at.isoformat(),
        "firmware_version": firmware_version,
        "config_format": config_format,
        "hostname": _hostname(the_layout),
        "created_by": str(created_by),
        "comment": comment,
        "trigger": trigger,
        "encrypted": passphrase is not None,
    }
    if passphrase is None:
        payload = plain
        header.update(payload_size=len(payload), payload_sha256=_sha256(payload))
        header[MAC_FIELD] = backup_mac(key, header, _sha256(plain))
        data = _assemble(header) + payload
    else:
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
        header[MAC_FIELD] = backup_mac(key, header, _sha256(plain))
        prefix = _assemble(header)
        payload = AESGCM(_derive_key(passphrase, salt)).encrypt(nonce, plain, prefix)
        data = prefix + payload

    directory = the_layout.config_backups_dir
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock"):
        name = _new_name(directory, created_at, trigger)
        atomic_write_bytes(directory / name, data, 0o600)
    return _parse_header(data, name, len(data), key)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- Reading the header ------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BackupRejected(f"The backup's {what} is not valid JSON ({exc}).") from exc


@dataclass(frozen=True)
class _Parsed:
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


def _parse_header(head: bytes, name: str, file_size: int, key: bytes | None) -> BackupHeader:
    return _parse(head, name, file_size, key).header


def _parse(head: bytes, name: str, file_size: int, key: bytes | None) -> _Parsed:
    """Parse and check the header; ``head`` holds at least the whole header.

    ``key`` is this appliance's backup key (None: it has none yet, so nothing verifies).
    """
    length, header_bytes = _split_prefix(head)
    raw = _loads(header_bytes, "header")
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
    return _Parsed(header, raw, head[: len(MAGIC) + 4 + length])


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


def backup_header(name: str, root: Path | None = None) -> BackupHeader:
    """The header of one stored backup (``KeyError``: none of that name)."""
    return _header_of(name, root, _key_or_none(root))


def _key_or_none(root: Path | None) -> bytes | None:
    """The backup key for verifying; a damaged key verifies nothing (every backup unverified)."""
    try:
        return appliance_key(root)
    except (MalformedApplianceFile, OSError):
        return None


def _header_of(name: str, root: Path | None, key: bytes | None) -> BackupHeader:
    path = backup_path(name, root)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(len(MAGIC) + 4 + MAX_HEADER_BYTES)
    return _parse_header(head, name, size, key)


def backup_list(root: Path | None = None) -> list[BackupHeader]:
    """Every stored backup, newest first; files that cannot be read as a backup are skipped."""
    directory = layout(root).config_backups_dir
    if not directory.is_dir():
        return []
    headers = []
    key = _key_or_none(root)
    for path in directory.iterdir():
        if not _NAME.fullmatch(path.name):
            continue
        try:
            headers.append(_header_of(path.name, root, key))
        except (BackupError, KeyError, OSError):
            continue
    return sorted(headers, key=lambda header: (header.created_at, header.name), reverse=True)


def backup_delete(name: str, root: Path | None = None) -> None:
    """Delete one backup (``KeyError``: none of that name)."""
    path = backup_path(name, root)
    path.unlink()
    fsync_dir(path.parent)


def backup_prune(trigger: str, keep: int, root: Path | None = None) -> list[str]:
    """Delete all but the newest ``keep`` backups made by ``trigger``; return the deleted names."""
    if keep < 0:
        raise ValueError("keep must not be negative")
    matching = [header for header in backup_list(root) if header.trigger == trigger]
    deleted = []
    for header in matching[keep:]:
        with contextlib.suppress(KeyError, FileNotFoundError):
            backup_delete(header.name, root)
            deleted.append(header.name)
    return deleted


# --- Loading and validating --------------------------------------------------------------------


def _decrypt(parsed: _Parsed, payload: bytes, passphrase: str | None) -> bytes:
    if not parsed.header.encrypted:
        if _sha256(payload) != parsed.raw["payload_sha256"]:
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
    manifest = _loads(members["manifest.json"], "manifest")
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
            or entry.get("sha256") != _sha256(data)
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


def _check_xml(files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if not name.startswith(_CPE):
            continue
        shown = name.removeprefix(_CPE)[:200]
        if "/" in name.removeprefix(_CPE) or not name.endswith(".xml"):
            raise BackupRejected(f'The backup contains "{shown}" in the configuration directory.')
        try:
            document = parse_xml(data)
        except UnsafeXMLError as exc:
            raise BackupRejected(
                f"The configuration file {shown} declares a DOCTYPE or entities (as in XXE or "
                "entity expansion attacks); it is refused."
            ) from exc
        except ApplianceError as exc:
            raise BackupRejected(f"The configuration file {shown} is not well-formed XML.") from exc
        _check_elements(shown, document)


def _element_name(element: etree._Element) -> str:
    """``xi:include (namespace http://www.w3.org/2001/XInclude)``, or a plain tag as it is."""
    qname = etree.QName(element)
    name = f"{element.prefix}:{qname.localname}" if element.prefix else qname.localname
    if qname.namespace:
        name += f" (namespace {qname.namespace})"
    return name[:200]


def _check_elements(shown: str, document: etree._Element) -> None:
    """Refuse a configuration file of a name, or with an element, this console does not know.

    parse_xml already refuses DOCTYPEs and entities; an XInclude or a foreign element would
    not be expanded either, but it would be restored and kept unread in the appliance's
    configuration, where the mail-security engine might act on it: no such file is ours.
    """
    known = _CONFIG_ELEMENTS.get(shown)
    if known is None:
        raise BackupRejected(
            f"The backup contains the configuration file {shown!r}, which this console does not "
            "know; the backup is refused."
        )
    root_tag, elements = known
    if document.tag != root_tag:
        raise BackupRejected(
            f"The configuration file {shown} starts with the element <{_element_name(document)}> "
            f"instead of <{root_tag}>; the backup is refused."
        )
    for element in document.iter():
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions carry no configuration
        if element.tag not in elements:
            raise BackupRejected(
                f"The configuration file {shown} contains the element "
                f"<{_element_name(element)}>, which this console does not know (an XInclude "
                "or another foreign element is never restored); the backup is refused."
            )


def _check_hostname(files: dict[str, bytes]) -> None:
    """``etc/HOSTNAME`` must hold one RFC 1123 host name: every page shows it."""
    data = files.get(_HOSTNAME)
    if data is None:
        return
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BackupRejected(
            f"The backup's host name ({_HOSTNAME}) is not ASCII text; the backup is refused."
        ) from exc
    name = text.removesuffix("\n")
    problem = ""
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_HOSTNAME_CHARS:
        problem = f"it is longer than {MAX_HOSTNAME_CHARS} characters"
    else:
        for label in name.split("."):
            if not _HOST_LABEL.fullmatch(label):
                problem = (
                    f"the part {label[:80]!r} is not 1 to 63 letters, digits and hyphens that "
                    "neither start nor end with a hyphen"
                )
                break
    if problem:
        raise BackupRejected(
            f"The backup's host name ({_HOSTNAME}) {name[:80]!r} is not a valid host name: "
            f"{problem}; the backup is refused."
        )


def _check_network(files: dict[str, bytes]) -> None:
    """The network files must be SUSE's, in plain ASCII, and readable as the pages read them."""
    network_files = {name: data for name, data in files.items() if name.startswith(_NETWORK)}
    for relative, data in network_files.items():
        name = relative.removeprefix(_NETWORK)
        key_values = _KEY_VALUE_FILE.fullmatch(name) is not None
        if not key_values and _ROUTES_FILE.fullmatch(name) is None:
            raise BackupRejected(
                f"The backup contains the network file {name[:80]!r}, which is not an interface "
                "configuration (ifcfg-<interface>) or a route table; the backup is refused."
            )
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise BackupRejected(
                f"The backup's network file {name} is not ASCII text; the backup is refused."
            ) from exc
        # split("\n"), not splitlines(): the latter would take a form feed for a line break.
        for number, line in enumerate(text.split("\n"), start=1):
            if any(not (" " <= char <= "~" or char == "\t") for char in line):
                raise BackupRejected(
                    f"The backup's network file {name} has a control character on line "
                    f"{number}; the backup is refused."
                )
            content = line.strip()
            is_setting = key_values and content and not content.startswith("#")
            if is_setting and not _ASSIGNMENT.fullmatch(content):
                raise BackupRejected(
                    f"The backup's network file {name} has line {number}, which is not "
                    "KEY=value; the backup is refused."
                )
    with _scratch_root(network_files) as scratch:
        for relative in network_files:
            name = relative.removeprefix(_NETWORK)
            if not name.startswith("ifcfg-"):
                continue
            try:
                network.read_interface(name.removeprefix("ifcfg-"), scratch)
            except (ApplianceError, ValueError) as exc:
                raise BackupRejected(
                    f"The backup's network file {name} cannot be used: {exc}; the backup is "
                    "refused."
                ) from exc


def _name_problem(kind: str, name: object) -> str:
    """'' when ``name`` is a usable store or object name, else what is wrong with it."""
    if not isinstance(name, str) or not name.strip():
        return f"The backup has a {kind} without a name"
    if len(name) > MAX_NAME_CHARS:
        return f"The backup's {kind} {name[:80]!r}... has a name over {MAX_NAME_CHARS} characters"
    if not name.isprintable():
        return f"The backup's {kind} {name!r} has a control character in its name"
    return ""


def _check_settings(data: bytes) -> dict[str, Any]:
    from appliance.mail.retention import MAX_RETENTION_DAYS

    settings = _loads(data, "appliance settings")
    stores = settings.get("store_retention") if isinstance(settings, dict) else None
    if not isinstance(stores, dict):
        raise BackupRejected("The backup's appliance settings have no store retention.")
    for name, days in stores.items():
        problem = _name_problem("message store", name)
        if problem:
            raise BackupRejected(f"{problem}; the backup is refused.")
        if (
            isinstance(days, bool)
            or not isinstance(days, int)
            or not 1 <= days <= MAX_RETENTION_DAYS
        ):
            raise BackupRejected(
                f"The backup's retention for message store {name[:80]!r} is invalid."
            )
    return settings


@contextlib.contextmanager
def _scratch_root(files: dict[str, bytes]) -> Iterator[Path]:
    """A throwaway appliance root holding ``files``: the appliance's own readers then parse a
    backup exactly as they parse the running configuration, in whichever format it is."""
    with tempfile.TemporaryDirectory(prefix="lmibak-") as scratch:
        base = Path(scratch)
        for relative, data in files.items():
            path = base / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        yield base


def _backup_macros(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """``(object name, appliance path)`` of the $(FILE) macros in a backup's policy objects."""
    from appliance.config.store import list_policy_objects

    with _scratch_root({k: v for k, v in files.items() if k.startswith(_CPE)}) as scratch:
        try:
            objects = list_policy_objects(scratch)
        except ApplianceNotInitialized:
            return []
        except (ApplianceError, ValueError) as exc:
            raise BackupRejected(f"The backup's policy objects cannot be read: {exc}") from exc
    for obj in objects:
        problem = _name_problem("policy object", obj.name)
        if problem:
            raise BackupRejected(f"{problem} (id {obj.id[:80]!r}); the backup is refused.")
    return [(obj.name, obj.file_path) for obj in objects if obj.file_path is not None]


def _check_list_content(object_name: str, relative: str, data: bytes) -> None:
    """A list file is bounded text: lines of printable characters (tabs allowed)."""
    shown = f"The policy object {object_name[:80]!r} reads /{relative[:200]}, which"
    if len(data) > MAX_LIST_BYTES:
        raise BackupRejected(
            f"{shown} is larger than {MAX_LIST_BYTES // (1024 * 1024)} MiB in the backup; "
            "the backup is refused."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BackupRejected(
            f"{shown} is not UTF-8 text in the backup; the backup is refused."
        ) from exc
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.removesuffix("\r").replace("\t", " ").isprintable():
            raise BackupRejected(
                f"{shown} has a control character on line {number} in the backup; the backup "
                "is refused."
            )


def _check_paths(files: dict[str, bytes], root: Path) -> None:
    """Every file must land where a configuration backup may write, inside the appliance.

    A file named by a $(FILE) policy object is restored only under :data:`LIST_DIRS`, as
    bounded text; an object naming any other path may be restored (it reads what is there)
    but never carry that file.
    """
    allowed: dict[str, str] = {}
    for object_name, appliance_path in _backup_macros(files):
        relative = _macro_relative(appliance_path)
        try:
            resolve_inside(root, appliance_path)
        except ValueError as exc:
            raise BackupRejected(
                f"The policy object {object_name[:80]!r} reads {appliance_path[:200]}, which "
                "lies outside the appliance; the backup is refused."
            ) from exc
        if relative is None:
            continue
        if relative in files and not _list_path(relative):
            raise BackupRejected(
                f"The policy object {object_name[:80]!r} reads {appliance_path[:200]}, and the "
                f"backup carries that file: a restore writes list files only under "
                f"{_list_dirs_shown()}; the backup is refused."
            )
        allowed.setdefault(relative, object_name)
    for relative, data in files.items():
        if _config_path(relative):
            pass
        elif relative not in allowed:
            raise BackupRejected(
                f'The backup contains "{relative[:200]}", which no $(FILE) policy object names.'
            )
        else:
            _check_list_content(allowed[relative], relative, data)
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in files:
                raise BackupRejected(
                    f'The backup contains "{relative[:200]}" beneath one of its own files.'
                )
        _check_target(relative, root)


def _check_firmware(header: BackupHeader, running: str) -> None:
    from appliance.firmware.bundle import version_tuple

    try:
        made = version_tuple(header.firmware_version)
    except ValueError as exc:
        raise BackupRejected("The backup names an invalid firmware version.") from exc
    if made > version_tuple(running):
        raise BackupRejected(
            f"This backup was made by firmware {header.firmware_version}; this appliance runs "
            f"{running}. Upgrade the firmware first, then restore it."
        )


def _convert(
    files: dict[str, bytes], source: str, running: str
) -> tuple[dict[str, bytes], str | None]:
    if source == running:
        return files, None
    converter = _configconvert()
    if converter is None:
        raise BackupRejected(
            f"The backup's configuration is in format {source[:40]}, this appliance uses "
            f"{running}, and it cannot convert between them."
        )
    # convert_files converts older formats to the newest it knows, which must be the running one.
    known = tuple(getattr(converter, "CONFIG_FORMATS", ()))
    if (
        source not in known
        or running not in known
        or running != known[-1]
        or known.index(source) > known.index(running)
    ):
        raise BackupRejected(
            f"The backup's configuration format {source[:40]} cannot be converted to {running}."
        )
    try:
        converted = converter.convert_files(dict(files), source)
    except (ApplianceError, ValueError) as exc:
        raise BackupRejected(f"The backup's configuration cannot be converted: {exc}") from exc
    # The converter returns the configuration files in the new format; everything else (the
    # network, the $(FILE) lists) is carried over as it was unless the converter returned it.
    result = {name: data for name, data in files.items() if not name.startswith(_CPE)}
    result.update(converted)
    return result, source


def _load_bytes(data: bytes, name: str, passphrase: str | None, root: Path) -> LoadedBackup:
    if len(data) > MAX_BACKUP_BYTES:
        raise BackupRejected(
            f"The file is larger than {MAX_BACKUP_BYTES // (1024 * 1024)} MiB, too large for a "
            "configuration backup."
        )
    key = _key_or_none(root)
    parsed = _parse(data, name, len(data), key)
    header = parsed.header
    running_firmware = _running_firmware(root)
    _check_firmware(header, running_firmware)
    payload = _decrypt(parsed, data[len(parsed.prefix) :], passphrase)  # unencrypted gzip
    verified = mac_valid(key, parsed.raw, _sha256(payload))
    members = _untar(_gunzip(payload))
    _check_manifest(members, header)
    files = {
        name.removeprefix("files/"): content
        for name, content in members.items()
        if name.startswith("files/")
    }
    if not any(name.startswith(_CPE) for name in files):
        raise BackupRejected("The backup holds no configuration files.")
    _check_xml(files)
    _check_hostname(files)
    _check_network(files)
    settings = _check_settings(members["appliance_settings.json"])
    console = _loads(members["console.json"], "console settings")
    if not isinstance(console, dict):
        raise BackupRejected("The backup's console settings are not a JSON object.")
    files, converted_from = _convert(files, header.config_format, _running_config_format(root))
    if converted_from is not None:
        _check_xml(files)
    _check_paths(files, root)
    return LoadedBackup(header, files, settings, console, converted_from, verified)


def backup_load(
    name: str, *, passphrase: str | None = None, root: Path | None = None
) -> LoadedBackup:
    """Read, decrypt and fully validate a stored backup (nothing on the appliance changes).

    Raises :class:`BackupRejected` (with the reason) for anything hostile, damaged or
    unsupported, :class:`PassphraseRequired` / :class:`WrongPassphrase` for encrypted ones,
    ``KeyError`` when there is no such backup.
    """
    base = appliance_root(root)
    path = backup_path(name, base)
    if path.stat().st_size > MAX_BACKUP_BYTES:
        raise BackupRejected("The backup is larger than a configuration backup can be.")
    return _load_bytes(path.read_bytes(), name, passphrase, base)


def _read_limited(data_or_fileobj: bytes | BinaryIO) -> bytes:
    if isinstance(data_or_fileobj, bytes | bytearray):
        data = bytes(data_or_fileobj)
    else:
        chunks = []
        size = 0
        while size <= MAX_BACKUP_BYTES:
            chunk = data_or_fileobj.read(1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    if len(data) > MAX_BACKUP_BYTES:
        raise BackupRejected(
            f"The file is larger than {MAX_BACKUP_BYTES // (1024 * 1024)} MiB, too large for a "
            "configuration backup."
        )
    return data


def backup_import(
    data_or_fileobj: bytes | BinaryIO,
    *,
    filename: str,
    uploaded_by: str,
    root: Path | None = None,
) -> BackupHeader:
    """Keep an uploaded backup if it passes the checks; otherwise nothing is stored.

    Unencrypted uploads are validated completely here; encrypted ones as far as possible without
    the passphrase (header, size, parameters) and completely at diff or restore time. The file
    is stored byte for byte as uploaded, under a new name of ours (the uploaded ``filename`` is
    never used as a path). ``uploaded_by`` is for the caller's event; the file keeps its maker.
    """
    del filename, uploaded_by  # the caller records them in its event
    base = appliance_root(root)
    data = _read_limited(data_or_fileobj)
    name_probe = "upload-probe.lmibak"
    key = _key_or_none(base)
    parsed = _parse(data, name_probe, len(data), key)
    if parsed.header.encrypted:
        _check_firmware(parsed.header, _running_firmware(base))
    else:
        _load_bytes(data, name_probe, None, base)
    directory = layout(base).config_backups_dir
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock"):
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        while True:
            name = f"upload-{stamp}-{secrets.token_hex(3)}{SUFFIX}"
            if not (directory / name).exists():
                break
        atomic_write_bytes(directory / name, data, 0o600)
    return _parse_header(data, name, len(data), key)


# --- Diff -----------------------------------------------------------------------------------


def _items(section: str, before: dict[str, str], after: dict[str, str]) -> list[DiffItem]:
    items = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        change = "added" if old is None else "removed" if new is None else "changed"
        items.append(DiffItem(section, key, change, old, new))
    return items


def _describe_objects(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({name: "type: value [file]"}, {id: name})`` of a root's policy objects."""
    from appliance.config.policy import object_file
    from appliance.config.store import list_policy_objects

    try:
        objects = list_policy_objects(root)
    except (ApplianceError, ValueError):
        return {}, {}
    described: dict[str, str] = {}
    for obj in objects:
        text = f"{obj.type}: {obj.value}"
        if obj.file_path is not None:
            try:
                content = object_file(obj, root).read_bytes()
                lines = len(content.decode("utf-8", "replace").splitlines())
                text += f" ({lines} lines, sha256 {_sha256(content)[:12]})"
            except (OSError, ValueError):
                text += " (file missing)"
        described[obj.name] = text
    return described, {obj.id: obj.name for obj in objects}


def _describe_policy(root: Path, names: dict[str, str]) -> dict[str, str]:
    from appliance.config.store import read_mail_policy

    try:
        policy = read_mail_policy(root)
    except (ApplianceError, ValueError):
        return {}
    described: dict[str, str] = {}
    counts: dict[str, int] = {}
    for rule in policy.rules:
        key = f"{rule.type} {names.get(rule.object_id, rule.object_id)}"
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
            key += f" #{counts[key]}"
        parts = []
        if rule.threshold is not None:
            parts.append(f"threshold {rule.threshold:g}")
        if rule.senders_id is not None:
            parts.append(f"senders {names.get(rule.senders_id, rule.senders_id)}")
        described[key] = ", ".join(parts) or "on"
    for verdict, store in policy.quarantine.items():
        described[f"quarantine {verdict}"] = names.get(store, store)
    return described


def _describe_smtp(root: Path) -> dict[str, str]:
    from appliance.config.store import read_smtp_settings

    try:
        smtp = read_smtp_settings(root)
    except (ApplianceError, ValueError):
        return {}
    return {key: str(value) for key, value in dataclasses.asdict(smtp).items()}


def _describe_network(root: Path) -> dict[str, str]:
    described: dict[str, str] = {}
    for path in _plain_files(layout(root).network_dir, "*"):
        text = path.read_bytes().decode("utf-8", "replace")
        if path.name.startswith("ifcfg-"):
            interface = path.name.removeprefix("ifcfg-")
            for key, value in parse_key_values(text).items():
                described[f"{interface} {key}"] = value
        else:
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    described[f"{path.name}: {line}"] = "present"
    return described


def _described_hostname(the_layout: Layout) -> str:
    # Restoring a good backup is how a damaged host name is repaired, so the diff shows it.
    try:
        return _hostname(the_layout)
    except MalformedApplianceFile as exc:
        return f"({exc})"


def _describe(root: Path, retention: dict[str, int]) -> dict[str, dict[str, str]]:
    objects, names = _describe_objects(root)
    return {
        "Policy objects": objects,
        "Mail policy": _describe_policy(root, names),
        "SMTP settings": _describe_smtp(root),
        "Network": _describe_network(root),
        "Host name": {"hostname": _described_hostname(layout(root))}
        if layout(root).hostname_file.is_file()
        else {},
        "Message store retention": {name: f"{days} days" for name, days in retention.items()},
    }


def backup_diff(loaded: LoadedBackup, root: Path | None = None) -> list[DiffItem]:
    """What a restore of ``loaded`` would change, object by object, section by section.

    ``before`` is the running value, ``after`` the backup's. Message stores that the backup does
    not name keep their retention, so they are not listed.
    """
    base = appliance_root(root)
    running_retention = _store_retention(base)
    backup_retention = dict(loaded.appliance_settings.get("store_retention", {}))
    running = _describe(base, {k: v for k, v in running_retention.items() if k in backup_retention})
    with _scratch_root(loaded.files) as scratch:
        restored = _describe(scratch, backup_retention)
    items: list[DiffItem] = []
    for section in running:
        items += _items(section, running[section], restored[section])
    # A whole configuration file of a kind the diff does not parse: compare it as a whole.
    current_cpe = {
        p.name: _sha256(p.read_bytes()) for p in _plain_files(layout(base).cpe_dir, "*.xml")
    }
    backup_cpe = {
        name.removeprefix(_CPE): _sha256(data)
        for name, data in loaded.files.items()
        if name.startswith(_CPE)
    }
    if not items and current_cpe != backup_cpe:
        items += _items(
            "Configuration files",
            {k: f"sha256 {v[:12]}" for k, v in current_cpe.items()},
            {k: f"sha256 {v[:12]}" for k, v in backup_cpe.items()},
        )
    return items


# --- Restore ---------------------------------------------------------------------------------


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sidecar(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}{suffix}")


def _rename_into_place(source: Path, target: Path) -> None:
    """One step of applying a restore (its own function so tests can interrupt between steps)."""
    os.replace(source, target)


def _apply_retention(root: Path, stores: dict[str, int]) -> int:
    """Set every named store's retention in one transaction; missing stores are created."""
    if not stores or not layout(root).msgstore_db.is_file():
        return 0
    conn = msgstore.connect(root)
    try:
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            changed = 0
            for name, days in stores.items():
                row = conn.execute(
                    "SELECT retention_days FROM message_store WHERE name = ?", (name,)
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO message_store (name, retention_days) VALUES (?, ?)",
                        (name, days),
                    )
                    changed += 1
                elif int(row[0]) != days:
                    conn.execute(
                        "UPDATE message_store SET retention_days = ? WHERE name = ?", (days, name)
                    )
                    changed += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise BackupError(f"The message stores' retention could not be restored: {exc}") from exc
    finally:
        conn.close()
    return changed


def _journal_write(the_layout: Layout, journal: dict[str, Any]) -> None:
    the_layout.config_restore_journal.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        the_layout.config_restore_journal, json.dumps(journal, indent=2) + "\n", 0o600
    )


def _roll_forward(root: Path, journal: dict[str, Any]) -> None:
    """Finish a committed restore; every step is idempotent, so a second crash is harmless."""
    directories: set[Path] = set()
    for op in journal["write"]:
        target, staged = root / op["target"], root / op["staged"]
        if staged.exists():
            _rename_into_place(staged, target)
        directories.add(target.parent)
    for op in journal["remove"]:
        target, old = root / op["target"], root / op["old"]
        if target.exists() and not old.exists():
            _rename_into_place(target, old)
        directories.add(target.parent)
    for directory in directories:
        fsync_dir(directory)
    _apply_retention(root, journal["store_retention"])
    _discard(root, journal)


def _roll_back(root: Path, journal: dict[str, Any]) -> None:
    """Undo a restore that failed with an error (not a crash): put every old file back."""
    for op in journal["remove"]:
        target, old = root / op["target"], root / op["old"]
        if old.exists() and not target.exists():
            os.replace(old, target)
    for op in journal["write"]:
        target, staged = root / op["target"], root / op["staged"]
        old = root / op["old"] if op["old"] else None
        if old is not None and old.exists():
            os.replace(old, target)
        elif old is None and not staged.exists():
            target.unlink(missing_ok=True)  # it did not exist before the restore
        staged.unlink(missing_ok=True)
    _discard(root, journal)


def _discard(root: Path, journal: dict[str, Any]) -> None:
    """Remove the leftovers (staged files, old copies) and then the journal itself."""
    for op in journal["write"]:
        (root / op["staged"]).unlink(missing_ok=True)
        if op["old"]:
            (root / op["old"]).unlink(missing_ok=True)
    for op in journal["remove"]:
        (root / op["old"]).unlink(missing_ok=True)
    the_layout = layout(root)
    the_layout.config_restore_journal.unlink(missing_ok=True)
    fsync_dir(the_layout.config_restore_journal.parent)


def _recover_locked(root: Path) -> bool:
    the_layout = layout(root)
    try:
        journal = json.loads(the_layout.config_restore_journal.read_bytes())
    except FileNotFoundError:
        return False
    except ValueError as exc:
        raise BackupError(
            f"The interrupted restore's journal {the_layout.config_restore_journal} is damaged."
        ) from exc
    if journal.get("state") == "committed":
        _roll_forward(root, journal)
        return True
    _roll_back(root, journal)  # interrupted while staging: nothing was replaced yet
    return False


def restore_recover(root: Path | None = None) -> bool:
    """Finish a restore that a crash interrupted; True when one was rolled forward.

    A restore interrupted before its journal said "committed" had not replaced anything, so its
    staged files are removed instead. Safe to call at any time (workers call it on start).
    """
    base = appliance_root(root)
    the_layout = layout(base)
    if not the_layout.config_restore_journal.exists():
        return False
    with exclusive_lock(the_layout.config_restore_lock):
        return _recover_locked(base)


def _plan(loaded: LoadedBackup, root: Path) -> tuple[list[tuple[str, Path, bytes]], list[Path]]:
    """``(files to write, files to remove)``, checked against the appliance as it is now."""
    the_layout = layout(root)
    writes: list[tuple[str, Path, bytes]] = []
    for relative, data in sorted(loaded.files.items()):
        target = _check_target(relative, root)
        for parent in target.parents:
            if parent == root:
                break
            if parent.exists() and not parent.is_dir():
                raise BackupRejected(
                    f'The backup\'s "{relative[:200]}" would be written beneath a file.'
                )
        if target.is_file() and target.read_bytes() == data:
            continue
        writes.append((relative, target, data))
    keep = {root / relative for relative in loaded.files}
    removes = [
        path
        for path in [
            *_plain_files(the_layout.cpe_dir, "*.xml"),
            *_plain_files(the_layout.network_dir, "*"),
        ]
        if path not in keep
    ]
    return writes, removes


def restore_plan(loaded: LoadedBackup, root: Path | None = None) -> RestorePlan:
    """The files a restore of ``loaded`` would write and remove now (nothing changes).

    This is the list an administrator confirms before an unverified backup is restored.
    """
    base = Path(os.path.realpath(appliance_root(root)))
    writes, removes = _plan(loaded, base)
    return RestorePlan(
        writes=[relative for relative, _, _ in writes],
        removes=[path.relative_to(base).as_posix() for path in removes],
    )


def _check_confirmed(
    loaded: LoadedBackup, writes: list[tuple[str, Path, bytes]], confirmed: Collection[str]
) -> None:
    """An unverified backup writes only files an administrator saw listed and confirmed."""
    if loaded.verified:
        return
    planned = [relative for relative, _, _ in writes]
    unconfirmed = [relative for relative in planned if relative not in confirmed]
    if unconfirmed or not confirmed:
        raise ConfirmationRequired(
            "This backup is unverified: it was not made by this appliance, or it was changed "
            "since. Check the files it will write and confirm them to restore it: "
            + (", ".join("/" + relative for relative in planned[:50]) or "(none)")
            + (f" and {len(planned) - 50} more" if len(planned) > 50 else "")
            + ".",
            planned,
        )


def backup_restore(
    loaded: LoadedBackup, root: Path | None = None, *, confirmed: Collection[str] = ()
) -> RestoreResult:
    """Make the appliance's configuration the backup's, all or nothing.

    Every new file is first written next to its target and synced; a journal (synced) then
    records the plan and is marked committed; only then are files renamed into place, the store
    retention set in one transaction and files the backup lacks removed (in the configuration
    and network directories only). An error rolls everything back; a crash is rolled forward by
    :func:`restore_recover` from the journal. Restores are serialised with a lock.

    An unverified backup (see :mod:`appliance.config.backupmac`) is restored only when ``confirmed``
    holds every file the plan writes, as :func:`restore_plan` listed them
    (:class:`ConfirmationRequired` otherwise, nothing changed).
    """
    base = Path(os.path.realpath(appliance_root(root)))
    the_layout = layout(base)
    the_layout.config_restore_lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(the_layout.config_restore_lock):
        _recover_locked(base)
        writes, removes = _plan(loaded, base)
        _check_confirmed(loaded, writes, confirmed)
        stores = dict(loaded.appliance_settings.get("store_retention", {}))
        current = _store_retention(base)
        stores_updated = sum(1 for name, days in stores.items() if current.get(name) != days)
        journal: dict[str, Any] = {
            "state": "staging",
            "backup": loaded.header.name,
            "write": [
                {
                    "target": target.relative_to(base).as_posix(),
                    "staged": _sidecar(target, _STAGED).relative_to(base).as_posix(),
                    "old": _sidecar(target, _OLD).relative_to(base).as_posix()
                    if target.exists()
                    else None,
                }
                for _, target, _ in writes
            ],
            "remove": [
                {
                    "target": path.relative_to(base).as_posix(),
                    "old": _sidecar(path, _OLD).relative_to(base).as_posix(),
                }
                for path in removes
            ],
            "store_retention": stores,
        }
        resolved = base
        _journal_write(the_layout, journal)
        try:
            directories: set[Path] = set()
            for (_, target, data), op in zip(writes, journal["write"], strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
                _write_synced(resolved / op["staged"], data, mode)
                if op["old"]:
                    old = resolved / op["old"]
                    old.unlink(missing_ok=True)
                    os.link(target, old)
                directories.add(target.parent)
            for directory in directories:
                fsync_dir(directory)
        except BaseException:
            _roll_back(resolved, journal)
            raise
        journal["state"] = "committed"
        _journal_write(the_layout, journal)
        try:
            _roll_forward(resolved, journal)
        except Exception:
            _roll_back(resolved, journal)
            _apply_retention(base, {k: v for k, v in current.items() if k in stores})
            raise
    return RestoreResult(
        files_written=len(writes),
        files_removed=len(removes),
        stores_updated=stores_updated,
        converted_from=loaded.converted_from,
    )
