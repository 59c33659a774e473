"""Firmware slots: install into the inactive slot, read-back, abort, switch, rollback, cleanup."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from appliance.firmware import demo_feed as demo_updates
from appliance.firmware import firmware, slottree
from appliance.firmware.bundle import BundleDigestMismatch, BundleSignatureError
from appliance.firmware.signing import generate_keypair, public_key_b64
from appliance.system.facts import read_firmware_release, read_os_release
from appliance.system.paths import layout
from tests.support.trees import tree_snapshot


@pytest.fixture
def vendor_key(settings) -> bytes:
    private, public = generate_keypair()
    settings.TRUSTED_KEYS = [public_key_b64(public)]
    return private


@pytest.fixture
def bundle_281(demo_appliance: Path, vendor_key: bytes, tmp_path: Path) -> Path:
    """The demo's signed 2.8.1.0 bundle (SLES 11 system image, about 12 MB)."""
    out = tmp_path / "lmi-firmware-2.8.1.0.bundle"
    release = demo_updates.RELEASES[0]
    assert release.version == "2.8.1.0"
    demo_updates._build(release, vendor_key, out, tmp_path, demo_appliance)
    return out


@pytest.fixture
def installed(bundle_281: Path, demo_appliance: Path) -> firmware.SlotImage:
    return firmware.slot_install(bundle_281, demo_appliance)


def assert_switch_refused(slot: str, error: type[Exception]) -> None:
    """Switching to ``slot`` raises ``error``, and the appliance keeps running slot-a."""
    with pytest.raises(error):
        firmware.slot_switch(slot)
    assert firmware.active_slot() == "slot-a"


def test_the_demo_runs_slot_a_so_slot_b_is_the_install_target(demo_appliance: Path) -> None:
    assert firmware.active_slot() == "slot-a"
    assert firmware.inactive_slot() == "slot-b"
    assert firmware.slot_firmware_version("slot-a") == "2.8.0.0"
    assert not firmware.slot_bootable("slot-b")


def test_it_installs_the_281_image_into_slot_b_and_reads_it_back(
    bundle_281: Path, demo_appliance: Path
) -> None:
    slot_a = demo_appliance / "system" / "slot-a"
    before = tree_snapshot(slot_a)
    calls: list[tuple[int, int]] = []

    image = firmware.slot_install(bundle_281, progress=lambda d, t: calls.append((d, t)))

    assert image.slot == "slot-b"
    assert image.version == "2.8.1.0"
    assert image.files > 10 and image.size > 12 * 1024 * 1024
    assert firmware.slot_bootable("slot-b")
    assert firmware.slot_firmware_version("slot-b") == "2.8.1.0"
    assert "Server 11" in (firmware.slot_os_release("slot-b") or "")
    slot_b = demo_appliance / "system" / "slot-b"
    assert os.readlink(slot_b / "lib" / "libmailsec.so.2") == "libmailsec.so.2.8.1"
    assert os.access(slot_b / "bin" / "msgstore-migrate", os.X_OK)
    assert firmware.slot_verify("slot-b") == image
    # The running slot was sealed with a manifest while mail flowed, for the switch and rollback.
    assert firmware.slot_verify("slot-a").version == "2.8.0.0"
    # The running system is exactly as it was, and still running.
    assert tree_snapshot(slot_a) == before
    assert firmware.active_slot() == "slot-a"
    assert read_firmware_release()["FIRMWARE_VERSION"] == "2.8.0.0"
    # Progress: monotonic, one total, ending complete.
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    assert len({total for _, total in calls}) == 1
    # No staging left behind.
    assert not any(layout().firmware_staging_dir.iterdir())


def test_a_second_install_of_the_same_bundle_returns_at_once(
    installed: firmware.SlotImage, bundle_281: Path, demo_appliance: Path
) -> None:
    slot_b = demo_appliance / "system" / "slot-b"
    inode = slot_b.stat().st_ino
    assert firmware.slot_install(bundle_281) == installed
    assert slot_b.stat().st_ino == inode


