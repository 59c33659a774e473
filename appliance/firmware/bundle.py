"""Signed firmware bundles: the one file an update downloads, verifies and installs.

A bundle is a single file::

    b"LMIFW\\x00\\x01\\n"       8 bytes: magic, format 1, newline
    length                      4 bytes, big-endian: length of the manifest (at most 64 KiB)
    manifest                    UTF-8 JSON, canonical (sorted keys, no spaces)
    signature                   64 bytes: Ed25519 over exactly the manifest bytes
    payload                     an uncompressed POSIX tar of the new system image

The manifest carries the payload's size and SHA-256, so the signature covers the whole file.
Following the update engines we learn from (UPGRADE-SAFETY.md, "Verify before use"), nothing
in the manifest is looked at before its signature holds against a key this console trusts, the
payload is hashed in full before any of it is used, and the tar's members are checked (no
absolute paths, no ``..``, no hard links, no device nodes, no symbolic links that leave the
image, bounded counts and sizes) both before extraction and again while extracting, on the very
bytes being extracted, which are hashed once more so a file swapped after verification is caught.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from appliance.system.atomic import atomic_open, fsync_dir
from appliance.system.errors import ApplianceError

logger = logging.getLogger(__name__)

MAGIC = b"LMIFW\x00\x01\n"
FORMAT = 1
PRODUCT = "lmi-firmware"
_MAGIC_PREFIX = MAGIC[:6]  # everything before the format byte
_LENGTH = struct.Struct(">I")
SIGNATURE_SIZE = 64
MAX_MANIFEST = 64 * 1024
MAX_PAYLOAD = 8 * 1024**3
MAX_MEMBERS = 100_000
MAX_MEMBER_NAME = 4096
READ_SIZE = 1024 * 1024
# Report hashing progress at most this often (plus at the start and the end).
_PROGRESS_STEP = 4 * 1024 * 1024
# Every member of a built payload gets this modification time (2013-10-01 00:00 UTC, the 2.8.1
# release), so the same tree always gives the same tar.
TAR_MTIME = 1_380_585_600

_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,7}")
_FORMAT_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,31}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SIGNED_KEY_ID = re.compile(rb'"key_id":"([0-9a-f]{16})"')

_FIELDS: dict[str, type] = {
    "format": int,
    "product": str,
    "version": str,
    "min_version": str,
    "msgstore_format": str,
    "config_format": str,
    "os_release": str,
    "payload_size": int,
    "payload_sha256": str,
    "release_notes": str,
    "key_id": str,
    "created_at": str,
}

Progress = Callable[[int, int], None]


class BundleError(ApplianceError):
    """A firmware bundle cannot be used; the message says why in an administrator's words."""


class BundleFormatError(BundleError, ValueError):
    """Not a bundle, an unknown bundle format, or a manifest with missing or invalid fields."""


class BundleSignatureError(BundleError):
    """Unsigned, signed by a key this console does not trust, or altered after signing."""


class BundleTooLarge(BundleError):
    """The manifest or the payload is larger than this console accepts."""


class BundleDigestMismatch(BundleError):
    """The file is incomplete, or the payload's size or SHA-256 differs from the manifest."""


class BundleUnsafePath(BundleError):
    """A member of the system image could write outside it, or the image exceeds the limits."""


@dataclass(frozen=True)
class BundleManifest:
    """The signed description of a bundle, plus where its payload lies in the file."""

    format: int
    version: str
    min_version: str
    msgstore_format: str
    config_format: str
    os_release: str
    payload_size: int
    payload_sha256: str
    release_notes: str
    key_id: str
    created_at: str
    header_size: int
    total_size: int


# --- Keys ---------------------------------------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.8.1.0"`` → ``(2, 8, 1, 0)``; ``ValueError`` for anything else.

    Up to eight numbers separated by dots, without leading zeros (so that equal versions are
    spelled alike).
    """
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ValueError(
            f"{version!r} is not a firmware version (numbers separated by dots, like 2.8.1.0)"
        )
    return tuple(int(part) for part in version.split("."))


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 signing key: (private key, public key), raw 32 bytes each."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    """The raw public key belonging to a raw private key."""
    return _private_key(private_key).public_key().public_bytes_raw()


def key_id(public: bytes) -> str:
    """The short name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def public_key_b64(public: bytes) -> str:
    """The base64 form of a raw public key, as LMI_TRUSTED_KEYS and ``*.pub`` files hold it."""
    return base64.b64encode(public).decode("ascii")


