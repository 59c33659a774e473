"""Configuration backups (Backup & Restore > System > Manage Configuration Backups).

A configuration backup is one file (suffix ``.lmibak``) that brings an appliance back to the
configuration it had: the configuration XML of ``etc/mailsec/cpe``, the files that
``$(FILE/...)`` policy objects name (the 2.8.1 upgrade is known to lose those), the network
settings, the message stores' retention and an opaque dict of the console's own settings.

This module keeps the backups directory: making a backup of the running configuration, listing,
importing, deleting and loading them. Around it: the file's layout
(:mod:`appliance.config.backupformat`), the seal (:mod:`appliance.config.backupmac`), which files
a backup carries (:mod:`appliance.config.backupfiles`) and the checks of what it holds
(:mod:`appliance.config.backupcheck`); then the diff (:mod:`appliance.config.backupdiff`) and
the restore (:mod:`appliance.config.backuprestore`).

Everything read from a backup is treated as hostile until proven otherwise: the whole archive is
checked (:func:`backup_load`) before a single byte of the appliance is changed, and the restore
itself is all or nothing (staged files, a journal, renames, crash recovery from the journal).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.config.backupcheck import (
    check_hostname,
    check_network,
    check_paths,
    check_settings,
    check_smtp,
    check_xml,
)
from appliance.config.backupfiles import CPE, collect_files, hostname, store_retention
from appliance.config.backupformat import (
    MAGIC,
    MAX_COMMENT_CHARS,
    MAX_HEADER_BYTES,
    TRIGGERS,
    BackupError,
    BackupHeader,
    BackupRejected,
    json_bytes,
    loads,
    pack,
    parse,
    parse_header,
    unpack,
)
from appliance.config.backupmac import appliance_key
from appliance.system.atomic import atomic_write_bytes, exclusive_lock, fsync_dir
from appliance.system.errors import ApplianceError, ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.facts import read_firmware_release
from appliance.system.paths import appliance_root, layout

SUFFIX = ".lmibak"
# The configuration format the 2.8.0 firmware writes; configconvert knows the others.
BASE_CONFIG_FORMAT = "2.8.0"

MAX_BACKUP_BYTES = 64 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}\.lmibak")


# --- Loaded backups -------------------------------------------------------------------------------


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


# --- Paths and names ------------------------------------------------------------------------------


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


# --- Reading the running configuration ------------------------------------------------------------


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


# --- Making a backup ------------------------------------------------------------------------------


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
    files = collect_files(base)
    if not any(name.startswith(CPE) for name in files):
        raise ApplianceNotInitialized(f"no configuration XML in {the_layout.cpe_dir}")
    created_at = datetime.now(UTC).replace(microsecond=0)

    members: dict[str, bytes] = {
        "appliance_settings.json": json_bytes({"store_retention": store_retention(base)}),
        "console.json": json_bytes(console),
    }
    for relative, data in files.items():
        members["files/" + relative] = data
    header: dict[str, Any] = {
        "created_at": created_at.isoformat(),
        "firmware_version": firmware_version,
        "config_format": config_format,
        "hostname": hostname(the_layout),
        "created_by": str(created_by),
        "comment": comment,
        "trigger": trigger,
    }
    data = pack(header, members, key=key, passphrase=passphrase)

    directory = the_layout.config_backups_dir
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock"):
        name = _new_name(directory, created_at, trigger)
        atomic_write_bytes(directory / name, data, 0o600)
    return parse_header(data, name, len(data), key)


# --- The backups directory ------------------------------------------------------------------------


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
    return parse_header(head, name, size, key)


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


def backup_leftovers_remove(root: Path | None = None) -> list[str]:
    """Delete the temporary files a writer that died mid-backup left; return their names.

    Taken under the directory's lock, which every writer holds while its file is written (and
    the kernel drops when a writer dies), so a backup being written now is never touched.
    """
    directory = layout(root).config_backups_dir
    if not directory.is_dir():
        return []
    removed = []
    with exclusive_lock(directory / ".lock"):
        for leftover in directory.glob(f".*{SUFFIX}.*.tmp"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
        if removed:
            fsync_dir(directory)
    return removed


# --- Loading and validating -----------------------------------------------------------------------


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
    result = {name: data for name, data in files.items() if not name.startswith(CPE)}
    result.update(converted)
    return result, source


def _load_bytes(data: bytes, name: str, passphrase: str | None, root: Path) -> LoadedBackup:
    if len(data) > MAX_BACKUP_BYTES:
        raise BackupRejected(
            f"The file is larger than {MAX_BACKUP_BYTES // (1024 * 1024)} MiB, too large for a "
            "configuration backup."
        )
    key = _key_or_none(root)
    parsed = parse(data, name, len(data), key)
    header = parsed.header
    running_firmware = _running_firmware(root)
    _check_firmware(header, running_firmware)
    members, verified = unpack(parsed, data[len(parsed.prefix) :], passphrase, key)
    files = {
        name.removeprefix("files/"): content
        for name, content in members.items()
        if name.startswith("files/")
    }
    if not any(name.startswith(CPE) for name in files):
        raise BackupRejected("The backup holds no configuration files.")
    check_xml(files)
    check_hostname(files)
    check_network(files)
    settings = check_settings(members["appliance_settings.json"])
    console = loads(members["console.json"], "console settings")
    if not isinstance(console, dict):
        raise BackupRejected("The backup's console settings are not a JSON object.")
    files, converted_from = _convert(files, header.config_format, _running_config_format(root))
    if converted_from is not None:
        check_xml(files)
    check_smtp(files)
    check_paths(files, root)
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
    parsed = parse(data, name_probe, len(data), key)
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
    return parse_header(data, name, len(data), key)
