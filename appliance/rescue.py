"""The rescue partition and its one system backup image (Backup & Restore > System).

The appliance keeps a complete backup image of the operating system and the current
configuration on a rescue partition, and only one exists at any time. The upgrade guide warns
that the 2.8.1 upgrade installs onto the rescue partition and so deletes that image, which is
why the console shows whether there is one, of which firmware and from when.

On disk: ``rescue/system-backup.tar`` holds the active firmware slot under ``system/`` and the
configuration under ``etc/``; ``rescue/system-backup.json`` (the manifest) says which firmware
the image holds, when it was made, its size and its SHA-256. The manifest is what makes an image
count: it is removed before a new tar replaces the old one and written only after, so a crash
leaves either a consistent old backup, no backup, or the consistent new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from appliance.atomic import atomic_open, atomic_write_text, exclusive_lock
from appliance.errors import ApplianceNotInitialized, MalformedApplianceFile
from appliance.paths import Layout, layout
from appliance.system import parse_key_values

MANIFEST_FORMAT = 1
# Within a large file, report progress at most this often (plus once per file).
_PROGRESS_STEP = 4 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SystemBackupInfo:
    """The system backup image on the rescue partition, as its manifest describes it."""

    firmware_version: str
    created_at: datetime
    size: int
    sha256: str


def system_backup_info(root: Path | None = None) -> SystemBackupInfo | None:
    """The image on the rescue partition, or None when there is none.

    Raises :class:`MalformedApplianceFile` when the manifest exists but cannot be read as one:
    that is damage to report, not an absent backup.
    """
    the_layout = layout(root)
    path = the_layout.system_backup_manifest
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedApplianceFile(f"{path} is not valid JSON") from exc
    try:
        info = _info_from_manifest(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedApplianceFile(f"{path} is not a system backup manifest: {exc}") from exc
    if not the_layout.system_backup_tar.is_file():
        return None  # a manifest without its image restores nothing
    return info


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


def system_backup_create(
    root: Path | None = None, progress: Progress | None = None
) -> SystemBackupInfo:
    """Write a new system backup image of the active system and the configuration.

    Replaces the one image there is. The tar is streamed through :func:`atomic_open`, so a crash
    never leaves half an image, and hashed on the way so the SHA-256 costs no second read.
    ``progress(done_bytes, total_bytes)`` counts file content, at the start, after each file
    and every few MiB within large ones, and finally with ``done == total``. Creations are
    serialised with a lock on the rescue partition, so two cannot pair one's manifest with the
    other's tar.
    """
    the_layout = layout(root)
    slot = _active_slot(the_layout)
    if not the_layout.etc_dir.is_dir():
        raise ApplianceNotInitialized(f"no configuration at {the_layout.etc_dir}")
    firmware_version = _firmware_version(the_layout, slot)
    the_layout.rescue_dir.mkdir(parents=True, exist_ok=True)

    with exclusive_lock(the_layout.rescue_dir / ".lock"):
        entries = [*_entries(slot, "system"), *_entries(the_layout.etc_dir, "etc")]
        total = sum(path.lstat().st_size for path, _ in entries if _is_regular(path))
        tracker = _Tracker(total, progress)
        tracker.report()
        with atomic_open(the_layout.system_backup_tar) as handle:
            writer = _HashingWriter(handle)
            with tarfile.TarFile(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path, arcname in entries:
                    info = tar.gettarinfo(str(path), arcname)
                    if info is None:
                        continue  # a socket or the like: nothing a restore could use
                    if info.isreg():
                        with open(path, "rb") as source:
                            tar.addfile(info, _ProgressReader(source, tracker))
                        tracker.report()
                    else:
                        tar.addfile(info)
            # The old manifest goes before the new tar takes the old one's name.
            the_layout.system_backup_manifest.unlink(missing_ok=True)
        created_at = datetime.now(UTC).replace(microsecond=0)
        backup = SystemBackupInfo(
            firmware_version, created_at, writer.size, writer.sha256.hexdigest()
        )
        manifest = {
            "format": MANIFEST_FORMAT,
            "firmware_version": backup.firmware_version,
            "created_at": backup.created_at.isoformat(),
            "size": backup.size,
            "sha256": backup.sha256,
            "slot": slot.name,
            "contents": ["system", "etc"],
        }
        atomic_write_text(the_layout.system_backup_manifest, json.dumps(manifest, indent=2) + "\n")
    tracker.finish()
    return backup


def _is_regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
