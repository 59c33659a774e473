"""Firmware slots: install the new system image beside the running one, switch, clean up.

The appliance keeps its firmware in slots under ``system/`` (``slot-a``, ``slot-b``) with the
``system/active`` symlink naming the running one. The upgrade follows the A/B practice of the
update engines in UPGRADE-SAFETY.md:

- Phase 2 (:func:`slot_install`, online while mail flows) verifies the bundle's signature and
  digest again, marks the *inactive* slot not bootable, unpacks the system image into a staging
  directory while recording a tree manifest (path, type, mode, size, SHA-256 per file, target per
  symbolic link), fsyncs it, reads the whole tree back and hashes it against that manifest, then
  renames it into place and only then marks the slot bootable. Writes and the read-back are
  throttled (``rate_limit``) so the mail service keeps its throughput; ``should_stop`` aborts
  within one 1 MiB chunk, leaving the running slot untouched and the partial one removed.
- Phase 6 (:func:`slot_switch`) points ``system/active`` at the new slot with a temporary
  symlink renamed over it (atomic) and an fsync of the directory; the slot left behind is
  recorded (``switch.json``) and, if it never had a manifest, sealed with one first, so a
  rollback is the same call with the previous slot and can verify what it returns to.
- Phase 9 (:func:`staging_cleanup`) removes what an interrupted or finished install left.

State lives in ``system/.firmware/`` (:attr:`Layout.firmware_state_dir`): ``<slot>.json`` per
slot (``state`` is ``installing`` until the read-back succeeded, then ``bootable``; plus the
manifest), ``switch.json`` and a lock serialising every writer of ``system/``.

The rescue partition: the original installs the new operating system onto the rescue partition
and so deletes the system backup image when the upgrade starts. Our slots live in ``system/``,
so the image in ``rescue/`` is *not* deleted for space and remains a restorable 2.8.0 image
throughout the run; phase 10 replaces it with a backup of the new system (the one image there
is), which is why the preflight still warns that it will be overwritten.

Installing, verifying, switching and cleaning up stay in this one module, longer than most: each
step reads and writes the same state records under the same lock, and the order of those writes
(not bootable before the first byte is written, bootable only after the read-back, the slot left
behind recorded before the link moves) is what makes every step safe to kill, so it is best read
in one place. The tree manifest and the meter are :mod:`appliance.firmware.slottree`'s.

One module of this size on purpose: the slots' state, the install, the switch and the
clean-up share one lock and one state file, and every step's idempotence depends on what the
others record there.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.firmware import bundle as _bundle
from appliance.firmware.slottree import (
    FirmwareError,
    Meter,
    Progress,
    ShouldStop,
    SlotCorrupt,
    SlotNotBootable,
    record_tree,
    remove_tree,
    tree_sha256,
    verify_tree,
)
from appliance.system.atomic import atomic_write_text, exclusive_lock, fsync_dir
from appliance.system.errors import ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.facts import parse_key_values, read_firmware_release, write_firmware_release
from appliance.system.paths import Layout, layout
from appliance.system.safejson import read_json

STATE_FORMAT = 1
INSTALLING = "installing"
BOOTABLE = "bootable"
_MAX_OS_RELEASE = 4096


@dataclass(frozen=True)
class SlotImage:
    """A verified system image in a slot: its version, file count, bytes and tree hash."""

    slot: str
    version: str
    files: int
    size: int
    tree_sha256: str


# --- Helpers ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _state_path(the_layout: Layout, slot: str) -> Path:
    the_layout.slot_dir(slot)  # validates the name
    return the_layout.firmware_state_dir / f"{slot}.json"


def _switch_path(the_layout: Layout) -> Path:
    return the_layout.firmware_state_dir / "switch.json"


@contextlib.contextmanager
def _locked(the_layout: Layout) -> Iterator[None]:
    the_layout.firmware_state_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(the_layout.firmware_state_dir / "lock"):
        yield


def _read_json(path: Path) -> dict[str, Any] | None:
    data = read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise MalformedApplianceFile(f"{path} does not hold a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _slot_state(the_layout: Layout, slot: str) -> dict[str, Any] | None:
    return _read_json(_state_path(the_layout, slot))


def _image_from_state(slot: str, state: dict[str, Any]) -> SlotImage:
    try:
        return SlotImage(
            slot=slot,
            version=str(state["version"]),
            files=int(state["files"]),
            size=int(state["size"]),
            tree_sha256=str(state["tree_sha256"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedApplianceFile(f"the state of {slot} is incomplete: {exc}") from exc


# --- Slots --------------------------------------------------------------------------------


def active_slot(root: Path | None = None) -> str:
    """The slot ``system/active`` points at (a plain slot name in ``system/``)."""
    the_layout = layout(root)
    link = the_layout.active_system
    try:
        target = os.readlink(link)
    except FileNotFoundError as exc:
        raise ApplianceNotInitialized(f"no active system at {link}") from exc
    except OSError as exc:
        raise MalformedApplianceFile(f"{link} is not a symbolic link to a slot") from exc
    try:
        slot_dir = the_layout.slot_dir(target)
    except ValueError as exc:
        raise MalformedApplianceFile(f"{link} points at {target!r}, not a firmware slot") from exc
    if slot_dir.is_symlink() or not slot_dir.is_dir():
        raise MalformedApplianceFile(f"{link} points at {target!r}, which is not a directory")
    return target


def inactive_slot(root: Path | None = None) -> str:
    """The slot an upgrade installs into: ``slot-b`` while ``slot-a`` runs, else ``slot-a``."""
    return "slot-b" if active_slot(root) == "slot-a" else "slot-a"


def previous_slot(root: Path | None = None) -> str | None:
    """The slot the last :func:`slot_switch` left (what a rollback switches back to), if any."""
    record = _read_json(_switch_path(layout(root)))
    previous = record.get("previous") if record else None
    return previous if isinstance(previous, str) else None


def slot_bootable(slot: str, root: Path | None = None) -> bool:
    """Whether the slot was completely written and read back (its state says ``bootable``)."""
    the_layout = layout(root)
    state = _slot_state(the_layout, slot)
    return bool(state and state.get("state") == BOOTABLE and the_layout.slot_dir(slot).is_dir())


def slot_firmware_version(slot: str, root: Path | None = None) -> str:
    """The firmware version a slot holds: its ``etc/firmware-release``, else its manifest."""
    the_layout = layout(root)
    release = the_layout.slot_dir(slot) / "etc" / "firmware-release"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if not release.is_symlink():
            version = parse_key_values(release.read_text(encoding="utf-8")).get("FIRMWARE_VERSION")
            if version:
                return version
    state = _slot_state(the_layout, slot)
    if state and isinstance(state.get("version"), str) and state["version"]:
        return str(state["version"])
    raise FirmwareError(f"The firmware slot {slot} does not say which firmware it holds.")


def slot_image(slot: str, root: Path | None = None) -> SlotImage | None:
    """What a bootable slot's state records (version, files, bytes, tree hash), without
    reading the tree: None for a slot that is absent or not completely installed. The way
    back to the previous firmware (issue 18) records it at the commit and finds it again."""
    if not slot_bootable(slot, root):
        return None
    state = _slot_state(layout(root), slot)
    return _image_from_state(slot, state) if state else None


def slot_os_release(slot: str, root: Path | None = None) -> str | None:
    """The text of the slot's ``etc/SuSE-release`` (what phase 6 installs), or None."""
    path = layout(root).slot_dir(slot) / "etc" / "SuSE-release"
    if path.is_symlink():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


