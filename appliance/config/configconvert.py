"""The lossless conversion to the 2.8.1 configuration format (phase 8 of the upgrade).

The format itself (one file, ``etc/mailsec/cpe/mailsec_config2_0.xml``, instead of the three
2.8.0 files) is :mod:`appliance.config.configformat`'s; here it meets the disk.

Which format is on disk is decided by one fact: the 2.8.1 file exists. It is written atomically
and verified before the 2.8.0 files are removed, so a crash in between leaves a complete 2.8.1
file that every reader already uses, and a rerun of :func:`config_convert` just finishes the
clean-up. Writers take a ``flock`` on the ``cpe`` directory itself (no lock file, so a rollback
leaves the directory exactly as it was) so that a section write cannot race a conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from appliance.config.configformat import (
    CONFIG_FILE,
    CONFIG_FORMATS,
    CURRENT_FORMAT,
    LEGACY_FILES,
    LEGACY_FORMAT,
    Configuration,
    macro_path,
    parse_config,
    parse_legacy,
    render_config,
)
from appliance.config.smtp import SmtpSettings
from appliance.system.atomic import atomic_write_bytes, fsync_dir
from appliance.system.errors import ApplianceError, ApplianceNotInitialized
from appliance.system.paths import appliance_root, layout, resolve_inside

T = TypeVar("T")


class ConfigConvertError(ApplianceError, ValueError):
    """The configuration cannot be converted (or reverted); ``str(exc)`` says why and what to do."""


@dataclass(frozen=True)
class CarriedFile:
    """A file a ``$(FILE/...)`` policy object reads, as found when the configuration converted."""

    path: str  # as seen on the appliance
    sha256: str
    size: int


@dataclass(frozen=True)
class ConvertResult:
    """What phase 8 converted, for the run's log and counts."""

    source_format: str
    objects: int
    rules: int
    quarantines: int
    settings: int
    files_carried: tuple[CarriedFile, ...]
    # $(FILE) paths that did not exist before the conversion either (already broken references).
    files_missing: tuple[str, ...] = ()


# --- Paths, format and locking --------------------------------------------------------------------


def config_path(root: Path | None = None) -> Path:
    """Host path of the 2.8.1 configuration file."""
    return layout(root).cpe_dir / Path(CONFIG_FILE).name


def config_format(root: Path | None = None) -> str:
    """``"2.8.1"`` when the 2.8.1 file is on disk, else ``"2.8.0"`` (also for a bare root).

    The 2.8.1 file is only ever renamed into place complete and verified, so its presence alone
    decides, even if a crash left 2.8.0 files next to it.
    """
    return CURRENT_FORMAT if config_path(root).is_file() else LEGACY_FORMAT


