"""Demo firmware updates: vendor key, feed with 2.8.1.0 and 2.8.0.0, license; idempotent."""

from __future__ import annotations

import io
import os
import time
from datetime import UTC, date, datetime
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from appliance.firmware.bundle import verify_bundle
from appliance.firmware.bundleextract import extract_payload
from appliance.firmware.demo_feed import demo_updates_missing, init_demo_updates
from appliance.firmware.feed import parse_feed
from appliance.firmware.license import license_status
from appliance.firmware.signing import read_key_file, trusted_keys
from appliance.system.facts import parse_key_values
from appliance.system.paths import layout
from tests.support.clock import Clock


@pytest.fixture
def var_dir(tmp_path: Path, settings) -> Path:
    """The console's var/ for this test, with the trusted keys and the feed inside it."""
    var = tmp_path / "var"
    settings.VAR_DIR = var
    settings.TRUSTED_KEYS = []
    settings.TRUSTED_KEYS_DIR = var / "trusted-keys"
    settings.UPDATE_FEED_URL = str(var / "update-feed")
    return var


MADE_AT = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def demo_updates(demo_appliance: Path, var_dir: Path, clock: Clock) -> Path:
    """The demo updates as made on MADE_AT (the clock stays there for the test's assertions)."""
    clock.travel(MADE_AT)
    init_demo_updates(var_dir, demo_appliance, out=io.StringIO())
    return var_dir


def feed_entries(var_dir: Path) -> list:
    feed_dir = var_dir / "update-feed"
    return parse_feed((feed_dir / "feed.json").read_bytes(), str(feed_dir))


