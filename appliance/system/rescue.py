"""The rescue partition and its one system backup image (Backup & Restore > System).

The appliance keeps a complete backup image of the operating system and the current
configuration on a rescue partition, and only one exists at any time. The upgrade guide warns
that the 2.8.1 upgrade installs onto the rescue partition and so deletes that image, which is
why the console shows whether there is one, of which firmware and from when.

On disk, in ``rescue/``::

    image-20261205T120000Z-1a2b3c4d/
        system-backup.tar       the active firmware slot under system/, the configuration
                                under etc/
        system-backup.json      the manifest: firmware, time, size and SHA-256 of the tar
    current -> image-20261205T120000Z-1a2b3c4d      the one pointer to the current image
    system-backup.json -> current/system-backup.json    the well-known names, never changed
    system-backup.tar -> current/system-backup.tar
    .lock                       held by every writer of the partition

A new image is written whole, tar and manifest, into a directory of its own and fsynced; one
rename of a new ``current`` link over the old switches from the old image to the new; only then
is the old directory deleted. So at every instant exactly one complete image is current, and a
kill leaves either the old or the new one plus a directory no reader follows, which the next
writer sweeps (under the lock, so a write in progress is never touched). Readers come in
through ``system-backup.json``, the path an earlier version kept its manifest at: there, as a
regular file beside a regular ``system-backup.tar``, it is an image of that version, read as
before and moved into a directory of its own (by hard links, without a moment in which it is
not current) by the first new write.

One module of this size on purpose: creating, checking, sweeping and restoring the image
all work under the partition's one lock on one layout (the ``current`` pointer), and the
crash-safety of each step is argued from what the others leave on disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.system.atomic import (
    atomic_symlink,
    atomic_write_text,
    exclusive_lock,
    fsync_dir,
)
from appliance.system.errors import ApplianceError, ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.facts import parse_key_values
from appliance.system.journal import journal_recover
from appliance.system.paths import Layout, layout
from appliance.system.safejson import read_json
from appliance.system.testpause import pause_for_tests

MANIFEST_FORMAT = 1
# Within a large file, report progress at most this often (plus once per file).
_PROGRESS_STEP = 4 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

CURRENT = "current"
_IMAGE_DIR = re.compile(r"image-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
# What a killed write leaves beside the image: atomic_open's and atomic_symlink's temporary
# files (``.<name>.<random>.tmp``), among them the big ``.system-backup.tar.*.tmp`` of an
# earlier version, which streamed its tar straight into rescue/.
_LEFTOVER = re.compile(
    r"\.(?:current|system-backup\.tar|system-backup\.json|system-restore\.json)\..+\.tmp"
)
# What an appliance restored from the image needs, besides the two trees.
_FIRMWARE_RELEASE = "etc/firmware-release"
_CONFIGURATION = "etc/mailsec/cpe"
_RELEASE_MAX = 64 * 1024
# A reader that found the image just as a writer replaced it looks again, this often.
_READ_ATTEMPTS = 3

Progress = Callable[[int, int], None]


class SystemBackupError(ApplianceError):
    """The system backup image cannot be restored; ``str()`` is a message for the user."""


@dataclass(frozen=True)
class SystemBackupInfo:
    """The system backup image on the rescue partition, as its manifest describes it."""

    firmware_version: str
    created_at: datetime
    size: int
    sha256: str


def _pause_point(name: str) -> None:
    """The kill tests' checkpoint inside an image write (``system_backup:<name>:<ms>``)."""
    pause_for_tests("system_backup", name)


