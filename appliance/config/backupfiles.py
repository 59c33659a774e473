"""Which files a configuration backup carries, where each comes from and where it may go back.

A backup holds the configuration XML of ``etc/mailsec/cpe``, the network settings, the host name
and the ``$(FILE/...)`` lists, which live only under :data:`LIST_DIRS`; the message stores'
retention travels beside them. Reading them from the running appliance and checking where a
restore would write them are two sides of one rule, so they live together.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from appliance.config.backupformat import BackupRejected
from appliance.mail import msgstore
from appliance.system.errors import ApplianceNotInitialized
from appliance.system.facts import read_appliance_text
from appliance.system.paths import Layout, layout, resolve_inside

CPE = "etc/mailsec/cpe/"
NETWORK = "etc/sysconfig/network/"
HOSTNAME = "etc/HOSTNAME"
# The only places a $(FILE) list is backed up from and restored to, whatever a backup's policy
# objects say: an allow-list, so a file the console does not know about (cron, ssh keys, a
# library, a lease) is never written. Under each, any depth, no symbolic link out.
LIST_DIRS = ("etc/mailsec/lists/",)


def hostname(the_layout: Layout) -> str:
    """The running host name; :class:`MalformedApplianceFile` when ``etc/HOSTNAME`` is damaged.

    A backup is not made of a damaged host name: its restore would be refused.
    """
    try:
        return read_appliance_text(the_layout.hostname_file, the_layout.root).strip()
    except FileNotFoundError:
        return ""


def plain_files(directory: Path, pattern: str) -> list[Path]:
    """Regular, non-hidden files directly in ``directory`` (symlinks and subdirectories not)."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.glob(pattern)
        if path.is_file() and not path.is_symlink() and not path.name.startswith(".")
    )


def _macro_files(root: Path) -> dict[str, Path]:
    """``{relative path: host path}`` of the files named by $(FILE) macros on this appliance."""
    from appliance.config.store import file_macro_objects

    try:
        objects = file_macro_objects(root)
    except ApplianceNotInitialized:
        return {}
    found: dict[str, Path] = {}
    real_root = Path(os.path.realpath(root))
    for obj in objects:
        relative = macro_relative(obj.file_path or "")
        if relative is None or not list_path(relative):
            continue  # a restore would refuse it: it is not backed up either
        try:
            path = resolve_inside(real_root, "/" + relative)
        except ValueError:
            continue  # a path outside the root is never backed up (nor restored)
        if not list_path(path.relative_to(real_root).as_posix()):
            continue  # a symbolic link out of the list directories
        if path.is_file():
            found[relative] = path
    return found


def macro_relative(appliance_path: str) -> str | None:
    parts = [part for part in appliance_path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def list_path(relative: str) -> bool:
    """A path a $(FILE) list may have: a file somewhere under one of :data:`LIST_DIRS`."""
    return any(relative.startswith(directory) and relative != directory for directory in LIST_DIRS)


def list_dirs_shown() -> str:
    return ", ".join("/" + directory for directory in LIST_DIRS)


def config_path(relative: str) -> bool:
    """A file restored by its place (configuration XML, network, host name), not by a macro."""
    if relative.startswith(CPE):
        rest = relative.removeprefix(CPE)
        return "/" not in rest and rest.endswith(".xml")
    if relative.startswith(NETWORK):
        return "/" not in relative.removeprefix(NETWORK)
    return relative == HOSTNAME


def check_target(relative: str, root: Path) -> Path:
    """The host path a backup file would be written to, refusing any way out of its place.

    The path is resolved as it is on disk now (symbolic links followed): a configuration file
    must land exactly at its own path, and a $(FILE) list inside the list directories, on a
    regular file or none, even through a symbolic link.
    """
    real_root = Path(os.path.realpath(root))
    try:
        target = resolve_inside(real_root, "/" + relative)
    except ValueError as exc:
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" would be written outside the appliance; the backup '
            "is refused."
        ) from exc
    landing = target.relative_to(real_root).as_posix()
    if config_path(relative) and landing != relative:
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" would be redirected to "{landing[:200]}"; the '
            "backup is refused."
        )
    if not config_path(relative) and not list_path(landing):
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" would be written to "{landing[:200]}", outside the '
            f"list directories ({list_dirs_shown()}); the backup is refused."
        )
    if target.is_dir():
        raise BackupRejected(f'The backup\'s "{relative[:200]}" is a directory on this appliance.')
    if target.exists() and not target.is_file():
        raise BackupRejected(
            f'The backup\'s "{relative[:200]}" is a device or special file on this appliance.'
        )
    return target


def store_retention(root: Path) -> dict[str, int]:
    if not layout(root).msgstore_db.is_file():
        return {}
    conn = msgstore.connect(root, readonly=True)
    try:
        rows = conn.execute("SELECT name, retention_days FROM message_store ORDER BY id").fetchall()
    finally:
        conn.close()
    return {str(name): int(days) for name, days in rows}


def collect_files(root: Path) -> dict[str, bytes]:
    the_layout = layout(root)
    files: dict[str, bytes] = {}
    sources = [
        *plain_files(the_layout.cpe_dir, "*.xml"),
        *plain_files(the_layout.network_dir, "*"),
    ]
    if the_layout.hostname_file.is_file():
        sources.append(the_layout.hostname_file)
    for path in sources:
        files[path.relative_to(root).as_posix()] = path.read_bytes()
    for relative, path in _macro_files(root).items():
        files[relative] = path.read_bytes()
    return files


@contextlib.contextmanager
def scratch_root(files: dict[str, bytes]) -> Iterator[Path]:
    """A throwaway appliance root holding ``files``: the appliance's own readers then parse a
    backup exactly as they parse the running configuration, in whichever format it is."""
    with tempfile.TemporaryDirectory(prefix="lmibak-") as scratch:
        base = Path(scratch)
        for relative, data in files.items():
            path = base / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        yield base
