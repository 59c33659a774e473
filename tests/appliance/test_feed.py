"""The update feed: parsing with clear refusals, and publishing bundles into it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.firmware.feed import FeedEntry, FeedError, bundle_file_name, parse_feed, publish
from tests.upgrades import bundles

VENDOR = bundles.new_vendor()
SHA = "ab" * 32


def entry(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "version": "2.8.1.0",
        "min_version": "2.8.0.0",
        "file": "lmi-firmware-2.8.1.0.bundle",
        "size": 12_345_678,
        "sha256": SHA,
        "release_notes": "Upgrades the operating system to SLES 11.",
    }
    raw.update(overrides)
    return raw


def feed(*entries: dict[str, Any], **top: Any) -> bytes:
    document: dict[str, Any] = {"format": 1, "bundles": list(entries)}
    document.update(top)
    return json.dumps(document).encode()


def make_bundle(tmp_path: Path, version: str, notes: str = "notes") -> Path:
    """A small signed bundle of ``version`` (for 2.8.0.0 and later): what the feed lists is
    its manifest, so its image can be a few bytes."""
    out = tmp_path / f"build-{version}.bundle"
    return bundles.build(VENDOR, out, version=version, payload_bytes=1024, notes=notes)


def test_it_resolves_files_against_an_http_feed_url() -> None:
    entries = parse_feed(feed(entry()), "https://updates.example.com/lmi/feed.json")
    assert entries == [
        FeedEntry(
            version="2.8.1.0",
            min_version="2.8.0.0",
            url="https://updates.example.com/lmi/lmi-firmware-2.8.1.0.bundle",
            size=12_345_678,
            sha256=SHA,
            release_notes="Upgrades the operating system to SLES 11.",
        )
    ]


def test_it_resolves_files_against_a_local_directory(tmp_path: Path) -> None:
    (entry_,) = parse_feed(feed(entry()), str(tmp_path))
    assert entry_.url == str(tmp_path / "lmi-firmware-2.8.1.0.bundle")
    (entry_,) = parse_feed(feed(entry()), str(tmp_path / "feed.json"))
    assert entry_.url == str(tmp_path / "lmi-firmware-2.8.1.0.bundle")


def test_entries_come_newest_first_with_lowercase_digests() -> None:
    entries = parse_feed(
        feed(
            entry(version="2.8.0.0", min_version="2.7.0.0", file="a.bundle"),
            entry(version="2.10.0.0", file="c.bundle", sha256="AB" * 32),
            entry(version="2.8.1.0", file="b.bundle"),
        ),
        "http://127.0.0.1:8080/feed.json",
    )
    assert [e.version for e in entries] == ["2.10.0.0", "2.8.1.0", "2.8.0.0"]
    assert entries[0].sha256 == SHA


def test_an_empty_feed_offers_nothing() -> None:
    assert parse_feed(feed(), "http://127.0.0.1/feed.json") == []


def test_release_notes_are_optional_and_unknown_fields_ignored() -> None:
    raw = entry(extra="ignored")
    del raw["release_notes"]
    (parsed,) = parse_feed(feed(raw, generator="vendor-tool 1.0"), "http://h/feed.json")
    assert parsed.release_notes == ""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"bundles": []}).encode(), "format None"),
        (json.dumps({"format": 2, "bundles": []}).encode(), "format 2"),
        (json.dumps({"format": True, "bundles": []}).encode(), "format True"),
        (json.dumps({"format": 1}).encode(), 'no "bundles" list'),
        (json.dumps({"format": 1, "bundles": {}}).encode(), 'no "bundles" list'),
        (b" " * (1024 * 1024 + 1), "at most 1 MiB"),
        (feed(*[entry(version=f"2.8.{i}.0") for i in range(1001)]), "at most 1000"),
        (feed("a string"), "entry 1 is not a JSON object"),
        (feed(entry(), entry(version="2.8.1.00")), "entry 2"),
        (feed(entry(), entry(file="other.bundle")), "version 2.8.1.0 twice"),
    ],
)
def test_it_rejects_a_malformed_feed(data: bytes, message: str) -> None:
    with pytest.raises(FeedError, match=message):
        parse_feed(data, "https://updates.example.com/feed.json")


@pytest.mark.parametrize(
    ("key", "first"),
    [(b'"bundles": ', b"[]"), (b'"file": ', b'"other.bundle"')],
    ids=["in-the-feed", "in-an-entry"],
)
def test_it_rejects_a_feed_that_names_a_key_twice(key: bytes, first: bytes) -> None:
    # Which value counts would depend on the reader's parser; a feed must say one thing.
    data = feed(entry()).replace(key, key + first + b", " + key, 1)
    assert json.loads(data)["bundles"]  # a lenient parser takes the last and reads a bundle

    with pytest.raises(FeedError, match="not valid JSON"):
        parse_feed(data, "https://updates.example.com/feed.json")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"version": "2.8.x"}, 'invalid "version"'),
        ({"version": 2.8}, 'invalid "version"'),
        ({"min_version": ""}, 'invalid "min_version"'),
        ({"min_version": "2.9.0.0"}, '"min_version" newer'),
        ({"file": "../etc/passwd"}, 'invalid "file"'),
        ({"file": "sub/dir.bundle"}, 'invalid "file"'),
        ({"file": "/abs.bundle"}, 'invalid "file"'),
        ({"file": "..bundle"}, 'invalid "file"'),
        ({"file": "a\\b"}, 'invalid "file"'),
        ({"file": ""}, 'invalid "file"'),
        ({"file": ".hidden"}, 'invalid "file"'),
        ({"file": "https://evil.example/x.bundle"}, 'invalid "file"'),
        ({"file": 7}, 'invalid "file"'),
        ({"size": 0}, 'invalid "size"'),
        ({"size": -1}, 'invalid "size"'),
        ({"size": "100"}, 'invalid "size"'),
        ({"size": True}, 'invalid "size"'),
        ({"size": 1.5}, 'invalid "size"'),
        ({"size": 9 * 1024**3}, "larger than this console accepts"),
        ({"sha256": "ab" * 31}, 'invalid "sha256"'),
        ({"sha256": "zz" * 32}, 'invalid "sha256"'),
        ({"sha256": None}, 'invalid "sha256"'),
        ({"release_notes": 5}, 'invalid "release_notes"'),
        ({"release_notes": "x" * 70_000}, 'invalid "release_notes"'),
    ],
)
def test_it_rejects_an_invalid_entry_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(FeedError, match=message):
        parse_feed(feed(entry(**overrides)), "https://updates.example.com/feed.json")


def test_it_rejects_an_entry_lacking_a_field() -> None:
    raw = entry()
    del raw["sha256"]
    with pytest.raises(FeedError, match='Feed entry 1 lacks the field "sha256"'):
        parse_feed(feed(raw), "https://updates.example.com/feed.json")


def test_it_rejects_a_feed_location_that_is_neither_http_nor_a_directory() -> None:
    with pytest.raises(FeedError, match="neither an http"):
        parse_feed(feed(entry()), "ftp://updates.example.com/feed.json")


def test_publish_copies_the_bundle_and_lists_it(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "2.8.1.0", notes="From the manifest")
    feed_dir = tmp_path / "feed"
    published = publish(feed_dir, bundle)
    copy = feed_dir / "lmi-firmware-2.8.1.0.bundle"
    assert copy.read_bytes() == bundle.read_bytes()
    assert published == FeedEntry(
        version="2.8.1.0",
        min_version="2.8.0.0",
        url=str(copy),
        size=copy.stat().st_size,
        sha256=hashlib.sha256(copy.read_bytes()).hexdigest(),
        release_notes="From the manifest",
    )
    assert parse_feed((feed_dir / "feed.json").read_bytes(), str(feed_dir)) == [published]


def test_publish_keeps_other_versions_and_replaces_the_same_one(tmp_path: Path) -> None:
    feed_dir = tmp_path / "feed"
    publish(feed_dir, make_bundle(tmp_path, "2.8.0.0"))
    publish(feed_dir, make_bundle(tmp_path, "2.8.1.0"), release_notes="first")
    replaced = publish(feed_dir, make_bundle(tmp_path, "2.8.1.0"), release_notes="second")
    entries = parse_feed((feed_dir / "feed.json").read_bytes(), str(feed_dir))
    assert [e.version for e in entries] == ["2.8.1.0", "2.8.0.0"]
    assert entries[0] == replaced
    assert entries[0].release_notes == "second"


def test_publish_of_a_bundle_already_in_the_feed_does_not_copy_it(tmp_path: Path) -> None:
    feed_dir = tmp_path / "feed"
    feed_dir.mkdir()
    bundle = feed_dir / bundle_file_name("2.8.1.0")
    make_bundle(tmp_path, "2.8.1.0").rename(bundle)
    inode = bundle.stat().st_ino
    publish(feed_dir, bundle)
    assert bundle.stat().st_ino == inode


def test_publish_refuses_to_extend_a_broken_feed(tmp_path: Path) -> None:
    feed_dir = tmp_path / "feed"
    feed_dir.mkdir()
    (feed_dir / "feed.json").write_text("{broken")
    with pytest.raises(FeedError, match="cannot be extended"):
        publish(feed_dir, make_bundle(tmp_path, "2.8.1.0"))
    assert (feed_dir / "feed.json").read_text() == "{broken"


def test_publish_refuses_something_that_is_not_a_bundle(tmp_path: Path) -> None:
    from appliance.firmware.bundle import BundleFormatError

    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"not a bundle at all")
    with pytest.raises(BundleFormatError):
        publish(tmp_path / "feed", junk)
    assert not (tmp_path / "feed" / "feed.json").exists()


def test_bundle_file_name_needs_a_version() -> None:
    assert bundle_file_name("2.8.1.0") == "lmi-firmware-2.8.1.0.bundle"
    with pytest.raises(ValueError):
        bundle_file_name("../x")