def _image_dir(the_layout: Layout) -> Path | None:
    """The directory holding the current image's manifest and tar, None when there is none.

    Found the way every reader finds it: by following ``system-backup.json`` (through
    ``current``). The rescue dir itself for an image of an earlier version. Raises
    :class:`MalformedApplianceFile` when the manifest's name leads out of the rescue partition.
    """
    manifest = the_layout.system_backup_manifest
    real = Path(os.path.realpath(manifest))
    if not real.is_file():
        return None
    rescue_dir = Path(os.path.realpath(the_layout.rescue_dir))
    directory = real.parent
    if real.name == manifest.name and directory == rescue_dir:
        return the_layout.rescue_dir
    if (
        real.name == manifest.name
        and directory.parent == rescue_dir
        and _IMAGE_DIR.fullmatch(directory.name)
    ):
        return the_layout.rescue_dir / directory.name
    raise MalformedApplianceFile(f"{manifest} leads to {real}, not to an image on the partition")


def _current_or_refuse(the_layout: Layout) -> tuple[Path, SystemBackupInfo]:
    """The current image's directory and manifest; SystemBackupError (what a restore or a check
    says) when there is none or its manifest is damaged."""
    try:
        current = _current_image(the_layout)
    except MalformedApplianceFile as exc:
        raise SystemBackupError(f"The system backup's manifest is damaged: {exc}") from exc
    if current is None:
        raise SystemBackupError("There is no system backup on the rescue partition.")
    return current


def _current_image(the_layout: Layout) -> tuple[Path, SystemBackupInfo] | None:
    """The current image's directory and manifest, or None when there is no whole image.

    Raises :class:`MalformedApplianceFile` for a manifest that cannot be read as one.
    """
    for _ in range(_READ_ATTEMPTS):
        directory = _image_dir(the_layout)
        if directory is None:
            return None
        path = directory / the_layout.system_backup_manifest.name
        data = read_json(path)
        if data is not None and (directory / the_layout.system_backup_tar.name).is_file():
            try:
                return directory, _info_from_manifest(data)
            except (KeyError, TypeError, ValueError) as exc:
                raise MalformedApplianceFile(
                    f"{path} is not a system backup manifest: {exc}"
                ) from exc
        if _image_dir(the_layout) == directory:
            return None  # a manifest without its image restores nothing
        # A writer switched to a new image and removed this one meanwhile: look again.
    return None


def system_backup_info(root: Path | None = None) -> SystemBackupInfo | None:
    """The image on the rescue partition, or None when there is none.

    Raises :class:`MalformedApplianceFile` when the manifest exists but cannot be read as one:
    that is damage to report, not an absent backup.
    """
    current = _current_image(layout(root))
    return current[1] if current is not None else None


def _info_from_manifest(data: dict[str, object]) -> SystemBackupInfo:
    firmware_version = data["firmware_version"]
    created_raw = data["created_at"]
    size = data["size"]
    sha256 = data["sha256"]
    if not isinstance(firmware_version, str) or not firmware_version:
        raise ValueError("firmware_version must be a non-empty string")
    if not isinstance(created_raw, str):
        raise ValueError("created_at must be an ISO 8601 string")
    created_at = datetime.fromisoformat(created_raw)
    if created_at.tzinfo is None:
        raise ValueError("created_at must carry its time zone")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("size must be a non-negative integer")
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    return SystemBackupInfo(firmware_version, created_at.astimezone(UTC), size, sha256)


def _active_slot(the_layout: Layout) -> Path:
    """The directory of the running firmware slot, which must lie inside the system dir."""
    active = the_layout.active_system
    if not active.is_symlink() and not active.is_dir():
        raise ApplianceNotInitialized(f"no active system at {active}")
    slot = active.resolve()
    system_dir = the_layout.system_dir.resolve()
    if not slot.is_dir() or slot.parent != system_dir:
        raise ApplianceNotInitialized(f"{active} does not point at a firmware slot")
    return slot


def _firmware_version(the_layout: Layout, slot: Path) -> str:
    """The version of the firmware in the image: the slot's own release file, else the box's."""
    for path in (slot / "etc" / "firmware-release", the_layout.firmware_release):
        try:
            version = parse_key_values(path.read_text(encoding="utf-8")).get("FIRMWARE_VERSION")
        except FileNotFoundError:
            continue
        if version:
            return version
    raise ApplianceNotInitialized(f"no firmware release in {slot} or {the_layout.etc_dir}")


