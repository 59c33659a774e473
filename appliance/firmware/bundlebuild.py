"""Building and signing a firmware bundle (the vendor's side; see :mod:`appliance.firmware.bundle`).

The payload is a deterministic tar of a system image tree: sorted names, one modification time,
owner root; every member passes the same checks a console applies when it verifies the bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.firmware.bundle import (
    FORMAT,
    MAX_MANIFEST,
    PRODUCT,
    BundleError,
    BundleManifest,
    BundleTooLarge,
    BundleUnsafePath,
    MemberChecker,
    header_bytes,
    header_size_for,
    manifest_from_fields,
)
from appliance.firmware.signing import canonical_json, key_id, load_private_key
from appliance.system.atomic import atomic_open

# Every member of a built payload gets this modification time (2013-10-01 00:00 UTC, the 2.8.1
# release), so the same tree always gives the same tar.
TAR_MTIME = 1_380_585_600


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
    checker = MemberChecker()
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
    signer = load_private_key(private_key)
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
    header_size = header_size_for(len(manifest_bytes))
    manifest = manifest_from_fields(fields, header_size)
    signature = signer.sign(manifest_bytes)

    out = Path(out)
    with atomic_open(out, 0o644) as handle:
        handle.write(header_bytes(manifest_bytes, signature))
        written = _HashingWriter(handle)
        _write_payload(source_dir, names, written)
        if written.size != measured.size or written.digest.digest() != measured.digest.digest():
            raise BundleError(
                f"The files under {source_dir} changed while the bundle was being built; build "
                "it again."
            )
    return manifest