def tree_state(directory: Path) -> dict[str, int]:
    return {
        str(path.relative_to(directory)): path.stat().st_mtime_ns
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_the_feed_lists_2810_and_2800(demo_updates: Path) -> None:
    entries = feed_entries(demo_updates)
    assert [(e.version, e.min_version) for e in entries] == [
        ("2.8.1.0", "2.8.0.0"),
        ("2.8.0.0", "2.7.0.0"),
    ]
    for entry in entries:
        assert Path(entry.url).parent == demo_updates / "update-feed"
        assert Path(entry.url).stat().st_size == entry.size
    assert "SUSE Linux Enterprise Server 11" in entries[0].release_notes


def test_both_bundles_verify_with_the_trusted_demo_key(demo_updates: Path) -> None:
    keys = trusted_keys()
    assert keys == [read_key_file(demo_updates / "demo-vendor" / "vendor.pub")]
    for entry in feed_entries(demo_updates):
        manifest = verify_bundle(Path(entry.url))
        assert manifest.version == entry.version
        assert manifest.total_size == entry.size


def test_the_new_bundle_is_a_sles11_system_image_big_enough_to_show_progress(
    demo_updates: Path, tmp_path: Path
) -> None:
    newest = feed_entries(demo_updates)[0]
    assert 8 * 1024**2 <= newest.size <= 16 * 1024**2
    target = tmp_path / "staged"
    manifest = extract_payload(Path(newest.url), target)
    assert manifest.os_release == "SUSE Linux Enterprise Server 11 (x86_64)"
    assert manifest.msgstore_format == manifest.config_format == "2.8.1"
    release = parse_key_values((target / "etc" / "firmware-release").read_text())
    assert release["FIRMWARE_VERSION"] == "2.8.1.0"
    assert (target / "VERSION").read_text() == "2.8.1.0\n"
    assert (
        (target / "etc" / "SuSE-release").read_text().startswith("SUSE Linux Enterprise Server 11")
    )
    assert os.access(target / "bin" / "mailsecd", os.X_OK)
    assert (target / "lib" / "libmailsec.so.2").resolve().name == "libmailsec.so.2.8.1"
    assert not (target / "lib" / "libmailsec.so.2.8.0").exists()


def test_the_old_bundle_holds_the_installed_firmware(demo_updates: Path, tmp_path: Path) -> None:
    old = feed_entries(demo_updates)[1]
    target = tmp_path / "old"
    manifest = extract_payload(Path(old.url), target)
    assert manifest.version == "2.8.0.0"
    assert manifest.os_release.startswith("SUSE Linux Enterprise Server 10")
    assert (target / "VERSION").read_text() == "2.8.0.0\n"


def test_the_license_is_valid_and_entitled(demo_updates: Path) -> None:
    status = license_status()
    assert status.valid and status.entitled
    assert status.license is not None
    assert status.license.customer == "Example Corp"
    assert status.license.serial == "KQ7R2M4"
    assert status.license.updates_until == date(2028, 6, 1)  # a year after MADE_AT


def test_the_private_key_is_0600_and_outside_the_appliance_root(
    demo_updates: Path, demo_appliance: Path
) -> None:
    private = demo_updates / "demo-vendor" / "vendor.key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert not private.resolve().is_relative_to(demo_appliance.resolve())
    # The only key on the appliance is its own backup seal, never the vendor's.
    assert list(demo_appliance.rglob("*.key")) == [layout().backup_key]
    assert (demo_updates / "trusted-keys" / "demo-vendor.pub").read_text() == (
        demo_updates / "demo-vendor" / "vendor.pub"
    ).read_text()


def test_it_is_idempotent(demo_updates: Path, demo_appliance: Path) -> None:
    before = tree_state(demo_updates)
    license_before = layout().license_file.read_bytes()
    assert demo_updates_missing(demo_updates, demo_appliance) == []
    started = time.monotonic()
    init_demo_updates(demo_updates, demo_appliance, out=io.StringIO())
    assert time.monotonic() - started < 0.5
    assert tree_state(demo_updates) == before
    assert layout().license_file.read_bytes() == license_before


def test_it_is_fast(demo_appliance: Path, var_dir: Path) -> None:
    started = time.monotonic()
    init_demo_updates(var_dir, demo_appliance, out=io.StringIO())
    assert time.monotonic() - started < 2.0


def test_it_reinstalls_only_a_missing_license(demo_updates: Path, demo_appliance: Path) -> None:
    bundles = tree_state(demo_updates / "update-feed")
    layout().license_file.unlink()
    assert demo_updates_missing(demo_updates, demo_appliance) == ["license"]
    init_demo_updates(demo_updates, demo_appliance, out=io.StringIO())
    assert license_status().valid
    assert tree_state(demo_updates / "update-feed") == bundles


def test_it_republishes_a_deleted_bundle(demo_updates: Path, demo_appliance: Path) -> None:
    newest = Path(feed_entries(demo_updates)[0].url)
    newest.unlink()
    assert demo_updates_missing(demo_updates, demo_appliance) == ["bundle 2.8.1.0"]
    init_demo_updates(demo_updates, demo_appliance, out=io.StringIO())
    assert verify_bundle(newest).version == "2.8.1.0"
    assert [e.version for e in feed_entries(demo_updates)] == ["2.8.1.0", "2.8.0.0"]


def test_a_lost_vendor_key_means_a_new_key_new_bundles_and_license(
    demo_updates: Path, demo_appliance: Path
) -> None:
    old_key = (demo_updates / "demo-vendor" / "vendor.pub").read_text()
    (demo_updates / "demo-vendor" / "vendor.key").unlink()
    init_demo_updates(demo_updates, demo_appliance, out=io.StringIO())
    assert (demo_updates / "demo-vendor" / "vendor.pub").read_text() != old_key
    assert len(trusted_keys()) == 1
    for entry in feed_entries(demo_updates):
        verify_bundle(Path(entry.url))
    assert license_status().valid


def test_an_http_feed_is_not_published_to(demo_appliance: Path, var_dir: Path, settings) -> None:
    settings.UPDATE_FEED_URL = "http://127.0.0.1:9/lmi/feed.json"
    out = io.StringIO()
    init_demo_updates(var_dir, demo_appliance, out=out)
    assert "is a URL" in out.getvalue()
    assert not (var_dir / "update-feed").exists()
    bundles = sorted((var_dir / "demo-vendor" / "bundles").glob("*.bundle"))
    assert [b.name for b in bundles] == [
        "lmi-firmware-2.8.0.0.bundle",
        "lmi-firmware-2.8.1.0.bundle",
    ]
    for path in bundles:
        verify_bundle(path)
    assert demo_updates_missing(var_dir, demo_appliance) == []


def _run_init(**options: object) -> str:
    out = StringIO()
    call_command("init_appliance", stdout=out, stderr=StringIO(), **options)
    return out.getvalue()


@pytest.mark.django_db
def test_init_appliance_sets_up_the_demo_updates_with_a_new_appliance(
    appliance_root: Path, var_dir: Path
) -> None:
    from events.models import Event

    output = _run_init(messages=5)
    assert "Demo firmware updates ready" in output
    assert demo_updates_missing(var_dir, appliance_root) == []
    event = Event.objects.get()
    assert event.details["demo_updates"] == "ready"


@pytest.mark.django_db
def test_init_appliance_adds_the_demo_updates_to_an_existing_appliance(
    demo_appliance: Path, var_dir: Path
) -> None:
    from events.models import Category, Event

    marker = layout().firmware_release.stat().st_mtime_ns
    output = _run_init(messages=5)
    assert "already exists" in output and "adding the demo updates" in output
    assert demo_updates_missing(var_dir, demo_appliance) == []
    assert layout().firmware_release.stat().st_mtime_ns == marker
    event = Event.objects.get()
    assert event.category == Category.UPDATE
    assert "license" in event.details["missing"]

    output = _run_init(messages=5)
    assert "nothing to do" in output
    assert Event.objects.count() == 1


@pytest.mark.django_db
def test_init_appliance_never_adds_demo_updates_to_a_real_appliance(
    demo_appliance: Path, var_dir: Path
) -> None:
    from appliance.system.facts import read_firmware_release, write_firmware_release
    from events.models import Event

    release = read_firmware_release()
    write_firmware_release({**release, "SERIAL": "99A1234"})
    output = _run_init(messages=5)
    assert "nothing to do" in output
    assert not var_dir.exists()
    assert not layout().license_file.exists()
    assert Event.objects.count() == 0
