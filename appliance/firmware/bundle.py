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

Reading and verifying stay in this one module, longer than most: the header, the signature, the
manifest's fields, the payload's digest and every member's check together are what "verified"
means, and they are best read in one place. Keys and signatures are
:mod:`appliance.firmware.signing`'s, building a bundle :mod:`appliance.firmware.bundlebuild`'s,
unpacking one :mod:`appliance.firmware.bundleextract`'s.

One module of this size on purpose: the header, the signature, the payload digest and the
member checks are one format read by one streaming pass, and splitting them would let a change
to the format reach one reader and miss another.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import posixpath
import re
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.firmware.signing import canonical_json, key_id, signing_key_for, trusted_keys
from appliance.system.errors import ApplianceError
from appliance.system.safejson import check_field_names, loads_strict

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


# --- Versions ---------------------------------------------------------------------------------


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


# --- Reading the header -------------------------------------------------------------------


def header_size_for(manifest_length: int) -> int:
    """The bytes before the payload: magic, the manifest's length, the manifest, its signature."""
    return len(MAGIC) + _LENGTH.size + manifest_length + SIGNATURE_SIZE


def header_bytes(manifest: bytes, signature: bytes) -> bytes:
    """The header a bundle file starts with (see :func:`header_size_for`)."""
    return MAGIC + _LENGTH.pack(len(manifest)) + manifest + signature


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
        return read_header(handle, keys, partial=partial)


def read_manifest_unverified(path: Path) -> BundleManifest:
    """Vendor side only: read a complete bundle's manifest WITHOUT checking who signed it.

    Used to publish a bundle on a machine that need not trust the vendor key. Everything else is
    checked as in :func:`read_manifest`; never use this to decide whether to install.
    """
    with open(path, "rb") as handle:
        return read_header(handle, None, partial=False, check_signature=False)


def _read_exactly(handle: BinaryIO, size: int, where: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise BundleDigestMismatch(
            f"The bundle file is incomplete: it ends inside its {where}. Download it again."
        )
    return data


def read_header(
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
    header_size = header_size_for(length)

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


def _manifest_from_bytes(data: bytes, header_size: int) -> BundleManifest:
    try:
        fields = loads_strict(data)
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
    check_field_names(fields, _FIELDS, "The bundle's manifest", BundleFormatError)
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


class PayloadView:
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


def hash_payload(handle: BinaryIO, manifest: BundleManifest, progress: Progress | None) -> None:
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
    check_payload_digest(digest.hexdigest(), manifest)


def check_payload_digest(hexdigest: str, manifest: BundleManifest) -> None:
    """The payload's SHA-256 against the signed manifest's (constant time)."""
    if not hmac.compare_digest(hexdigest, manifest.payload_sha256):
        raise BundleDigestMismatch(
            "The bundle's system image does not match the SHA-256 in its signed manifest: the "
            "file was damaged or altered. Download it again."
        )


class MemberChecker:
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


def walk_members(handle: BinaryIO, manifest: BundleManifest) -> int:
    """Check every tar header without extracting (file data is seeked over); return the count."""
    view = PayloadView(handle, manifest.header_size, manifest.payload_size)
    checker = MemberChecker()
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


class PayloadDigest:
    """The payload's SHA-256, computed from a bundle's bytes while they are written.

    A downloader feeds every block of the file in order from byte 0 (``update``), so the
    payload is hashed once, on its way to the disk, instead of a second time after the last
    byte. Where the payload starts is read from those same bytes (the manifest's length), by
    this module, which still checks everything else on the file itself: :func:`verify_bundle`
    reads the header from disk, checks the signature and the file's size, compares this digest
    with the signed one, and walks every tar header. Fed from anywhere but byte 0, or short of
    the whole payload, it covers nothing and verify_bundle hashes the file as before.
    """

    _PREFIX = len(MAGIC) + _LENGTH.size

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._head = bytearray()
        self._seen = 0
        self.header_size: int | None = None
        self.payload_bytes = 0

    def update(self, block: bytes) -> None:
        start = self._seen
        self._seen += len(block)
        if self.header_size is None:
            self._head += block[: max(0, self._PREFIX - start)]
            if len(self._head) < self._PREFIX:
                return
            (length,) = _LENGTH.unpack(self._head[len(MAGIC) : self._PREFIX])
            self.header_size = header_size_for(length)
        skip = self.header_size - start
        if skip >= len(block):
            return
        view = memoryview(block)[max(0, skip) :]
        self._digest.update(view)
        self.payload_bytes += len(view)

    def covers(self, manifest: BundleManifest) -> bool:
        """Whether every payload byte, and nothing else, went through this digest."""
        return (
            self.header_size == manifest.header_size and self.payload_bytes == manifest.payload_size
        )

    def check(self, manifest: BundleManifest) -> None:
        check_payload_digest(self._digest.hexdigest(), manifest)


def verify_bundle(
    path: Path,
    keys: list[bytes] | None = None,
    progress: Progress | None = None,
    payload: PayloadDigest | None = None,
) -> BundleManifest:
    """Verify a complete bundle: signature, size and SHA-256 of the payload, safe members.

    One pass hashes the payload in 1 MiB reads (``progress(done, total)`` every few MiB), unless
    ``payload`` already covers it (hashed while the file was downloaded); then a second reads
    only the tar headers, seeking over file data. Raises a :class:`BundleError` subclass naming
    the problem.
    """
    with open(path, "rb") as handle:
        manifest = read_header(handle, keys, partial=False)
        if payload is not None and payload.covers(manifest):
            payload.check(manifest)
            if progress is not None:
                progress(manifest.payload_size, manifest.payload_size)
        else:
            hash_payload(handle, manifest, progress)
        walk_members(handle, manifest)
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