def decode_key(text: str) -> bytes:
    """Decode one base64 key (private or public) into its raw 32 bytes; ``ValueError`` if not."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError("not valid base64") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 key has 32 bytes, this one has {len(raw)}")
    return raw


def read_key_file(path: Path) -> bytes:
    """Read a key file of one base64 line (``vendor.key`` or a ``*.pub``) into raw bytes."""
    try:
        return decode_key(Path(path).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} does not hold an Ed25519 key: {exc}") from exc


def trusted_keys() -> list[bytes]:
    """The public keys this console trusts: ``settings.TRUSTED_KEYS`` and ``*.pub`` files.

    A bad entry (not base64, not 32 bytes, unreadable) is skipped with a warning rather than
    stopping every update check; duplicates are dropped.
    """
    from django.conf import settings

    keys: list[bytes] = []
    for index, text in enumerate(getattr(settings, "TRUSTED_KEYS", None) or []):
        try:
            keys.append(decode_key(text))
        except ValueError as exc:
            logger.warning("Ignoring entry %d of LMI_TRUSTED_KEYS: %s", index + 1, exc)
    directory = getattr(settings, "TRUSTED_KEYS_DIR", None)
    if directory:
        try:
            paths = sorted(Path(directory).glob("*.pub"))
        except OSError as exc:
            logger.warning("Cannot list trusted keys in %s: %s", directory, exc)
            paths = []
        for path in paths:
            try:
                keys.append(read_key_file(path))
            except ValueError as exc:
                logger.warning("Ignoring trusted key file: %s", exc)
    unique: list[bytes] = []
    for key in keys:
        if key not in unique:
            unique.append(key)
    return unique


def _private_key(raw: bytes) -> Ed25519PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("an Ed25519 private key is 32 raw bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def canonical_json(value: Any) -> bytes:
    """The one byte form a signature covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signing_key_for(message: bytes, signature: bytes, keys: list[bytes]) -> bytes | None:
    """The trusted key whose signature ``signature`` is over ``message``, or None."""
    for key in keys:
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
        except (InvalidSignature, ValueError):
            continue
        return key
    return None


# --- Reading the header -------------------------------------------------------------------


def read_manifest(
    path: Path, keys: list[bytes] | None = None, *, partial: bool = False
) -> BundleManifest:
    """Read and check a bundle's header only, without reading the payload.

    The magic and the manifest length are checked, then the signature against ``keys``
    (default: :func:`trusted_keys`) before any manifest field is parsed or used, then the
    fields. The file's size must equal header plus payload; with ``partial=True`` (a download in
    progress) it may be smaller, though never smaller than the header: a file that ends inside
    the header raises :class:`BundleDigestMismatch` ("incomplete"), so a downloader can simply
    try again once more bytes are in.
    """
    with open(path, "rb") as handle:
        return _read_header(handle, keys, partial=partial)


def read_manifest_unverified(path: Path) -> BundleManifest:
    """Vendor side only: read a complete bundle's manifest WITHOUT checking who signed it.

    Used to publish a bundle on a machine that need not trust the vendor key. Everything else is
    checked as in :func:`read_manifest`; never use this to decide whether to install.
    """
    with open(path, "rb") as handle:
        return _read_header(handle, None, partial=False, check_signature=False)