# --- Verifying and sealing --------------------------------------------------------------------


def _loaded_entries(slot: str, state: dict[str, Any] | None) -> list[dict[str, Any]]:
    entries = state.get("entries") if state else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SlotNotBootable(f"The firmware slot {slot} has no manifest to verify it against.")
    if state and state.get("tree_sha256") != tree_sha256(entries):
        raise SlotCorrupt(f"The manifest of the firmware slot {slot} was altered.")
    return entries


def slot_verify(
    slot: str,
    root: Path | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    rate_limit: int | None = None,
) -> SlotImage:
    """Read a whole slot back and hash it against its manifest; raise :class:`SlotCorrupt`.

    :class:`SlotNotBootable` when the slot has no manifest or was never completely written.
    """
    the_layout = layout(root)
    state = _slot_state(the_layout, slot)
    if not state or state.get("state") != BOOTABLE:
        raise SlotNotBootable(f"The firmware slot {slot} was not completely installed.")
    entries = _loaded_entries(slot, state)
    total = sum(int(entry.get("size", 0)) for entry in entries)
    meter = Meter(total, rate_limit, progress, should_stop)
    meter.report(force=True)
    verify_tree(the_layout.slot_dir(slot), entries, meter)
    meter.report(force=True)
    return _image_from_state(slot, state)


