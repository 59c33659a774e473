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

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.system.atomic import atomic_open, atomic_write_text, exclusive_lock, fsync_dir
from appliance.system.errors import ApplianceError, ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.facts import parse_key_values
from appliance.system.journal import journal_recover
from appliance.system.paths import Layout, layout
from appliance.system.safejson import read_json

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
    data = read_json(path)
    if data is None:
        return None
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


class SystemBackupError(ApplianceError):
    """The system backup image cannot be restored; ``str()`` is a message for the user."""


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
    info = system_backup_info(root)
    if info is None:
        return False
    tracker = _Tracker(info.size, progress)
    tracker.report()
    size, sha256 = _hash_tar(the_layout.system_backup_tar, tracker)
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


def _extract_image(the_layout: Layout, staging: dict[str, Path], tracker: _Tracker) -> str:
    """Unpack the image into the staging dirs; return the SHA-256 of what was read."""
    checker = _ImageChecker()
    with the_layout.system_backup_tar.open("rb") as raw:
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
    image, it is damaged or tampered, or holds anything unsafe.
    """
    the_layout = layout(Path(os.path.realpath(layout(root).root)))
    if not the_layout.rescue_dir.is_dir():
        raise SystemBackupError("There is no system backup on the rescue partition.")
    with exclusive_lock(the_layout.rescue_dir / ".lock"):
        _recover_locked(the_layout)
        try:
            info = system_backup_info(the_layout.root)
        except MalformedApplianceFile as exc:
            raise SystemBackupError(f"The system backup's manifest is damaged: {exc}") from exc
        if info is None:
            raise SystemBackupError("There is no system backup on the rescue partition.")
        tracker = _Tracker(2 * info.size, progress)
        tracker.report()
        size, sha256 = _hash_tar(the_layout.system_backup_tar, tracker)
        if size != info.size or sha256 != info.sha256:
            raise SystemBackupError(
                "The system backup does not match its checksum: it is damaged or was altered. "
                "Nothing was changed."
            )
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
            extracted_sha256 = _extract_image(the_layout, staging, tracker)
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