def _entries(top: Path, prefix: str) -> Iterator[tuple[Path, str]]:
    """``(path, name in the archive)`` for a tree, in a stable order, symlinks not followed."""
    yield top, prefix
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        here = Path(dirpath)
        relative = here.relative_to(top)
        for name in sorted(dirnames + filenames):
            yield here / name, f"{prefix}/{(relative / name).as_posix()}"


class _HashingWriter:
    """Passes writes on to the file while hashing and counting them (all tarfile needs)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class _ProgressReader:
    """Reads a source file for tarfile and reports the bytes read, throttled."""

    def __init__(self, source: BinaryIO, tracker: _Tracker) -> None:
        self._source = source
        self._tracker = tracker

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._tracker.advance(len(data))
        return data


class _Tracker:
    """Counts archived bytes and calls ``progress`` without flooding it."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._last: tuple[int, int] | None = None
        self._progress = progress

    def advance(self, count: int) -> None:
        self.done += count
        if self._last is None or self.done - self._last[0] >= _PROGRESS_STEP:
            self.report()

    def report(self) -> None:
        if self._progress is not None and self._last != (self.done, self.total):
            self._progress(self.done, self.total)
        self._last = (self.done, self.total)

    def finish(self) -> None:
        """The last call says done == total, even if files changed size while being read."""
        self.total = self.done
        self.report()


def _firmware_level(release: bytes) -> str:
    try:
        return parse_key_values(release.decode("utf-8")).get("FIRMWARE_VERSION", "")
    except UnicodeDecodeError:
        return ""


def _lacking(directories: set[str], release: bytes | None) -> list[str]:
    """What an appliance needs that a tree (image or live) lacks, in the administrator's words:
    ``directories`` are the archive names of its directories, ``release`` the content of its
    etc/firmware-release (None when it has none)."""
    lacking = []
    if "system" not in directories:
        lacking.append("the firmware (system/)")
    if "etc" not in directories:
        lacking.append("the configuration directory (etc/)")
    elif _CONFIGURATION not in directories:
        lacking.append(f"the mail-security configuration directory ({_CONFIGURATION}/)")
    if release is None:
        lacking.append(f"the firmware level ({_FIRMWARE_RELEASE})")
    elif not _firmware_level(release):
        lacking.append(f"a readable firmware level (FIRMWARE_VERSION) in {_FIRMWARE_RELEASE}")
    return lacking


def _live_lacking(the_layout: Layout) -> list[str]:
    """What the image about to be written would lack (the firmware slot is checked apart)."""
    directories = {"system"}
    if the_layout.etc_dir.is_dir():
        directories.add("etc")
    if the_layout.cpe_dir.is_dir():
        directories.add(_CONFIGURATION)
    release = the_layout.firmware_release
    data = release.read_bytes()[:_RELEASE_MAX] if _is_regular(release) else None
    return _lacking(directories, data)


def _image_lacking(tar_path: Path) -> list[str]:
    """What the image at ``tar_path`` lacks, from its headers (the content is skipped, so this
    costs a small fraction of a checksum pass). Raises :class:`SystemBackupError` for a member
    that could write outside the image's trees, as unpacking it would."""
    checker = _ImageChecker()
    directories: set[str] = set()
    release: bytes | None = None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                name = "/".join(checker.check(info))
                if info.isdir():
                    directories.add(name)
                elif name == _FIRMWARE_RELEASE and info.isreg() and release is None:
                    source = tar.extractfile(info)
                    release = source.read(_RELEASE_MAX) if source is not None else b""
    except tarfile.TarError as exc:
        raise SystemBackupError(f"The system backup is not a valid tar archive: {exc}.") from exc
    return _lacking(directories, release)


def _incomplete(lacking: list[str]) -> str:
    return (
        f"The system backup image lacks what an appliance needs: {'; '.join(lacking)}. "
        "Restoring it would leave an appliance that cannot run, so it is refused and nothing "
        "was changed."
    )