def _seal(the_layout: Layout, slot: str) -> dict[str, Any]:
    """Record the manifest of a slot we did not install (the demo's, or a restored one)."""
    entries = record_tree(the_layout.slot_dir(slot))
    return _record_bootable(
        the_layout,
        slot,
        entries,
        version=slot_firmware_version(slot, the_layout.root),
        bundle_sha256=None,
        sealed_at=_now(),
    )


def _record_bootable(
    the_layout: Layout, slot: str, entries: list[dict[str, Any]], **facts: Any
) -> dict[str, Any]:
    """Write and return the state that makes ``slot`` bootable: ``facts`` (its version, where
    it came from, when) and the manifest of its tree. One place for what a bootable slot
    records, whether a bundle installed it or it was sealed as found, so a later
    :func:`slot_verify` reads both alike."""
    files = [entry for entry in entries if entry["type"] == "file"]
    state = {
        "format": STATE_FORMAT,
        "slot": slot,
        "state": BOOTABLE,
        **facts,
        "files": len(files),
        "size": sum(entry["size"] for entry in files),
        "tree_sha256": tree_sha256(entries),
        "entries": entries,
    }
    _write_json(_state_path(the_layout, slot), state)
    return state


def slot_seal(slot: str, root: Path | None = None) -> SlotImage:
    """Mark an existing, trusted slot (the running one) bootable with a manifest of its tree.

    :func:`slot_switch` does this for the slot it leaves, so a rollback can verify it.
    """
    the_layout = layout(root)
    if not the_layout.slot_dir(slot).is_dir():
        raise FirmwareError(f"There is no firmware slot {slot}.")
    with _locked(the_layout):
        return _image_from_state(slot, _seal(the_layout, slot))


# --- Phase 2: install ---------------------------------------------------------------------


def _member_parts(member: tarfile.TarInfo) -> list[str]:
    return [part for part in member.name.split("/") if part not in ("", ".")]


def _image_size(handle: BinaryIO, manifest: _bundle.BundleManifest) -> int:
    """Bytes the image unpacks to, from its headers, every member checked (data seeked over)."""
    view = _bundle.PayloadView(handle, manifest.header_size, manifest.payload_size)
    checker = _bundle.MemberChecker()
    total = 0
    try:
        with tarfile.open(fileobj=view, mode="r:") as tar:  # type: ignore[call-overload]
            while (info := tar.next()) is not None:
                tar.members.clear()
                checker.check(info)
                if info.isreg():
                    total += info.size
    except tarfile.TarError as exc:
        raise _bundle.BundleFormatError(
            f"The bundle's system image is not a valid tar archive: {exc}."
        ) from exc
    return total


def _inside(staging: Path, path: Path) -> bool:
    real = os.path.realpath(path)
    top = os.path.realpath(staging)
    return real == top or real.startswith(top + os.sep)


