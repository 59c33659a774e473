"""The update feed: which firmware bundles the vendor offers, and where to get them.

A feed is one ``feed.json``::

    {"format": 1,
     "bundles": [{"version": "2.8.1.0", "min_version": "2.8.0.0",
                  "file": "lmi-firmware-2.8.1.0.bundle", "size": N, "sha256": "hex",
                  "release_notes": "..."}]}

``file`` is relative to the feed; ``size`` and ``sha256`` describe the whole bundle file, so a
download can be checked before the bundle itself is opened. The feed is not signed: it only
points at bundles, and every bundle is verified against the trusted keys before use. Fetching a
feed over HTTP belongs to the upgrades app, which hands the bytes to :func:`parse_feed`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from appliance.firmware.bundle import (
    MAX_MANIFEST,
    MAX_PAYLOAD,
    file_sha256,
    header_size_for,
    read_manifest_unverified,
    version_tuple,
)
from appliance.firmware.vendorjson import load_vendor_json
from appliance.system.atomic import atomic_open, atomic_write_bytes, exclusive_lock
from appliance.system.errors import ApplianceError

FEED_FILE = "feed.json"
FEED_FORMAT = 1
MAX_FEED = 1024 * 1024
MAX_ENTRIES = 1000
MAX_NOTES = 64 * 1024
# The largest bundle file a feed may announce: the biggest header plus the biggest payload.
MAX_BUNDLE_FILE = header_size_for(MAX_MANIFEST) + MAX_PAYLOAD
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")


class FeedError(ApplianceError):
    """A feed cannot be used; the message says why in an administrator's words."""


@dataclass(frozen=True)
class FeedEntry:
    """One bundle the feed offers. ``url`` is absolute: an http(s) URL or a local file path."""

    version: str
    min_version: str
    url: str
    size: int
    sha256: str
    release_notes: str


def bundle_file_name(version: str) -> str:
    """The name a bundle of ``version`` gets in a feed, e.g. ``lmi-firmware-2.8.1.0.bundle``."""
    version_tuple(version)
    return f"lmi-firmware-{version}.bundle"


def _resolver(base: str) -> Callable[[str], str]:
    """A function turning a file name of the feed into an absolute URL or path."""
    if not isinstance(base, str) or not base:
        raise FeedError("The feed's location is empty.")
    scheme = urlsplit(base).scheme.lower()
    if scheme in ("http", "https"):
        # ``base`` is the URL of feed.json (or of its directory, ending in "/").
        return lambda name: urljoin(base, name)
    if scheme and len(scheme) > 1:
        raise FeedError(
            f"The feed's location {base[:200]} is neither an http(s) URL nor a local directory."
        )
    directory = Path(base).absolute()
    if directory.name == FEED_FILE or (directory.suffix == ".json" and not directory.is_dir()):
        directory = directory.parent
    return lambda name: str(directory / name)