def system_backup_check(root: Path | None = None) -> SystemBackupInfo:
    """The image, once its headers show that it holds what an appliance needs.

    What a restore is asked for with (the restore itself verifies the checksum and checks again,
    under the lock). Raises :class:`SystemBackupError` when there is no image, it cannot be
    read, or it lacks the firmware level or the configuration directory.
    """
    the_layout = layout(root)
    directory, info = _current_or_refuse(the_layout)
    try:
        lacking = _image_lacking(directory / the_layout.system_backup_tar.name)
    except OSError as exc:
        raise SystemBackupError(f"The system backup image cannot be read: {exc}") from exc
    if lacking:
        raise SystemBackupError(_incomplete(lacking))
    return info


# --- Writing the image -----------------------------------------------------------------------


def _new_image_dir(the_layout: Layout) -> Path:
    """A new, empty image directory: not current, so a kill leaves it for the sweep."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    while True:
        directory = the_layout.rescue_dir / f"image-{stamp}-{secrets.token_hex(4)}"
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            continue
        return directory


def _point_at(the_layout: Layout, directory: Path) -> None:
    """Make ``current`` lead to ``directory``: one rename, the switch between two images."""
    pointer = the_layout.rescue_dir / CURRENT
    with contextlib.suppress(OSError):
        if os.readlink(pointer) == directory.name:
            return
    atomic_symlink(directory.name, pointer)


def _link_names(the_layout: Layout) -> None:
    """Make the well-known names lead through ``current``, the manifest's first: it is the way
    readers come in, so once it does they see the image ``current`` leads to."""
    for path in (the_layout.system_backup_manifest, the_layout.system_backup_tar):
        target = f"{CURRENT}/{path.name}"
        with contextlib.suppress(OSError):
            if os.readlink(path) == target:
                continue
        atomic_symlink(target, path)
        _pause_point(f"linked-{path.name}")


def _adopt_old_layout(the_layout: Layout) -> Path:
    """Move an earlier version's image (tar and manifest as files in rescue/) into a directory
    of its own and return it.

    Hard links, not copies or renames: the directory holds the same files while the old names
    still work, then ``current`` is pointed at it (readers do not follow it yet), then the
    manifest's name becomes a link through it (the switch, to the same image) and the tar's.
    """
    directory = _new_image_dir(the_layout)
    for path in (the_layout.system_backup_tar, the_layout.system_backup_manifest):
        os.link(path, directory / path.name)
    fsync_dir(directory)
    fsync_dir(the_layout.rescue_dir)
    _pause_point("old-layout-linked")
    _point_at(the_layout, directory)
    _pause_point("old-layout-pointer")
    _link_names(the_layout)
    return directory


def _is_leftover(entry: Path, current: Path | None) -> bool:
    """True for an entry of the rescue dir that no reader follows and a killed write of ours
    left: another image directory, a temporary file, a ``current`` that leads elsewhere."""
    name = entry.name
    if name == CURRENT:
        if not entry.is_symlink():
            return False  # not one of ours
        try:
            return current is None or os.readlink(entry) != current.name
        except OSError:
            return False
    if _IMAGE_DIR.fullmatch(name):
        return entry != current
    return bool(_LEFTOVER.fullmatch(name))


def _tidy_locked(the_layout: Layout) -> list[str]:
    """Remove what killed writes left on the rescue partition; the names removed.

    Only what no reader follows goes: image directories other than the current one, temporary
    files of ours, a ``current`` that leads elsewhere. The caller holds the partition's lock, so
    no write is in progress. An interrupted switch of the well-known names is finished.
    """
    rescue_dir = the_layout.rescue_dir
    if not rescue_dir.is_dir():
        return []
    try:
        current = _image_dir(the_layout)
    except MalformedApplianceFile:
        current = None  # no reader gets an image through it; the next write replaces it
    removed = []
    for entry in sorted(rescue_dir.iterdir()):
        if _is_leftover(entry, current):
            _remove_tree(entry)
            removed.append(entry.name)
    if removed:
        fsync_dir(rescue_dir)
    if current is not None and current != rescue_dir:
        _point_at(the_layout, current)
        _link_names(the_layout)
    return removed


def system_backup_leftovers_remove(root: Path | None = None) -> list[str]:
    """Remove what creations cut short left on the rescue partition; the names removed.

    Waits for the partition's lock, so an image being written is never touched.
    """
    the_layout = layout(root)
    if not the_layout.rescue_dir.is_dir():
        return []
    with exclusive_lock(the_layout.rescue_dir / ".lock"):
        return _tidy_locked(the_layout)


def _write_image(
    the_layout: Layout,
    image: Path,
    entries: list[tuple[Path, str]],
    tracker: _Tracker,
    firmware_version: str,
    slot: str,
) -> SystemBackupInfo:
    """Write the tar and then the manifest into the new image directory, durably."""
    tar_path = image / the_layout.system_backup_tar.name
    fd = os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        writer = _HashingWriter(handle)
        with tarfile.TarFile(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            started = False
            for path, arcname in entries:
                info = tar.gettarinfo(str(path), arcname)
                if info is None:
                    continue  # a socket or the like: nothing a restore could use
                if info.isreg():
                    with open(path, "rb") as source:
                        tar.addfile(info, _ProgressReader(source, tracker))
                    tracker.report()
                    if not started:
                        started = True
                        _pause_point("tar-started")
                else:
                    tar.addfile(info)
        handle.flush()
        os.fchmod(handle.fileno(), 0o644)
        os.fsync(handle.fileno())
    created_at = datetime.now(UTC).replace(microsecond=0)
    backup = SystemBackupInfo(firmware_version, created_at, writer.size, writer.sha256.hexdigest())
    manifest = {
        "format": MANIFEST_FORMAT,
        "firmware_version": backup.firmware_version,
        "created_at": backup.created_at.isoformat(),
        "size": backup.size,
        "sha256": backup.sha256,
        "slot": slot,
        "contents": ["system", "etc"],
    }
    atomic_write_text(
        image / the_layout.system_backup_manifest.name, json.dumps(manifest, indent=2) + "\n"
    )
    fsync_dir(image)
    return backup


def system_backup_create(
    root: Path | None = None, progress: Progress | None = None
) -> SystemBackupInfo:
    """Write a new system backup image of the active system and the configuration.

    Replaces the one image there is, as one step: the tar (hashed on the way, so the SHA-256
    costs no second read) and the manifest are written and fsynced into a new directory, and
    one rename of ``current`` switches to it; the old image is deleted after. Refuses
    (:class:`ApplianceNotInitialized`) a root whose image could not be restored: no active
    slot, or no configuration directory or firmware level. ``progress(done_bytes, total_bytes)``
    counts file content, at the start, after each file and every few MiB within large ones, and
    finally with ``done == total``. Creations are serialised with a lock on the rescue
    partition, under which leftovers of creations cut short are removed first.
    """
    the_layout = layout(root)
    slot = _active_slot(the_layout)
    if not the_layout.etc_dir.is_dir():
        raise ApplianceNotInitialized(f"no configuration at {the_layout.etc_dir}")
    lacking = _live_lacking(the_layout)
    if lacking:
        raise ApplianceNotInitialized(
            f"the appliance lacks what its system backup image needs: {'; '.join(lacking)}"
        )
    firmware_version = _firmware_version(the_layout, slot)
    the_layout.rescue_dir.mkdir(parents=True, exist_ok=True)

    with exclusive_lock(the_layout.rescue_dir / ".lock"):
        _tidy_locked(the_layout)
        try:
            previous = _image_dir(the_layout)
        except MalformedApplianceFile:
            previous = None
        if previous == the_layout.rescue_dir:
            old_tar = the_layout.system_backup_tar
            # An image of an earlier version; a manifest without its tar is no image to keep.
            previous = _adopt_old_layout(the_layout) if _is_regular(old_tar) else None

        entries = [*_entries(slot, "system"), *_entries(the_layout.etc_dir, "etc")]
        total = sum(path.lstat().st_size for path, _ in entries if _is_regular(path))
        tracker = _Tracker(total, progress)
        tracker.report()
        image = _new_image_dir(the_layout)
        try:
            backup = _write_image(the_layout, image, entries, tracker, firmware_version, slot.name)
        except BaseException:
            _remove_tree(image)  # not current: nobody follows it, and a full disk wants it gone
            raise
        fsync_dir(the_layout.rescue_dir)
        _pause_point("image-written")
        _point_at(the_layout, image)
        _pause_point("switched")
        _link_names(the_layout)  # the names of an image that had none, or of a damaged one
        if previous is not None and previous != image:
            _remove_tree(previous)
            fsync_dir(the_layout.rescue_dir)
    tracker.finish()
    return backup


def _is_regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


# --- Restore ---------------------------------------------------------------------------------
#
# Returning the appliance to its image replaces two trees: the firmware (the image's system/
# becomes a new slot, and system/active is switched to it by renaming a fresh symlink over it)
# and the configuration (etc/ is renamed aside and the image's etc/ renamed into its place).
# Both are unpacked next to their targets first, then a journal marks the point of no return;
# from there a crash is rolled forward by system_restore_recover(). The message store is not
# part of the image and is never touched.

_HASH_CHUNK = 1024 * 1024
_TOPS = ("system", "etc")


def _hash_tar(path: Path, tracker: _Tracker) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            tracker.advance(len(chunk))
    return size, digest.hexdigest()


def system_backup_verify(root: Path | None = None, progress: Progress | None = None) -> bool:
    """True when the image exists and its size and SHA-256 match its manifest."""
    the_layout = layout(root)
    current = _current_image(the_layout)
    if current is None:
        return False
    directory, info = current
    tracker = _Tracker(info.size, progress)
    tracker.report()
    size, sha256 = _hash_tar(directory / the_layout.system_backup_tar.name, tracker)
    tracker.finish()
    return size == info.size and sha256 == info.sha256


class _ImageChecker:
    """Refuses members that could write outside the two trees of an image.

    Only ``system`` and ``etc`` and what lies beneath them; no absolute names, no ``..``, no
    duplicates, nothing beneath a symbolic link or a file, only files, directories and relative
    symbolic links that stay inside their own tree; no hard links or devices.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, str] = {}

    def check(self, info: tarfile.TarInfo) -> list[str]:
        name = info.name
        shown = name[:200]
        if not name or "\x00" in name or name.startswith("/"):
            raise SystemBackupError(
                f'The system backup contains "{shown}", an absolute or invalid path.'
            )
        raw = name.split("/")
        if ".." in raw:
            raise SystemBackupError(f'The system backup contains "{shown}", a path with "..".')
        parts = [part for part in raw if part not in ("", ".")]
        if not parts or parts[0] not in _TOPS:
            raise SystemBackupError(
                f'The system backup contains "{shown}", outside its system and etc trees.'
            )
        if not (info.isreg() or info.isdir() or info.issym()) or info.issparse():
            raise SystemBackupError(
                f'The system backup contains "{shown}", a link, device or special file.'
            )
        if len(parts) == 1 and not info.isdir():
            raise SystemBackupError(f'The system backup\'s "{shown}" is not a directory.')
        path = "/".join(parts)
        if path in self._kinds:
            raise SystemBackupError(f'The system backup contains "{shown}" twice.')
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if self._kinds.get(parent) != "dir":
                raise SystemBackupError(
                    f'The system backup places "{shown}" beneath something that is not a '
                    "directory of the image."
                )
        kind = "dir" if info.isdir() else "symlink" if info.issym() else "file"
        self._kinds[path] = kind
        if info.issym():
            target = info.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if (
                not target
                or "\x00" in target
                or target.startswith("/")
                or not (resolved == parts[0] or resolved.startswith(parts[0] + "/"))
            ):
                raise SystemBackupError(
                    f'The system backup contains "{shown}", a symbolic link that points out of '
                    "its tree."
                )
        return parts