def _read_exactly(handle: BinaryIO, size: int, where: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise BundleDigestMismatch(
            f"The bundle file is incomplete: it ends inside its {where}. Download it again."
        )
    return data


def _read_header(
    handle: BinaryIO,
    keys: list[bytes] | None,
    *,
    partial: bool,
    check_signature: bool = True,
) -> BundleManifest:
    file_size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    magic = handle.read(len(MAGIC))
    if not magic:
        raise BundleDigestMismatch("The bundle file is empty. Download it again.")
    prefix = min(len(magic), len(_MAGIC_PREFIX))
    if magic[:prefix] != _MAGIC_PREFIX[:prefix]:
        raise BundleFormatError("This file is not an LMI firmware bundle (wrong magic bytes).")
    if len(magic) < len(MAGIC):
        raise BundleDigestMismatch(
            "The bundle file is incomplete: it ends inside its magic bytes. Download it again."
        )
    if magic[7:] != MAGIC[7:]:
        raise BundleFormatError("This file is not an LMI firmware bundle (wrong magic bytes).")
    if magic[6] != FORMAT:
        raise BundleFormatError(
            f"This bundle uses format {magic[6]}; this console reads format {FORMAT} only."
        )
    (length,) = _LENGTH.unpack(_read_exactly(handle, _LENGTH.size, "manifest length"))
    if length > MAX_MANIFEST:
        raise BundleTooLarge(
            f"The bundle's manifest claims {length} bytes; this console accepts at most "
            f"{MAX_MANIFEST} bytes."
        )
    if length < 2:
        raise BundleFormatError("The bundle's manifest is empty.")
    manifest_bytes = _read_exactly(handle, length, "manifest")
    signature = _read_exactly(handle, SIGNATURE_SIZE, "signature")
    header_size = len(MAGIC) + _LENGTH.size + length + SIGNATURE_SIZE

    signer: bytes | None = None
    if check_signature:
        signer = _check_signature(manifest_bytes, signature, keys)
    manifest = _manifest_from_bytes(manifest_bytes, header_size)
    if signer is not None and manifest.key_id != key_id(signer):
        raise BundleFormatError(
            f"The manifest names signing key {manifest.key_id}, but it was signed with key "
            f"{key_id(signer)}."
        )
    _check_file_size(file_size, manifest, partial=partial)
    return manifest


def _check_signature(manifest: bytes, signature: bytes, keys: list[bytes] | None) -> bytes:
    """Return the trusted key that signed ``manifest``, or raise :class:`BundleSignatureError`."""
    if keys is None:
        keys = trusted_keys()
    if not any(signature):
        raise BundleSignatureError(
            "The bundle is not signed; this console installs only signed firmware."
        )
    if not keys:
        raise BundleSignatureError(
            "This console trusts no signing keys, so it cannot verify the bundle: add the "
            "vendor's public key to LMI_TRUSTED_KEYS or TRUSTED_KEYS_DIR."
        )
    signer = signing_key_for(manifest, signature, keys)
    if signer is not None:
        return signer
    # The verdict is already "refused"; the unauthenticated key id only picks the wording.
    claimed = _SIGNED_KEY_ID.search(manifest)
    trusted_ids = {key_id(key) for key in keys}
    if claimed is not None and claimed.group(1).decode() not in trusted_ids:
        raise BundleSignatureError(
            f"The bundle is signed by a key this console does not trust "
            f"(key id {claimed.group(1).decode()})."
        )
    raise BundleSignatureError(
        "The bundle's signature does not match its manifest: the bundle was altered after it "
        "was signed."
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f'the field "{key}" appears twice')
        result[key] = value
    return result


def _manifest_from_bytes(data: bytes, header_size: int) -> BundleManifest:
    try:
        fields = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleFormatError(f"The bundle's manifest is not valid JSON: {exc}.") from exc
    if not isinstance(fields, dict):
        raise BundleFormatError("The bundle's manifest is not a JSON object.")
    if canonical_json(fields) != data:
        raise BundleFormatError(
            "The bundle's manifest is not in canonical form (sorted keys, no spaces)."
        )
    return manifest_from_fields(fields, header_size)


def manifest_from_fields(fields: dict[str, Any], header_size: int) -> BundleManifest:
    """Validate manifest fields and return the manifest (``BundleFormatError`` names the field)."""
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise BundleFormatError(f'The bundle\'s manifest lacks the field "{missing[0]}".')
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise BundleFormatError(f'The bundle\'s manifest has an unknown field "{unknown[0]}".')
    for name, kind in _FIELDS.items():
        value = fields[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = "a number" if kind is int else "a string"
            raise BundleFormatError(f'The manifest field "{name}" must be {expected}.')
    if fields["format"] != FORMAT:
        raise BundleFormatError(
            f"This bundle's manifest has format {fields['format']}; this console reads format "
            f"{FORMAT} only."
        )
    if fields["product"] != PRODUCT:
        raise BundleFormatError(
            f'This bundle is for "{fields["product"][:60]}", not for this product ({PRODUCT}).'
        )
    for name in ("version", "min_version"):
        try:
            version_tuple(fields[name])
        except ValueError:
            raise BundleFormatError(
                f'The manifest field "{name}" is not a firmware version like 2.8.1.0.'
            ) from None
    if version_tuple(fields["min_version"]) > version_tuple(fields["version"]):
        raise BundleFormatError(
            f"The bundle requires firmware {fields['min_version']} or later, which is newer than "
            f"the version it installs ({fields['version']})."
        )
    for name in ("msgstore_format", "config_format"):
        if not _FORMAT_NAME.fullmatch(fields[name]):
            raise BundleFormatError(
                f'The manifest field "{name}" must be a short format name such as 2.8.1.'
            )
    os_release = fields["os_release"]
    if not os_release or len(os_release) > 200 or _CONTROL.search(os_release):
        raise BundleFormatError(
            'The manifest field "os_release" must be one line of at most 200 characters.'
        )
    size = fields["payload_size"]
    if size > MAX_PAYLOAD:
        raise BundleTooLarge(
            f"The bundle's system image has {size} bytes; this console accepts at most "
            f"{MAX_PAYLOAD} bytes (8 GiB)."
        )
    if size < 1024 or size % 512:
        raise BundleFormatError(
            f'The manifest field "payload_size" ({size}) is not the size of a tar archive.'
        )
    if not _SHA256.fullmatch(fields["payload_sha256"]):
        raise BundleFormatError(
            'The manifest field "payload_sha256" must be 64 lowercase hexadecimal digits.'
        )
    if not _KEY_ID.fullmatch(fields["key_id"]):
        raise BundleFormatError(
            'The manifest field "key_id" must be 16 lowercase hexadecimal digits.'
        )
    try:
        datetime.fromisoformat(fields["created_at"])
    except ValueError:
        raise BundleFormatError(
            'The manifest field "created_at" is not an ISO 8601 date and time.'
        ) from None
    return BundleManifest(
        format=fields["format"],
        version=fields["version"],
        min_version=fields["min_version"],
        msgstore_format=fields["msgstore_format"],
        config_format=fields["config_format"],
        os_release=os_release,
        payload_size=size,
        payload_sha256=fields["payload_sha256"],
        release_notes=fields["release_notes"],
        key_id=fields["key_id"],
        created_at=fields["created_at"],
        header_size=header_size,
        total_size=header_size + size,
    )


def _check_file_size(file_size: int, manifest: BundleManifest, *, partial: bool) -> None:
    if file_size > manifest.total_size:
        raise BundleDigestMismatch(
            f"The bundle file has {file_size - manifest.total_size} unexpected bytes after its "
            f"system image ({file_size} bytes instead of {manifest.total_size})."
        )
    if file_size < manifest.total_size and not partial:
        raise BundleDigestMismatch(
            f"The bundle file is incomplete: it has {file_size} of {manifest.total_size} bytes. "
            "Download it again."
        )


# --- The payload --------------------------------------------------------------------------


class _PayloadView:
    """The payload region of an open bundle as a file of its own (offset 0 = payload start).

    Reads never go past the payload. With ``digest`` set, every byte read is hashed, which is
    how extraction proves it unpacked exactly the verified bytes.
    """

    def __init__(self, handle: BinaryIO, start: int, size: int, digest: Any = None) -> None:
        self._handle = handle
        self._start = start
        self._size = size
        self._pos = 0
        self._digest = digest
        self._hashed = 0  # with a digest: bytes hashed so far (reads are then sequential)
        handle.seek(start)

    def read(self, size: int = -1) -> bytes:
        remaining = self._size - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        self._handle.seek(self._start + self._pos)
        data = self._handle.read(size)
        if self._digest is not None:
            if self._pos != self._hashed:
                raise BundleError("The payload was not read in order while being hashed.")
            self._digest.update(data)
            self._hashed += len(data)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            offset += self._size
        self._pos = max(0, min(offset, self._size))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def drain(self) -> bytes:
        """Read what is left; return its first block holding anything but zero bytes, or b""."""
        nonzero = b""
        while chunk := self.read(READ_SIZE):
            if not nonzero and chunk.count(0) != len(chunk):
                nonzero = chunk
        return nonzero


def _hash_payload(handle: BinaryIO, manifest: BundleManifest, progress: Progress | None) -> None:
    """Hash the payload in one pass of large reads and compare size and SHA-256."""
    total = manifest.payload_size
    digest = hashlib.sha256()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    handle.seek(manifest.header_size)
    done = 0
    reported = 0
    if progress is not None:
        progress(0, total)
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(handle.fileno(), manifest.header_size, total, os.POSIX_FADV_SEQUENTIAL)
    while done < total:
        count = handle.readinto(view[: min(READ_SIZE, total - done)])
        if not count:
            break
        digest.update(view[:count])
        done += count
        if progress is not None and done - reported >= _PROGRESS_STEP:
            progress(done, total)
            reported = done
    if progress is not None and reported != done:
        progress(done, total)
    if done != total or handle.read(1):
        raise BundleDigestMismatch(
            f"The bundle's system image has {done} bytes instead of the {total} its manifest "
            "states. Download it again."
        )
    if not hmac.compare_digest(digest.hexdigest(), manifest.payload_sha256):
        raise BundleDigestMismatch(
            "The bundle's system image does not match the SHA-256 in its signed manifest: the "
            "file was damaged or altered. Download it again."
        )


class _MemberChecker:
    """Refuses tar members that could write outside the image or exceed the limits.

    Stricter than tarfile's "data" filter, and independent of what is already on disk: no
    absolute names, no ``..``, no duplicates, nothing stored beneath a symbolic link or a file,
    symbolic links only relative and only with leading ``..`` that stay inside the image (so a
    link followed by ``..`` can never climb out), and no hard links, devices, FIFOs or sparse
    files.
    """

    def __init__(self) -> None:
        self.members = 0
        self.unpacked = 0
        self._names: set[str] = set()
        self._kinds: dict[str, str] = {}  # path → "dir" | "file" | "symlink"

    def check(self, info: tarfile.TarInfo) -> None:
        name = info.name
        shown = name[:200]
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise BundleUnsafePath(
                f"The system image has more than {MAX_MEMBERS:,} entries, more than this "
                "console unpacks."
            )
        if (
            not name
            or "\x00" in name
            or len(name.encode("utf-8", "surrogateescape")) > (MAX_MEMBER_NAME)
        ):
            raise BundleUnsafePath(
                "The system image contains an entry with an empty, invalid or overlong name."
            )
        if name.startswith("/"):
            raise BundleUnsafePath(
                f'The system image contains "{shown}", an absolute path; every entry must be '
                "relative to the image."
            )
        raw_parts = name.split("/")
        if ".." in raw_parts:
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a path with "..", which could write '
                "outside the image."
            )
        parts = [part for part in raw_parts if part not in ("", ".")]
        if info.islnk():
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a hard link; a firmware image may hold '
                "only files, directories and symbolic links."
            )
        if info.ischr() or info.isblk() or info.isfifo():
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a device node or FIFO; a firmware image '
                "may hold only files, directories and symbolic links."
            )
        if info.issparse() or not (info.isreg() or info.isdir() or info.issym()):
            raise BundleUnsafePath(
                f'The system image contains "{shown}", an entry of an unsupported type.'
            )
        if not parts:
            if not info.isdir():
                raise BundleUnsafePath("The system image's top entry is not a directory.")
            return
        path = "/".join(parts)
        if path in self._names:
            raise BundleUnsafePath(
                f'The system image contains "{shown}" twice; a later copy could replace what '
                "was checked."
            )
        self._names.add(path)
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            kind = self._kinds.setdefault(parent, "dir")
            if kind != "dir":
                raise BundleUnsafePath(
                    f'The system image places "{shown}" beneath "{parent[:200]}", which is a '
                    f"{'symbolic link' if kind == 'symlink' else 'file'}, not a directory."
                )
        existing = self._kinds.get(path)
        kind = "dir" if info.isdir() else "symlink" if info.issym() else "file"
        if existing is not None and (existing != "dir" or kind != "dir"):
            raise BundleUnsafePath(
                f'The system image contains "{shown}" as a {kind} where it already has a '
                "directory of that name."
            )
        self._kinds[path] = kind
        if info.issym():
            self._check_link(info.linkname, parts, shown)
        elif info.isreg():
            self.unpacked += info.size
            if self.unpacked > MAX_PAYLOAD:
                raise BundleUnsafePath(
                    "The system image would unpack to more than 8 GiB, more than this console "
                    "accepts."
                )

    @staticmethod
    def _check_link(target: str, parts: list[str], shown: str) -> None:
        if not target or "\x00" in target or len(target) > MAX_MEMBER_NAME:
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a symbolic link with an invalid target.'
            )
        if target.startswith("/"):
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a symbolic link to the absolute path '
                f'"{target[:200]}"; links must stay inside the image.'
            )
        target_parts = [part for part in target.split("/") if part not in ("", ".")]
        climbs = 0
        while climbs < len(target_parts) and target_parts[climbs] == "..":
            climbs += 1
        if ".." in target_parts[climbs:] or climbs > len(parts) - 1:
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a symbolic link to "{target[:200]}", '
                "which points outside the image."
            )
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
        if resolved == ".." or resolved.startswith("../"):  # defence in depth
            raise BundleUnsafePath(
                f'The system image contains "{shown}", a symbolic link to "{target[:200]}", '
                "which points outside the image."
            )