def test_a_flipped_byte_in_the_staged_slot_fails_verification(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    target = demo_appliance / "system" / "slot-b" / "lib" / "mailsecd.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(slottree.SlotCorrupt, match=r"mailsecd\.bin"):
        firmware.slot_verify("slot-b")
    assert_switch_refused("slot-b", slottree.SlotCorrupt)


def test_an_extra_file_or_a_changed_link_fails_verification(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    slot_b = demo_appliance / "system" / "slot-b"
    (slot_b / "etc" / "backdoor").write_text("x")
    with pytest.raises(slottree.SlotCorrupt, match="backdoor"):
        firmware.slot_verify("slot-b")
    (slot_b / "etc" / "backdoor").unlink()
    (slot_b / "boot" / "vmlinuz").unlink()
    os.symlink("../../slot-a/boot/vmlinuz", slot_b / "boot" / "vmlinuz")
    with pytest.raises(slottree.SlotCorrupt, match="vmlinuz"):
        firmware.slot_verify("slot-b")


def test_an_altered_manifest_is_detected(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    state_file = layout().firmware_state_dir / "slot-b.json"
    state = json.loads(state_file.read_text())
    state["entries"][0]["mode"] = 0o777
    state_file.write_text(json.dumps(state))
    with pytest.raises(slottree.SlotCorrupt, match="manifest"):
        firmware.slot_verify("slot-b")


@pytest.mark.parametrize("stop_after", [1, 3, 20, 45, 90])
def test_should_stop_aborts_leaving_slot_a_running_and_untouched(
    bundle_281: Path, demo_appliance: Path, stop_after: int
) -> None:
    """Stops in the bundle check (1, 3), while writing (20, 45) and in the read-back (90).

    (A full install of the demo bundle polls about 115 times; the read-back starts near 60.)
    """
    system = demo_appliance / "system"
    before = tree_snapshot(system / "slot-a")
    etc_before = tree_snapshot(demo_appliance / "etc")
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return polls >= stop_after

    with pytest.raises(slottree.InstallAborted):
        # Small chunks (rate_limit / 10) so the stop points land in every stage.
        firmware.slot_install(bundle_281, should_stop=should_stop, rate_limit=10 * 1024**3)

    assert polls == stop_after
    assert firmware.active_slot() == "slot-a"
    assert tree_snapshot(system / "slot-a") == before
    assert tree_snapshot(demo_appliance / "etc") == etc_before
    assert not (system / "slot-b").exists()
    assert not firmware.slot_bootable("slot-b")
    staging = layout().firmware_staging_dir
    assert not staging.exists() or not any(staging.iterdir())
    # And it can be installed afterwards.
    assert firmware.slot_install(bundle_281).version == "2.8.1.0"


def test_rate_limit_paces_the_writes_and_the_read_back(
    bundle_281: Path, demo_appliance: Path
) -> None:
    rate = 64 * 1024 * 1024
    started = time.monotonic()
    image = firmware.slot_install(bundle_281, rate_limit=rate)
    elapsed = time.monotonic() - started
    # Written once and read back once, at no more than the rate.
    assert elapsed >= 0.9 * (2 * image.size) / rate


def test_a_killed_install_leaves_an_unbootable_slot_that_a_rerun_completes(
    bundle_281: Path, demo_appliance: Path
) -> None:
    before = tree_snapshot(demo_appliance / "system" / "slot-a")
    state_file = layout().firmware_state_dir / "slot-b.json"
    pid = os.fork()
    if pid == 0:  # the child: a slow install, killed below
        try:
            firmware.slot_install(bundle_281, demo_appliance, rate_limit=4 * 1024 * 1024)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if state_file.exists() and b"installing" in state_file.read_bytes():
                break
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    assert b"installing" in state_file.read_bytes()
    assert not firmware.slot_bootable("slot-b")
    assert_switch_refused("slot-b", slottree.SlotNotBootable)
    assert tree_snapshot(demo_appliance / "system" / "slot-a") == before

    image = firmware.slot_install(bundle_281)
    assert firmware.slot_verify("slot-b") == image


def test_a_tampered_bundle_changes_nothing(
    bundle_281: Path, demo_appliance: Path, tmp_path: Path
) -> None:
    data = bytearray(bundle_281.read_bytes())
    data[-2048] ^= 0xFF  # inside the payload
    tampered = tmp_path / "tampered.bundle"
    tampered.write_bytes(bytes(data))
    before = tree_snapshot(demo_appliance)

    with pytest.raises(BundleDigestMismatch):
        firmware.slot_install(tampered)
    assert tree_snapshot(demo_appliance) == before


def test_a_bundle_from_an_untrusted_key_changes_nothing(
    bundle_281: Path, demo_appliance: Path, settings
) -> None:
    settings.TRUSTED_KEYS = [public_key_b64(generate_keypair()[1])]
    before = tree_snapshot(demo_appliance)
    with pytest.raises(BundleSignatureError):
        firmware.slot_install(bundle_281)
    assert tree_snapshot(demo_appliance) == before


def test_it_refuses_to_install_over_the_running_slot(
    bundle_281: Path, demo_appliance: Path
) -> None:
    before = tree_snapshot(demo_appliance)
    with pytest.raises(slottree.FirmwareError, match="running"):
        firmware.slot_install(bundle_281, slot="slot-a")
    assert tree_snapshot(demo_appliance) == before


@pytest.mark.parametrize(
    "name", ["../etc", "active", "slot-A", "", "slot-b/../../etc", ".firmware"]
)
def test_hostile_slot_names_are_refused(demo_appliance: Path, name: str) -> None:
    before = tree_snapshot(demo_appliance)
    for call in (firmware.slot_switch, firmware.slot_remove, firmware.slot_verify):
        with pytest.raises(ValueError, match="slot name"):
            call(name)
    assert tree_snapshot(demo_appliance) == before


def test_switch_is_atomic_idempotent_and_rolls_back(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    active = layout().active_system

    assert firmware.slot_switch("slot-b") == "slot-a"
    assert os.readlink(active) == "slot-b"
    assert firmware.active_slot() == "slot-b"
    assert firmware.previous_slot() == "slot-a"
    assert firmware.slot_switch("slot-b") == "slot-a"  # again: nothing changes
    assert os.readlink(active) == "slot-b"
    # The slot left behind was sealed with a manifest, so the rollback can verify it.
    assert firmware.slot_verify("slot-a").version == "2.8.0.0"

    assert firmware.slot_switch("slot-a") == "slot-b"  # the rollback
    assert firmware.active_slot() == "slot-a"
    assert not list(layout().system_dir.glob(".active.*"))


def test_readers_always_see_one_slot_or_the_other_while_switching(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    active = layout().active_system
    seen: set[str] = set()
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.add(os.readlink(active))
                (active / "VERSION").read_bytes()
            except BaseException as exc:  # any failure is the finding
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(30):
            firmware.slot_switch("slot-b", verify=False)
            firmware.slot_switch("slot-a", verify=False)
    finally:
        done.set()
        thread.join()
    assert not errors
    assert seen <= {"slot-a", "slot-b"}


def test_it_refuses_to_switch_to_a_slot_that_was_not_completely_installed(
    demo_appliance: Path,
) -> None:
    slot_b = demo_appliance / "system" / "slot-b"
    (slot_b / "etc").mkdir(parents=True)
    (slot_b / "etc" / "firmware-release").write_text("FIRMWARE_VERSION=9.9.9.9\n")
    assert_switch_refused("slot-b", slottree.SlotNotBootable)
    assert_switch_refused("slot-c", slottree.SlotNotBootable)


def test_firmware_level_set_and_restore_give_back_the_same_bytes(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    the_layout = layout()
    old = firmware.firmware_level()
    release_bytes = the_layout.firmware_release.read_bytes()
    os_bytes = the_layout.os_release.read_bytes()

    firmware.firmware_level_set("2.8.1.0", firmware.slot_os_release("slot-b"))
    assert read_firmware_release()["FIRMWARE_VERSION"] == "2.8.1.0"
    assert read_firmware_release()["SERIAL"] == "KQ7R2M4"
    assert read_os_release().startswith("SUSE Linux Enterprise Server 11")

    firmware.firmware_level_set(old.version, old.os_release)
    assert the_layout.firmware_release.read_bytes() == release_bytes
    assert the_layout.os_release.read_bytes() == os_bytes


@pytest.mark.parametrize("version", ["2.8.1.0\nSERIAL=x", "latest", "", "02.8"])
def test_firmware_level_set_refuses_a_bad_version(demo_appliance: Path, version: str) -> None:
    before = tree_snapshot(demo_appliance / "etc")
    with pytest.raises(ValueError):
        firmware.firmware_level_set(version, None)
    assert tree_snapshot(demo_appliance / "etc") == before


def test_slot_remove_refuses_the_running_slot_and_frees_the_other(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    with pytest.raises(slottree.FirmwareError, match="running"):
        firmware.slot_remove("slot-a")
    freed = firmware.slot_remove("slot-b")
    assert freed >= installed.size
    assert not (demo_appliance / "system" / "slot-b").exists()
    assert not firmware.slot_bootable("slot-b")


def test_staging_cleanup_removes_leftovers_but_no_bootable_slot(
    installed: firmware.SlotImage, demo_appliance: Path
) -> None:
    the_layout = layout()
    leftover = the_layout.firmware_staging_dir / "slot-c"
    (leftover / "lib").mkdir(parents=True)
    (leftover / "lib" / "big.bin").write_bytes(b"\0" * 100_000)
    (the_layout.system_dir / "slot-d").mkdir()
    (the_layout.system_dir / "slot-d" / "half").write_bytes(b"x" * 5000)
    (the_layout.firmware_state_dir / "slot-d.json").write_text('{"state": "installing"}')
    os.symlink("slot-b", the_layout.system_dir / ".active.999.tmp")
    slot_a = tree_snapshot(the_layout.system_dir / "slot-a")
    slot_b = tree_snapshot(the_layout.system_dir / "slot-b")

    freed = firmware.staging_cleanup()

    assert freed >= 105_000
    assert not leftover.exists()
    assert not (the_layout.system_dir / "slot-d").exists()
    assert not (the_layout.system_dir / ".active.999.tmp").is_symlink()
    assert tree_snapshot(the_layout.system_dir / "slot-a") == slot_a
    assert tree_snapshot(the_layout.system_dir / "slot-b") == slot_b
    assert firmware.slot_bootable("slot-b")
    assert firmware.staging_cleanup() == 0