def _extract_image(tar_path: Path, staging: dict[str, Path], tracker: _Tracker) -> str:
    """Unpack the image into the staging dirs; return the SHA-256 of what was read."""
    checker = _ImageChecker()
    with tar_path.open("rb") as raw:
        reader = _HashingReader(raw, tracker)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for info in tar:
                    parts = checker.check(info)
                    target = staging[parts[0]].joinpath(*parts[1:])
                    if info.isdir():
                        target.mkdir(exist_ok=len(parts) == 1)
                        os.chmod(target, (info.mode & 0o777) | 0o700)
                    elif info.issym():
                        os.symlink(info.linkname, target)
                    else:
                        source = tar.extractfile(info)
                        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with os.fdopen(fd, "wb") as out:
                            if source is not None:
                                shutil.copyfileobj(source, out, _HASH_CHUNK)
                            out.flush()
                            os.fchmod(out.fileno(), info.mode & 0o777)
                            os.fsync(out.fileno())
                reader.drain()
        except tarfile.TarError as exc:
            raise SystemBackupError(
                f"The system backup is not a valid tar archive: {exc}."
            ) from exc
    for top in staging.values():
        if not top.is_dir():
            raise SystemBackupError("The system backup lacks its system or etc tree.")
    return reader.sha256.hexdigest()