def _walk_members(handle: BinaryIO, manifest: BundleManifest) -> int:
    """Check every tar header without extracting (file data is seeked over); return the count."""
    view = _PayloadView(handle, manifest.header_size, manifest.payload_size)
    checker = _MemberChecker()
    try:
        with tarfile.open(fileobj=view, mode="r:") as tar:  # type: ignore[call-overload]
            while (info := tar.next()) is not None:
                tar.members.clear()  # only headers matter; do not hold 100,000 of them
                checker.check(info)
            end = tar.offset
    except tarfile.TarError as exc:
        raise BundleFormatError(
            f"The bundle's system image is not a valid tar archive: {exc}."
        ) from exc
    view.seek(end)
    if view.drain():
        raise BundleFormatError(
            "The bundle's system image has data after the end of its tar archive."
        )
    return checker.members


def verify_bundle(
    path: Path, keys: list[bytes] | None = None, progress: Progress | None = None
) -> BundleManifest:
    """Verify a complete bundle: signature, size and SHA-256 of the payload, safe members.

    One pass hashes the payload in 1 MiB reads (``progress(done, total)`` every few MiB), then a
    second reads only the tar headers, seeking over file data. Raises a :class:`BundleError`
    subclass naming the problem.
    """
    with open(path, "rb") as handle:
        manifest = _read_header(handle, keys, partial=False)
        _hash_payload(handle, manifest, progress)
        _walk_members(handle, manifest)
    return manifest


