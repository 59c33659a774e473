"""The download spool, var/spool/updates on the appliance: part files, their records, bundles.

Files are named for the bundle: its version and the first 12 hex digits of its SHA-256 (the
"bundle id", e.g. ``2.8.1.0-3f2a9c0d1e4b``), so a bundle the vendor re-spun under the same
version never meets the bytes of the first one. A bundle being downloaded is
``firmware-<id>.part``; beside it ``firmware-<id>.part.json`` records which bundle the bytes
belong to (URL, size, SHA-256, and the server's validators), so a later attempt resumes only
the same bundle and starts over for any other. A verified bundle is renamed to
``firmware-<id>.bundle`` (fsync of the file, rename, fsync of the directory). The XPU directory
beside them holds the firmware logs and is never touched here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.system.atomic import atomic_write_text, fsync_dir
from appliance.system.paths import layout

# Room kept free beyond the bundle itself, so a download never fills the disk to the last block.
FREE_SPACE_MARGIN = 64 * 1024 * 1024
SAFE_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def spool_dir(root: Path | None = None) -> Path:
    """var/spool/updates under the appliance root (created on first use)."""
    return layout(root).xpu_dir.parent


def bundle_id(version: str, sha256: str) -> str:
    """The name of one bundle in the spool: version and the start of its SHA-256."""
    if not SAFE_VERSION.match(version):
        raise ValueError(f"not a firmware version: {version!r}")
    if not SHA256.match(sha256):
        raise ValueError(f"not a SHA-256: {sha256!r}")
    return f"{version}-{sha256[:12].lower()}"


def _stem(bundle: str) -> str:
    version, _, digest = bundle.rpartition("-")
    if not SAFE_VERSION.match(version) or not re.fullmatch(r"[0-9a-f]{12}", digest):
        raise ValueError(f"not a bundle id: {bundle!r}")
    return f"firmware-{bundle}"


def part_path(bundle: str, root: Path | None = None) -> Path:
    return spool_dir(root) / f"{_stem(bundle)}.part"


def record_path(bundle: str, root: Path | None = None) -> Path:
    return spool_dir(root) / f"{_stem(bundle)}.part.json"


def bundle_path(bundle: str, root: Path | None = None) -> Path:
    return spool_dir(root) / f"{_stem(bundle)}.bundle"


@dataclass(frozen=True)
class PartRecord:
    """Which bundle a part file holds the first bytes of."""

    url: str
    size: int
    sha256: str
    etag: str = ""
    last_modified: str = ""

    def same_bundle(self, url: str, size: int, sha256: str) -> bool:
        return (self.url, self.size, self.sha256.lower()) == (url, size, sha256.lower())


def ensure_spool(root: Path | None = None) -> Path:
    directory = spool_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def read_record(bundle: str, root: Path | None = None) -> PartRecord | None:
    """The record beside a part file; None when absent or unreadable (the part is then unknown)."""
    try:
        data = json.loads(record_path(bundle, root).read_text(encoding="utf-8"))
        return PartRecord(
            url=str(data["url"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            etag=str(data.get("etag", "")),
            last_modified=str(data.get("last_modified", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(bundle: str, record: PartRecord, root: Path | None = None) -> None:
    atomic_write_text(record_path(bundle, root), json.dumps(asdict(record), sort_keys=True))


def part_size(bundle: str, root: Path | None = None) -> int:
    try:
        return part_path(bundle, root).stat().st_size
    except FileNotFoundError:
        return 0


def discard_part(bundle: str, root: Path | None = None) -> None:
    """Delete a part file and its record (cancel, a rejected bundle, another bundle's bytes)."""
    part_path(bundle, root).unlink(missing_ok=True)
    record_path(bundle, root).unlink(missing_ok=True)


def discard_other_parts(keep: str, root: Path | None = None) -> list[str]:
    """Delete the part files of any other bundle: one download at a time needs one part file."""
    directory = spool_dir(root)
    removed = []
    if not directory.is_dir():
        return removed
    kept = {part_path(keep, root).name, record_path(keep, root).name}
    for entry in directory.iterdir():
        if entry.name in kept or not entry.is_file():
            continue
        if entry.name.startswith("firmware-") and entry.name.endswith((".part", ".part.json")):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def publish_bundle(bundle: str, root: Path | None = None) -> Path:
    """Rename a verified part file to its bundle name, durably, and drop its record."""
    part = part_path(bundle, root)
    final = bundle_path(bundle, root)
    with part.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, final)
    record_path(bundle, root).unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final


def discard_bundle(bundle: str, root: Path | None = None) -> None:
    bundle_path(bundle, root).unlink(missing_ok=True)


def free_bytes(root: Path | None = None) -> int:
    """Free space on the disk holding the spool (of its nearest existing ancestor)."""
    path = spool_dir(root)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