class _HashingReader:
    """Hashes and counts what tarfile reads, so the extracted bytes are the verified ones."""

    def __init__(self, source: BinaryIO, tracker: _Tracker) -> None:
        self._source = source
        self._tracker = tracker
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.sha256.update(data)
        self._tracker.advance(len(data))
        return data

    def drain(self) -> None:
        while self.read(_HASH_CHUNK):
            pass


def _fsync_tree(top: Path) -> None:
    for dirpath, _, _ in os.walk(top):
        fsync_dir(Path(dirpath))


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _switch_active(the_layout: Layout, slot: str) -> None:
    """Point system/active at ``slot`` by renaming a new symlink over it (never missing)."""
    with contextlib.suppress(OSError):
        if os.readlink(the_layout.active_system) == slot:
            return
    temporary = the_layout.system_dir / ".active.restore.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(slot, temporary)
    os.replace(temporary, the_layout.active_system)
    fsync_dir(the_layout.system_dir)


def _restore_step(source: Path, target: Path) -> None:
    """One rename of the switch (its own function so tests can interrupt between steps)."""
    os.replace(source, target)


def _roll_forward(the_layout: Layout, journal: dict[str, Any]) -> None:
    """Finish a switch whose trees are staged; every step is idempotent."""
    root = the_layout.root
    staged_system = root / journal["staging_system"]
    slot_dir = the_layout.system_dir / journal["slot"]
    if staged_system.exists() and not slot_dir.exists():
        _restore_step(staged_system, slot_dir)
        fsync_dir(the_layout.system_dir)
    _switch_active(the_layout, journal["slot"])
    staged_etc = root / journal["staging_etc"]
    old_etc = root / journal["old_etc"]
    if staged_etc.exists():
        if the_layout.etc_dir.exists() and not old_etc.exists():
            _restore_step(the_layout.etc_dir, old_etc)
        _restore_step(staged_etc, the_layout.etc_dir)
        fsync_dir(root)
    with contextlib.suppress(ImportError, ApplianceError, ValueError):
        from appliance.firmware.firmware import slot_seal

        slot_seal(journal["slot"], root)  # the restored slot counts as bootable for a rollback
    _remove_tree(old_etc)
    _remove_tree(staged_system)
    the_layout.system_restore_journal.unlink(missing_ok=True)
    fsync_dir(the_layout.rescue_dir)