# --- Extraction ---------------------------------------------------------------------------


def _prepare_target(target: Path) -> bool:
    """Make sure ``target`` is an empty directory; return whether we created it."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BundleError(f"Cannot unpack the system image into {target}: it is not a directory.")
    if target.is_dir():
        if any(target.iterdir()):
            raise BundleError(f"Cannot unpack the system image into {target}: it is not empty.")
        return False
    target.mkdir(parents=True, mode=0o755)
    return True


def _clear_target(target: Path, created: bool) -> None:
    def make_writable(function: Any, name: str, exc_info: Any) -> None:
        os.chmod(os.path.dirname(name), 0o700)
        function(name)

    if created:
        shutil.rmtree(target, onerror=make_writable)
        return
    for entry in target.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, onerror=make_writable)
        else:
            entry.unlink()


def _fsync_tree(target: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(target, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue  # a link lives in its directory, synced below
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def extract_payload(path: Path, target: Path, keys: list[bytes] | None = None) -> BundleManifest:
    """Verify the bundle, then unpack its system image into ``target`` (empty or absent).

    The payload is read from the same open file as the verification and hashed again while it
    is unpacked; every member passes our own checks and tarfile's ``data`` filter. Regular files
    keep their permission bits (tarfile's data filter always gives the owner read and write),
    directories get theirs without group/other write. Everything is fsynced. On any error the
    partly unpacked tree is removed and the error raised.
    """
    target = Path(target)
    with open(path, "rb") as handle:
        manifest = _read_header(handle, keys, partial=False)
        _hash_payload(handle, manifest, None)
        _walk_members(handle, manifest)

        created = _prepare_target(target)
        try:
            _unpack(handle, manifest, target)
            _fsync_tree(target)
            if created:
                fsync_dir(target.parent)
        except BaseException:
            _clear_target(target, created)
            raise
    return manifest


def _unpack(handle: BinaryIO, manifest: BundleManifest, target: Path) -> None:
    digest = hashlib.sha256()
    view = _PayloadView(handle, manifest.header_size, manifest.payload_size, digest)
    checker = _MemberChecker()

    def safe(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        checker.check(member)
        filtered = tarfile.data_filter(member, dest)
        if filtered.isdir():
            filtered = filtered.replace(mode=(member.mode & 0o755) | 0o700, deep=False)
        return filtered

    try:
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=view, mode="r|", bufsize=READ_SIZE, errorlevel=2
        ) as tar:
            # Safe: every member passes _MemberChecker and tarfile's data filter first.
            tar.extractall(target, filter=safe)  # noqa: S202
    except tarfile.TarError as exc:
        raise BundleUnsafePath(f"The system image could not be unpacked safely: {exc}.") from exc
    view.drain()
    if not hmac.compare_digest(digest.hexdigest(), manifest.payload_sha256):
        raise BundleDigestMismatch(
            "The bundle file changed while its system image was being unpacked; nothing was "
            "installed. Download it again."
        )


# --- Building (vendor side) ---------------------------------------------------------------


class _HashingWriter:
    """A write-only sink that counts and hashes what tarfile writes, optionally passing it on.

    ``tell()`` starts at 0 so tarfile pads the archive the same way whatever precedes it.
    """

    def __init__(self, out: BinaryIO | None = None) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self._out = out

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def _source_entries(source_dir: Path) -> list[str]:
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(source_dir):
        for name in dirnames + filenames:
            names.append(Path(dirpath, name).relative_to(source_dir).as_posix())
    return sorted(names)


@contextlib.contextmanager
def _member(source_dir: Path, name: str) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    path = source_dir / name
    st = os.lstat(path)
    info = tarfile.TarInfo(name)
    info.mtime = TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        yield info, None
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        yield info, None
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        with open(path, "rb") as content:
            yield info, content
    else:
        raise BundleUnsafePath(
            f'"{name}" is a device, socket or FIFO; a firmware image may hold only files, '
            "directories and symbolic links."
        )


def _write_payload(source_dir: Path, names: list[str], sink: _HashingWriter) -> None:
    checker = _MemberChecker()
    with tarfile.open(  # type: ignore[call-overload]
        fileobj=sink, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8"
    ) as tar:
        for name in names:
            with _member(source_dir, name) as (info, content):
                checker.check(info)
                tar.addfile(info, content)


def build_bundle(
    source_dir: Path,
    out: Path,
    *,
    private_key: bytes,
    version: str,
    min_version: str,
    msgstore_format: str,
    config_format: str,
    os_release: str,
    release_notes: str,
) -> BundleManifest:
    """Build and sign a bundle of the system image tree ``source_dir``, written atomically.

    The tar is deterministic (sorted names, fixed mtime, uid/gid 0) so the same tree always
    gives the same payload. A first pass over the tree hashes the tar; the second writes it
    after the signed header and must hash the same, so a tree changing under the build is
    refused rather than shipped with a wrong digest.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise BundleError(f"The system image source {source_dir} is not a directory.")
    signer = _private_key(private_key)
    public = signer.public_key().public_bytes_raw()
    names = _source_entries(source_dir)

    measured = _HashingWriter()
    _write_payload(source_dir, names, measured)
    fields: dict[str, Any] = {
        "format": FORMAT,
        "product": PRODUCT,
        "version": version,
        "min_version": min_version,
        "msgstore_format": msgstore_format,
        "config_format": config_format,
        "os_release": os_release,
        "payload_size": measured.size,
        "payload_sha256": measured.digest.hexdigest(),
        "release_notes": release_notes,
        "key_id": key_id(public),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest_bytes = canonical_json(fields)
    if len(manifest_bytes) > MAX_MANIFEST:
        raise BundleTooLarge(
            f"The manifest would have {len(manifest_bytes)} bytes; at most {MAX_MANIFEST} are "
            "allowed (shorten the release notes)."
        )
    header_size = len(MAGIC) + _LENGTH.size + len(manifest_bytes) + SIGNATURE_SIZE
    manifest = manifest_from_fields(fields, header_size)
    signature = signer.sign(manifest_bytes)

    out = Path(out)
    with atomic_open(out, 0o644) as handle:
        handle.write(MAGIC + _LENGTH.pack(len(manifest_bytes)) + manifest_bytes + signature)
        written = _HashingWriter(handle)
        _write_payload(source_dir, names, written)
        if written.size != measured.size or written.digest.digest() != measured.digest.digest():
            raise BundleError(
                f"The files under {source_dir} changed while the bundle was being built; build "
                "it again."
            )
    return manifest


def file_sha256(path: Path) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a whole file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while count := handle.readinto(view):
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()
