"""Unpacking a verified bundle's system image into a directory.

The payload is read from the same open file as the verification and hashed again while it is
unpacked, every member checked once more on the very bytes being extracted, so a file swapped
after verification is caught and nothing of it stays on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from appliance.firmware.bundle import (
    READ_SIZE,
    BundleDigestMismatch,
    BundleError,
    BundleManifest,
    BundleUnsafePath,
    MemberChecker,
    PayloadView,
    hash_payload,
    read_header,
    walk_members,
)
from appliance.system.atomic import fsync_dir


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
        manifest = read_header(handle, keys, partial=False)
        hash_payload(handle, manifest, None)
        walk_members(handle, manifest)

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
    view = PayloadView(handle, manifest.header_size, manifest.payload_size, digest)
    checker = MemberChecker()

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
            # Safe: every member passes MemberChecker and tarfile's data filter first.
            tar.extractall(target, filter=safe)  # noqa: S202
    except tarfile.TarError as exc:
        raise BundleUnsafePath(f"The system image could not be unpacked safely: {exc}.") from exc
    view.drain()
    if not hmac.compare_digest(digest.hexdigest(), manifest.payload_sha256):
        raise BundleDigestMismatch(
            "The bundle file changed while its system image was being unpacked; nothing was "
            "installed. Download it again."
        )