def _entry(index: int, raw: Any, resolve: Callable[[str], str]) -> FeedEntry:
    where = f"Feed entry {index}"
    if not isinstance(raw, dict):
        raise FeedError(f"{where} is not a JSON object.")
    for name in ("version", "min_version", "file", "size", "sha256"):
        if name not in raw:
            raise FeedError(f'{where} lacks the field "{name}".')
    versions = {}
    for name in ("version", "min_version"):
        try:
            versions[name] = version_tuple(raw[name])
        except ValueError:
            raise FeedError(
                f'{where} has an invalid "{name}": expected a firmware version like 2.8.1.0.'
            ) from None
    if versions["min_version"] > versions["version"]:
        raise FeedError(f'{where} has a "min_version" newer than its "version".')
    file_name = raw["file"]
    if (
        not isinstance(file_name, str)
        or "/" in file_name
        or "\\" in file_name
        or ".." in file_name
        or not _FILE_NAME.fullmatch(file_name)
    ):
        raise FeedError(
            f'{where} has an invalid "file": expected a plain file name in the feed\'s '
            'directory (no "/" or "..").'
        )
    size = raw["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise FeedError(f'{where} has an invalid "size": expected a positive number of bytes.')
    if size > MAX_BUNDLE_FILE:
        raise FeedError(
            f"{where} announces a bundle of {size} bytes, larger than this console accepts."
        )
    sha256 = raw["sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise FeedError(f'{where} has an invalid "sha256": expected 64 hexadecimal digits.')
    notes = raw.get("release_notes", "")
    if not isinstance(notes, str) or len(notes) > MAX_NOTES:
        raise FeedError(f'{where} has invalid "release_notes": expected text of at most 64 KiB.')
    return FeedEntry(
        version=raw["version"],
        min_version=raw["min_version"],
        url=resolve(file_name),
        size=size,
        sha256=sha256.lower(),
        release_notes=notes,
    )


def _load(data: bytes) -> dict[str, Any]:
    document = load_vendor_json(
        data,
        MAX_FEED,
        FeedError,
        not_bytes="The feed must be given as bytes.",
        too_large="The feed has {size} bytes; this console reads at most 1 MiB.",
        not_json="The feed is not valid JSON.",
    )
    if not isinstance(document, dict):
        raise FeedError("The feed is not a JSON object.")
    if document.get("format") != FEED_FORMAT or isinstance(document.get("format"), bool):
        raise FeedError(
            f"The feed has format {str(document.get('format'))[:20]}; this console reads format "
            f"{FEED_FORMAT} only."
        )
    bundles = document.get("bundles")
    if not isinstance(bundles, list):
        raise FeedError('The feed has no "bundles" list.')
    if len(bundles) > MAX_ENTRIES:
        raise FeedError(f"The feed lists {len(bundles)} bundles; at most {MAX_ENTRIES} are read.")
    return document


def parse_feed(data: bytes, base: str) -> list[FeedEntry]:
    """Parse and validate a feed; ``base`` is where it came from (the URL of feed.json, or the
    local directory holding it), against which each ``file`` is resolved.

    Entries come back newest version first. Raises :class:`FeedError` naming the problem.
    Unknown fields are ignored so a newer feed stays readable.
    """
    document = _load(data)
    resolve = _resolver(base)
    entries = [_entry(index + 1, raw, resolve) for index, raw in enumerate(document["bundles"])]
    seen: set[tuple[int, ...]] = set()
    for entry in entries:
        version = version_tuple(entry.version)
        if version in seen:
            raise FeedError(f"The feed lists version {entry.version} twice.")
        seen.add(version)
    return sorted(entries, key=lambda entry: version_tuple(entry.version), reverse=True)


def publish(feed_dir: Path, bundle: Path, release_notes: str | None = None) -> FeedEntry:
    """Vendor side: copy a bundle into ``feed_dir`` and list it in ``feed.json``.

    The bundle's manifest is checked (format, fields, size; the signature is not judged here,
    the appliance does that) and gives the version and, unless ``release_notes`` is passed, the
    notes. An entry of the same version is replaced, others are kept; feed.json is rewritten
    atomically.
    """
    feed_dir = Path(feed_dir)
    bundle = Path(bundle)
    try:
        manifest = read_manifest_unverified(bundle)
    except FileNotFoundError:
        raise FeedError(f"There is no bundle at {bundle}.") from None
    notes = manifest.release_notes if release_notes is None else release_notes
    if len(notes) > MAX_NOTES:
        raise FeedError("The release notes are longer than 64 KiB.")
    file_name = bundle_file_name(manifest.version)
    feed_dir.mkdir(parents=True, exist_ok=True)
    destination = feed_dir / file_name
    with exclusive_lock(feed_dir / ".feed.lock", 0o644):
        feed_path = feed_dir / FEED_FILE
        try:
            existing = feed_path.read_bytes()
            document = _load(existing)
            parse_feed(existing, str(feed_dir))  # refuse to extend a broken feed
        except FileNotFoundError:
            document = {"format": FEED_FORMAT, "bundles": []}
        except FeedError as exc:
            raise FeedError(f"The existing {feed_path} cannot be extended: {exc}") from None

        if not (destination.exists() and destination.samefile(bundle)):
            with open(bundle, "rb") as source, atomic_open(destination, 0o644) as target:
                shutil.copyfileobj(source, target, 1024 * 1024)
        size, sha256 = file_sha256(destination)
        if size != manifest.total_size:
            raise FeedError(f"The bundle {bundle} changed while it was being published.")

        raw = {
            "version": manifest.version,
            "min_version": manifest.min_version,
            "file": file_name,
            "size": size,
            "sha256": sha256,
            "release_notes": notes,
        }
        others = [
            entry
            for entry in document["bundles"]
            if version_tuple(entry["version"]) != version_tuple(manifest.version)
        ]
        bundles = sorted(
            [*others, raw], key=lambda entry: version_tuple(entry["version"]), reverse=True
        )
        text = json.dumps({"format": FEED_FORMAT, "bundles": bundles}, indent=2, sort_keys=True)
        data = (text + "\n").encode()
        parse_feed(data, str(feed_dir))  # never write a feed the console would refuse
        atomic_write_bytes(feed_path, data, 0o644)
    return _entry(1, raw, _resolver(str(feed_dir)))