def _unpack(
    handle: BinaryIO, manifest: _bundle.BundleManifest, staging: Path, meter: Meter
) -> list[dict[str, Any]]:
    """Stream the payload into ``staging`` (empty), hashing it whole and per file."""
    digest = hashlib.sha256()
    view = _bundle.PayloadView(handle, manifest.header_size, manifest.payload_size, digest)
    checker = _bundle.MemberChecker()
    entries: dict[str, dict[str, Any]] = {}

    def ensure_dirs(parts: list[str]) -> None:
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel not in entries:
                (staging / rel).mkdir(mode=0o700)
                entries[rel] = {"path": rel, "type": "dir", "mode": 0o755}
            elif entries[rel]["type"] != "dir":
                raise _bundle.BundleUnsafePath(f'"{rel}" is not a directory in the image.')

    try:
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=view, mode="r|", bufsize=_bundle.READ_SIZE, errorlevel=2
        ) as tar:
            for member in tar:
                checker.check(member)
                parts = _member_parts(member)
                if not parts:
                    continue
                rel = "/".join(parts)
                ensure_dirs(parts[:-1])
                dest = staging / rel
                if not _inside(staging, dest.parent):
                    raise _bundle.BundleUnsafePath(f'"{rel}" would be written outside the slot.')
                if member.isdir():
                    if rel not in entries:
                        dest.mkdir(mode=0o700)
                    entries[rel] = {
                        "path": rel,
                        "type": "dir",
                        "mode": (member.mode & 0o755) | 0o700,
                    }
                elif member.issym():
                    os.symlink(member.linkname, dest)
                    entries[rel] = {"path": rel, "type": "symlink", "target": member.linkname}
                else:
                    source = tar.extractfile(member)
                    if source is None:
                        raise _bundle.BundleUnsafePath(f'"{rel}" cannot be read from the image.')
                    mode = (member.mode & 0o755) | 0o600
                    entries[rel] = _write_member(source, dest, rel, mode, meter)
                meter.check_stop()
    except tarfile.TarError as exc:
        raise _bundle.BundleUnsafePath(
            f"The system image could not be unpacked safely: {exc}."
        ) from exc
    view.drain()
    if not hmac.compare_digest(digest.hexdigest(), manifest.payload_sha256):
        raise _bundle.BundleDigestMismatch(
            "The bundle file changed while its system image was being unpacked; nothing was "
            "installed. Download it again."
        )
    # Directory permissions last (deepest first), so a read-only directory is filled first.
    for rel in sorted((r for r, e in entries.items() if e["type"] == "dir"), reverse=True):
        os.chmod(staging / rel, entries[rel]["mode"])
    for dirpath, _dirnames, _filenames in os.walk(staging, topdown=False):
        fsync_dir(Path(dirpath))
    return [entries[rel] for rel in sorted(entries)]


def _write_member(
    source: BinaryIO, dest: Path, rel: str, mode: int, meter: Meter
) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        while data := source.read(meter.chunk):
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            digest.update(data)
            size += len(data)
            meter.advance(len(data))
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"path": rel, "type": "file", "mode": mode, "size": size, "sha256": digest.hexdigest()}


def slot_install(
    bundle: Path,
    root: Path | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    rate_limit: int | None = None,
    keys: list[bytes] | None = None,
    slot: str | None = None,
) -> SlotImage:
    """Phase 2: verify the bundle again and install its system image into the inactive slot.

    ``progress(done, total)`` counts the bytes hashed while verifying the bundle, written while
    unpacking and read back; ``rate_limit`` (bytes/s) paces the writes and the read-back;
    ``should_stop()`` is polled between chunks and raises :class:`InstallAborted` after removing
    the partial slot. Idempotent: a slot that already holds this bundle's verified image is
    returned at once. Never writes the active slot (``slot`` may name another inactive one).
    """
    the_layout = layout(root)
    target = slot or inactive_slot(root)
    slot_dir = the_layout.slot_dir(target)
    if target == active_slot(root):
        raise FirmwareError(f"The firmware slot {target} is running; it cannot be installed over.")
    with open(bundle, "rb") as handle:
        # Everything about the bundle is checked before anything is written, even a lock file:
        # the signature, every member's header and the payload's SHA-256. A hostile or damaged
        # bundle therefore changes nothing at all.
        manifest = _bundle.read_header(handle, keys, partial=False)
        state = _slot_state(the_layout, target)
        if _holds(state, manifest, slot_dir):
            return _image_from_state(target, state or {})
        unpacked = _image_size(handle, manifest)
        meter = Meter(manifest.payload_size + 2 * unpacked, rate_limit, progress, should_stop)
        meter.check_stop()
        meter.report(force=True)

        def hashed(done: int, total: int) -> None:
            meter.done = done
            meter.check_stop()
            meter.report()

        _bundle.hash_payload(handle, manifest, hashed)
        meter.done = manifest.payload_size
        with _locked(the_layout):
            if _bundle.read_header(handle, keys, partial=False) != manifest:
                raise _bundle.BundleDigestMismatch(
                    "The bundle file changed while it was being verified; nothing was installed."
                )
            if target == active_slot(root):  # again, under the lock: a switch may have run
                raise FirmwareError(f"The firmware slot {target} is running.")
            state = _slot_state(the_layout, target)
            if _holds(state, manifest, slot_dir):
                return _image_from_state(target, state or {})
            running = active_slot(root)
            running_state = _slot_state(the_layout, running)
            if not running_state or running_state.get("state") != BOOTABLE:
                # Seal the running slot now, while mail flows, so the switch in phase 6 (during
                # the downtime) need not hash it and a rollback can verify it.
                _seal(the_layout, running)
            return _install_locked(the_layout, target, handle, manifest, meter)