@contextlib.contextmanager
def _config_lock(root: Path | None) -> Iterator[None]:
    """Exclusive flock on the cpe directory: one writer or converter at a time, no lock file."""
    directory = layout(root).cpe_dir
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as exc:
        raise ApplianceNotInitialized(f"no configuration directory at {directory}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- Reading and writing one section in whichever format is on disk -------------------------------


def read_config(root: Path | None = None) -> Configuration | None:
    """The 2.8.1 configuration, or ``None`` when the appliance is still on the 2.8.0 format."""
    try:
        data = config_path(root).read_bytes()
    except FileNotFoundError:
        return None
    return parse_config(data)


def read_section(
    root: Path | None,
    legacy_path: Path,
    parse_legacy_file: Callable[[bytes], T],
    section: Callable[[Configuration], T | None],
    what: str,
) -> T:
    """Read one part of the configuration from the 2.8.1 file, else from its 2.8.0 file.

    If the 2.8.0 file vanished under us, a conversion just finished: read the 2.8.1 file.
    """
    for _ in range(2):
        config = read_config(root)
        if config is not None:
            value = section(config)
            if value is None:
                raise ApplianceNotInitialized(f"no {what} in {config_path(root)}")
            return value
        try:
            data = legacy_path.read_bytes()
        except FileNotFoundError:
            continue
        return parse_legacy_file(data)
    raise ApplianceNotInitialized(f"no {what} at {legacy_path}")


def _file_digests(config: Configuration, base: Path) -> dict[str, str]:
    """sha256 of each existing ``$(FILE)`` list, keyed by appliance path (missing ones left out)."""
    digests: dict[str, str] = {}
    for obj in config.policy_objects or ():
        path = macro_path(obj.value)
        if path is None or path in digests:
            continue
        try:
            data = resolve_inside(base, path).read_bytes()
        except (OSError, ValueError):
            continue
        digests[path] = hashlib.sha256(data).hexdigest()
    return digests


def write_section(
    root: Path | None,
    legacy_path: Path,
    legacy_bytes: bytes,
    update: Callable[[Configuration], Configuration],
) -> None:
    """Write one part of the configuration in whichever format is on disk.

    ``legacy_bytes`` is the 2.8.0 rendering, produced by the caller first so that the same
    validation applies in both formats; ``update`` returns the 2.8.1 configuration with the
    caller's section replaced. The 2.8.1 file is rewritten whole (read, replace the section,
    render with fresh list digests, atomic write) under the directory lock, so a section write
    can neither lose another's nor land in a 2.8.0 file a conversion is about to remove.
    """
    base = appliance_root(root)
    with _config_lock(base):
        current = read_config(base)
        if current is None:
            atomic_write_bytes(legacy_path, legacy_bytes)
            return
        updated = update(current)
        atomic_write_bytes(config_path(base), render_config(updated, _file_digests(updated, base)))


# --- Conversion -----------------------------------------------------------------------------------


def _check_paths(config: Configuration) -> None:
    """Refuse ``$(FILE)`` paths that could never name a file inside the appliance."""
    for obj in config.policy_objects or ():
        path = macro_path(obj.value)
        if path is None:
            continue
        parts = path.split("/")
        if ".." in parts or "\x00" in path:
            raise ConfigConvertError(
                f"policy object {obj.name!r} names {path!r}, outside the appliance's files: "
                "change the object to a path without '..' and try again"
            )


def _check_carried(config: Configuration, base: Path) -> None:
    """Each list recorded with a digest is still there (its content may since have been edited)."""
    for path, digest in config.file_refs:
        if digest is not None and not resolve_inside(base, path).is_file():
            raise ConfigConvertError(f"the list file {path} was not carried over")


def _counts(
    config: Configuration, source_format: str, digests: Mapping[str, str], base: Path
) -> ConvertResult:
    carried: list[CarriedFile] = []
    missing: list[str] = []
    seen: set[str] = set()
    for obj in config.policy_objects or ():
        path = macro_path(obj.value)
        if path is None or path in seen:
            continue
        seen.add(path)
        if path not in digests:
            missing.append(path)
            continue
        size = resolve_inside(base, path).stat().st_size
        carried.append(CarriedFile(path, digests[path], size))
    policy = config.mail_policy
    return ConvertResult(
        source_format=source_format,
        objects=len(config.policy_objects or ()),
        rules=len(policy.rules) if policy else 0,
        quarantines=len(policy.quarantine) if policy else 0,
        settings=len(fields(SmtpSettings)) if config.smtp is not None else 0,
        files_carried=tuple(carried),
        files_missing=tuple(missing),
    )


def _convert(legacy: Configuration, digests: Mapping[str, str]) -> bytes:
    """Render ``legacy`` as 2.8.1 and prove the rendering reads back to the same configuration."""
    _check_paths(legacy)
    converted = Configuration(
        policy_objects=legacy.policy_objects,
        mail_policy=legacy.mail_policy,
        smtp=legacy.smtp,
        converted_from=LEGACY_FORMAT,
    )
    try:
        # No validation: an odd but readable 2.8.0 configuration converts as it is.
        data = render_config(converted, digests, validate=False)
    except ValueError as exc:
        raise ConfigConvertError(f"the configuration cannot be written as 2.8.1: {exc}") from exc
    _verify(legacy, data, digests)
    return data


def _verify(legacy: Configuration, data: bytes, digests: Mapping[str, str]) -> None:
    """Every object, rule and setting equal, and every list referenced with its digest."""
    try:
        reread = parse_config(data)
    except ApplianceError as exc:
        raise ConfigConvertError(f"the converted configuration does not read back: {exc}") from exc
    if not reread.same_settings(legacy):
        raise ConfigConvertError("the converted configuration differs from the 2.8.0 one")
    for path, digest in reread.file_refs:
        if digests.get(path) != digest:
            raise ConfigConvertError(f"the converted configuration lost the digest of {path}")


def convert_files(files: Mapping[str, bytes], source_format: str) -> dict[str, bytes]:
    """The same configuration in the current (2.8.1) format; a pure function for old backups.

    ``files`` maps paths relative to the appliance root to contents. The 2.8.0 files are
    replaced by the 2.8.1 file; every other entry is passed through unchanged. A ``$(FILE)``
    list's digest is recorded when the list is among ``files`` (as ``etc/...`` or
    ``files/etc/...``). Raises :class:`ConfigConvertError`, or the XML errors of
    :mod:`appliance.system.safexml`, with a clear message on bad input.
    """
    if source_format not in CONFIG_FORMATS:
        raise ConfigConvertError(
            f"unknown configuration format {source_format!r}: this firmware reads "
            f"{' and '.join(CONFIG_FORMATS)}"
        )
    result = dict(files)
    if source_format == CURRENT_FORMAT:
        if CONFIG_FILE in files:
            parse_config(files[CONFIG_FILE])
            for name in LEGACY_FILES:
                # Leftovers of an interrupted conversion: the 2.8.1 file is authoritative.
                result.pop(name, None)
        return result
    if CONFIG_FILE in files:
        raise ConfigConvertError(
            "the files claim format 2.8.0 but hold a 2.8.1 configuration: refusing to guess"
        )
    present = {name: files[name] for name in LEGACY_FILES if name in files}
    if not present:
        return result
    legacy = parse_legacy(present)
    digests: dict[str, str] = {}
    for obj in legacy.policy_objects or ():
        path = macro_path(obj.value)
        if path is None:
            continue
        for key in (path.lstrip("/"), "files" + path):
            if key in files:
                digests[path] = hashlib.sha256(files[key]).hexdigest()
                break
    data = _convert(legacy, digests)
    for name in present:
        del result[name]
    result[CONFIG_FILE] = data
    return result


def _rel_target(base: Path, relative: str) -> Path:
    if not relative or relative.startswith("/") or "\\" in relative:
        raise ConfigConvertError(f"not a path relative to the appliance root: {relative!r}")
    try:
        return resolve_inside(base, "/" + relative)
    except ValueError as exc:
        raise ConfigConvertError(str(exc)) from exc


def config_convert(root: Path | None = None) -> ConvertResult:
    """Phase 8: convert ``etc/mailsec/cpe`` to 2.8.1 in place, verified; idempotent.

    Reads the 2.8.0 files, renders and verifies the 2.8.1 file, writes it atomically, reads it
    back and verifies again, and only then removes the 2.8.0 files. A rerun after a crash
    anywhere finds either the untouched 2.8.0 files (start again) or the complete 2.8.1 file
    (finish the clean-up); on an already converted appliance it returns the same counts.
    """
    base = appliance_root(root)
    the_layout = layout(base)
    legacy_paths = {name: base / name for name in LEGACY_FILES}
    with _config_lock(base):
        current = read_config(base)
        if current is not None:
            for path in legacy_paths.values():
                path.unlink(missing_ok=True)
            fsync_dir(the_layout.cpe_dir)
            digests = {path: digest for path, digest in current.file_refs if digest is not None}
            _check_carried(current, base)
            return _counts(current, current.converted_from or CURRENT_FORMAT, digests, base)
        present: dict[str, bytes] = {}
        for name, path in legacy_paths.items():
            with contextlib.suppress(FileNotFoundError):
                present[name] = path.read_bytes()
        if not present:
            raise ApplianceNotInitialized(f"no configuration to convert in {the_layout.cpe_dir}")
        legacy = parse_legacy(present)
        digests = _file_digests(legacy, base)
        data = _convert(legacy, digests)
        target = config_path(base)
        atomic_write_bytes(target, data)
        _verify(legacy, target.read_bytes(), digests)
        for name in present:
            legacy_paths[name].unlink()
        fsync_dir(the_layout.cpe_dir)
        converted = parse_config(data)
        _check_carried(converted, base)
        return _counts(converted, LEGACY_FORMAT, digests, base)


def config_revert(backup_files: Mapping[str, bytes], root: Path | None = None) -> None:
    """Rollback: put the 2.8.0 configuration files back exactly, then remove the 2.8.1 file.

    ``backup_files`` maps paths relative to the appliance root (``etc/mailsec/cpe/...``, and
    any other file saved with them) to their exact bytes. Everything is checked before
    anything is written; the 2.8.1 file goes last, so a crash part-way leaves the 2.8.1
    configuration in force and a rerun completes the revert.
    """
    base = appliance_root(root)
    targets = {name: _rel_target(base, name) for name in backup_files}
    legacy = {name: backup_files[name] for name in LEGACY_FILES if name in backup_files}
    if not legacy and CONFIG_FILE not in backup_files:
        raise ConfigConvertError(
            "the saved files hold no 2.8.0 configuration: refusing to remove the current one"
        )
    parse_legacy(legacy)  # our own saved bytes, but never write what would not read back
    with _config_lock(base):
        for name, data in backup_files.items():
            target = targets[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, bytes(data))
        if CONFIG_FILE not in backup_files:
            config_path(base).unlink(missing_ok=True)
        fsync_dir(layout(base).cpe_dir)