def _discard_staging(the_layout: Layout, journal: dict[str, Any]) -> None:
    for key in ("staging_system", "staging_etc"):
        _remove_tree(the_layout.root / journal[key])
    the_layout.system_restore_journal.unlink(missing_ok=True)
    fsync_dir(the_layout.rescue_dir)


def _recover_locked(the_layout: Layout) -> bool:
    return journal_recover(
        the_layout.system_restore_journal,
        committed="staged",
        finish=functools.partial(_roll_forward, the_layout),
        undo=functools.partial(_discard_staging, the_layout),
        damaged=SystemBackupError,
    )


def system_restore_recover(root: Path | None = None) -> bool:
    """Finish a system restore a crash interrupted; True when one was rolled forward.

    One interrupted while unpacking had changed nothing, so its staging trees are removed.
    """
    the_layout = layout(root)
    if not the_layout.system_restore_journal.exists():
        return False
    with exclusive_lock(the_layout.rescue_dir / ".lock"):
        return _recover_locked(the_layout)


def system_backup_restore(
    root: Path | None = None, progress: Progress | None = None
) -> SystemBackupInfo:
    """Return the firmware and the configuration to the system backup image.

    The image is verified against its manifest first (``progress`` counts the bytes of that
    pass and then of the unpacking pass, whose own hash must match again), unpacked with every
    member checked into staging directories beside their targets, and only then switched in:
    the image's system tree becomes a new slot that ``system/active`` points at, and its etc
    replaces ``etc``. Raises :class:`SystemBackupError` with nothing changed when there is no
    image, it is damaged or tampered, holds anything unsafe, or lacks what an appliance needs
    (the firmware level in etc/firmware-release, the configuration directory). Every member and
    those essentials are checked from the verified tar's headers before anything is unpacked.
    """
    the_layout = layout(Path(os.path.realpath(layout(root).root)))
    if not the_layout.rescue_dir.is_dir():
        raise SystemBackupError("There is no system backup on the rescue partition.")
    with exclusive_lock(the_layout.rescue_dir / ".lock"):
        _recover_locked(the_layout)
        directory, info = _current_or_refuse(the_layout)
        tar_path = directory / the_layout.system_backup_tar.name
        tracker = _Tracker(2 * info.size, progress)
        tracker.report()
        size, sha256 = _hash_tar(tar_path, tracker)
        if size != info.size or sha256 != info.sha256:
            raise SystemBackupError(
                "The system backup does not match its checksum: it is damaged or was altered. "
                "Nothing was changed."
            )
        lacking = _image_lacking(tar_path)
        if lacking:
            raise SystemBackupError(_incomplete(lacking))
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        slot = f"slot-restored-{stamp}"
        the_layout.slot_dir(slot)  # checks the name
        journal: dict[str, Any] = {
            "state": "unpacking",
            "slot": slot,
            "staging_system": f"system/.restore-{stamp}",
            "staging_etc": f".etc-restore-{stamp}",
            "old_etc": f".etc-old-{stamp}",
            "firmware_version": info.firmware_version,
        }
        staging = {
            "system": the_layout.root / journal["staging_system"],
            "etc": the_layout.root / journal["staging_etc"],
        }
        atomic_write_text(the_layout.system_restore_journal, json.dumps(journal) + "\n")
        try:
            for top in staging.values():
                _remove_tree(top)
            extracted_sha256 = _extract_image(tar_path, staging, tracker)
            if extracted_sha256 != info.sha256:
                raise SystemBackupError(
                    "The system backup changed while it was being restored. Nothing was changed."
                )
            for top in staging.values():
                _fsync_tree(top)
            fsync_dir(the_layout.system_dir)
            fsync_dir(the_layout.root)
        except BaseException:
            _discard_staging(the_layout, journal)
            raise
        journal["state"] = "staged"
        atomic_write_text(the_layout.system_restore_journal, json.dumps(journal) + "\n")
        _roll_forward(the_layout, journal)
    tracker.finish()
    return info