def _holds(state: dict[str, Any] | None, manifest: _bundle.BundleManifest, slot_dir: Path) -> bool:
    """Whether a slot already holds this bundle's image, completely installed."""
    return bool(
        state
        and state.get("state") == BOOTABLE
        and state.get("bundle_sha256") == manifest.payload_sha256
        and slot_dir.is_dir()
        and not slot_dir.is_symlink()
    )


def _install_locked(
    the_layout: Layout,
    target: str,
    handle: BinaryIO,
    manifest: _bundle.BundleManifest,
    meter: Meter,
) -> SlotImage:
    """Unpack, read back and rename the image into ``target``; called with the lock held."""
    slot_dir = the_layout.slot_dir(target)
    # Not bootable before anything is written: a crash from here on leaves an unusable slot.
    _write_json(
        _state_path(the_layout, target),
        {
            "format": STATE_FORMAT,
            "slot": target,
            "state": INSTALLING,
            "version": manifest.version,
            "bundle_sha256": manifest.payload_sha256,
            "started_at": _now(),
        },
    )
    staging = the_layout.firmware_staging_dir / target
    try:
        remove_tree(staging)
        staging.mkdir(parents=True, mode=0o700)
        entries = _unpack(handle, manifest, staging, meter)
        verify_tree(staging, entries, meter)  # the read-back
        remove_tree(slot_dir)  # an older image in the inactive slot
        os.replace(staging, slot_dir)
        fsync_dir(the_layout.system_dir)
        fsync_dir(staging.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_tree(staging)
        with contextlib.suppress(OSError):
            remove_tree(slot_dir)
        with contextlib.suppress(OSError):
            _state_path(the_layout, target).unlink(missing_ok=True)
        raise
    state = _record_bootable(
        the_layout,
        target,
        entries,
        version=manifest.version,
        os_release=manifest.os_release,
        bundle_sha256=manifest.payload_sha256,
        installed_at=_now(),
    )
    meter.done = meter.total
    meter.report(force=True)
    return _image_from_state(target, state)


# --- Phase 6: switch ----------------------------------------------------------------------


def slot_switch(slot: str, root: Path | None = None, *, verify: bool = True) -> str:
    """Phase 6 (and rollback): atomically point ``system/active`` at ``slot``; return the previous.

    Refuses a slot that is not bootable, and (``verify``) one whose files no longer match its
    manifest. The slot being left is sealed with a manifest if it has none, and recorded in
    ``switch.json`` before the link moves, so a rollback knows where to return. Idempotent:
    when ``slot`` is already active, the recorded previous slot is returned (``slot`` itself if
    none is recorded).
    """
    the_layout = layout(root)
    slot_dir = the_layout.slot_dir(slot)
    with _locked(the_layout):
        current = active_slot(root)
        if current == slot:
            record = _read_json(_switch_path(the_layout))
            if record and record.get("active") == slot and isinstance(record.get("previous"), str):
                return str(record["previous"])
            return slot
        if slot_dir.is_symlink() or not slot_dir.is_dir():
            raise SlotNotBootable(f"There is no firmware slot {slot}.")
        state = _slot_state(the_layout, slot)
        if not state or state.get("state") != BOOTABLE:
            raise SlotNotBootable(
                f"The firmware slot {slot} was not completely installed and verified; the "
                "system was not switched."
            )
        if verify:
            verify_tree(slot_dir, _loaded_entries(slot, state), None)
        current_state = _slot_state(the_layout, current)
        if not current_state or current_state.get("state") != BOOTABLE:
            _seal(the_layout, current)
        _write_json(
            _switch_path(the_layout),
            {"active": slot, "previous": current, "switched_at": _now()},
        )
        temporary = the_layout.system_dir / f".active.{os.getpid()}.tmp"
        temporary.unlink(missing_ok=True)
        os.symlink(slot, temporary)
        os.replace(temporary, the_layout.active_system)
        fsync_dir(the_layout.system_dir)
    return current


# --- Firmware level -----------------------------------------------------------------------


@dataclass(frozen=True)
class FirmwareLevel:
    """What the appliance reports as its firmware: the version and the OS release text."""

    version: str
    os_release: str | None


def firmware_level(root: Path | None = None) -> FirmwareLevel:
    """The current firmware version and the whole ``etc/SuSE-release`` text (for a rollback)."""
    the_layout = layout(root)
    version = read_firmware_release(root).get("FIRMWARE_VERSION", "")
    try:
        os_release: str | None = the_layout.os_release.read_text(encoding="utf-8")
    except FileNotFoundError:
        os_release = None
    return FirmwareLevel(version, os_release)


def firmware_level_set(version: str, os_release: str | None, root: Path | None = None) -> None:
    """Write ``FIRMWARE_VERSION`` into ``etc/firmware-release`` and (if given) ``SuSE-release``.

    ``os_release`` is the whole text of ``etc/SuSE-release`` (see :func:`slot_os_release`; a
    single line gets its newline). Both writes are atomic and skipped when nothing changes, so
    phase 6 and a rollback may run it again; restoring :func:`firmware_level`'s values before
    the upgrade gives back the same bytes.
    """
    _bundle.version_tuple(version)  # ValueError for anything but a version
    if os_release is not None:
        if "\x00" in os_release or len(os_release) > _MAX_OS_RELEASE or not os_release.strip():
            raise ValueError("the OS release must be non-empty text of at most 4096 characters")
        if not os_release.endswith("\n"):
            os_release += "\n"
    the_layout = layout(root)
    if os_release is not None:
        try:
            current = the_layout.os_release.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != os_release:
            atomic_write_text(the_layout.os_release, os_release)
    values = read_firmware_release(root)
    if values.get("FIRMWARE_VERSION") != version:
        values["FIRMWARE_VERSION"] = version
        write_firmware_release(values, root)


# --- Phase 9: clean up --------------------------------------------------------------------


def slot_remove(slot: str, root: Path | None = None) -> int:
    """Remove a slot that is not running, with its state; return the bytes freed."""
    the_layout = layout(root)
    slot_dir = the_layout.slot_dir(slot)
    with _locked(the_layout):
        if slot == active_slot(root):
            raise FirmwareError(f"The firmware slot {slot} is running; it cannot be removed.")
        freed = remove_tree(slot_dir)
        _state_path(the_layout, slot).unlink(missing_ok=True)
        fsync_dir(the_layout.system_dir)
    return freed


def staging_cleanup(root: Path | None = None) -> int:
    """Phase 9: remove staged and half-installed slots and stray temporary links; bytes freed.

    Never touches the running slot or a bootable one (the previous slot stays for a rollback
    until the administrator removes it).
    """
    the_layout = layout(root)
    freed = 0
    with _locked(the_layout):
        staging = the_layout.firmware_staging_dir
        if staging.is_dir():
            for entry in staging.iterdir():
                freed += remove_tree(entry)
            staging.rmdir()
        for temporary in the_layout.system_dir.glob(".active.*.tmp"):
            freed += remove_tree(temporary)
        running = active_slot(root)
        for state_file in the_layout.firmware_state_dir.glob("slot-*.json"):
            slot = state_file.stem
            try:
                state = _read_json(state_file)
            except MalformedApplianceFile:
                state = None
            if slot == running or (state and state.get("state") == BOOTABLE):
                continue
            with contextlib.suppress(ValueError):
                freed += remove_tree(the_layout.slot_dir(slot))
            state_file.unlink(missing_ok=True)
        fsync_dir(the_layout.system_dir)
    return freed
