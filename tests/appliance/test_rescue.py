"""The system backup image on the rescue partition."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.system import rescue
from appliance.system.errors import ApplianceNotInitialized, MalformedApplianceFile
from appliance.system.facts import read_firmware_release, write_firmware_release
from appliance.system.paths import layout
from tests.support.crash import Crash, crash_on_call
from tests.support.trees import tree_snapshot


def test_there_is_no_backup_on_an_empty_root(appliance_root: Path) -> None:
    assert rescue.system_backup_info() is None


def test_creating_needs_an_active_system(appliance_root: Path) -> None:
    (appliance_root / "etc").mkdir()
    with pytest.raises(ApplianceNotInitialized):
        rescue.system_backup_create()


def test_the_manifest_sha256_and_size_match_the_tar(demo_appliance: Path) -> None:
    backup = rescue.system_backup_create()
    data = layout().system_backup_tar.read_bytes()
    assert backup.sha256 == hashlib.sha256(data).hexdigest()
    assert backup.size == len(data)
    assert rescue.system_backup_info() == backup


def test_the_tar_holds_the_active_system_and_the_configuration(demo_appliance: Path) -> None:
    rescue.system_backup_create()
    with tarfile.open(layout().system_backup_tar) as tar:
        names = set(tar.getnames())
        version = tar.extractfile("system/VERSION").read()  # type: ignore[union-attr]
    assert version == b"2.8.0.0\n"
    assert {
        "system/bin/mailsecd",
        "system/etc/firmware-release",
        "etc/firmware-release",
        "etc/mailsec/cpe/mailsec_policyobjects1_1.xml",
        "etc/mailsec/lists/blocked_senders.txt",
        "etc/sysconfig/network/ifcfg-eth0",
    } <= names
    assert not any(name.startswith(("rescue", "var", "system/slot-a")) for name in names)


def test_it_describes_the_firmware_and_time_of_the_image(demo_appliance: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    backup = rescue.system_backup_create()
    assert backup.firmware_version == "2.8.0.0"
    assert before <= backup.created_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert backup.created_at.tzinfo is not None


def test_progress_counts_up_to_the_total(demo_appliance: Path) -> None:
    calls: list[tuple[int, int]] = []
    rescue.system_backup_create(progress=lambda done, total: calls.append((done, total)))
    assert calls[0][0] == 0
    assert calls[-1][0] == calls[-1][1] > 0
    done = [call[0] for call in calls]
    assert done == sorted(done)


def _image_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in layout(root).rescue_dir.iterdir() if p.name.startswith("image-"))


def _assert_one_clean_image(root: Path) -> None:
    """The rescue partition holds one image directory, the pointer to it, the two well-known
    names through the pointer and the lock: nothing a killed write left."""
    the_layout = layout(root)
    [image] = _image_dirs(root)
    rescue_dir = the_layout.rescue_dir
    assert sorted(p.name for p in rescue_dir.iterdir()) == sorted(
        [".lock", "current", image, "system-backup.json", "system-backup.tar"]
    )
    assert os.readlink(rescue_dir / "current") == image
    assert os.readlink(the_layout.system_backup_manifest) == "current/system-backup.json"
    assert os.readlink(the_layout.system_backup_tar) == "current/system-backup.tar"
    assert sorted(p.name for p in (rescue_dir / image).iterdir()) == [
        "system-backup.json",
        "system-backup.tar",
    ]


def as_earlier_version(root: Path) -> None:
    """Turn the image into what an earlier version wrote: tar and manifest as files in rescue/."""
    the_layout = layout(root)
    rescue_dir = the_layout.rescue_dir
    image = rescue_dir / os.readlink(rescue_dir / "current")
    for path in (the_layout.system_backup_tar, the_layout.system_backup_manifest):
        path.unlink()
        os.replace(image / path.name, path)
    (rescue_dir / "current").unlink()
    image.rmdir()


def test_a_new_backup_replaces_the_only_one(demo_appliance: Path) -> None:
    [first] = _image_dirs(demo_appliance)
    (layout().etc_dir / "added-after-first-backup").write_text("x")
    rescue.system_backup_create()
    _assert_one_clean_image(demo_appliance)
    assert _image_dirs(demo_appliance) != [first]
    with tarfile.open(layout().system_backup_tar) as tar:
        assert "etc/added-after-first-backup" in tar.getnames()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"firmware_version": "2.8.0.0"}',
        b'{"firmware_version": "2.8.0.0", "created_at": "yesterday", "size": 1,'
        b' "sha256": "' + b"0" * 64 + b'"}',
        b'{"firmware_version": "2.8.0.0", "created_at": "2013-10-01T12:00:00", "size": 1,'
        b' "sha256": "' + b"0" * 64 + b'"}',
        b'{"firmware_version": "2.8.0.0", "created_at": "2013-10-01T12:00:00+00:00",'
        b' "size": -1, "sha256": "abc"}',
    ],
)
def test_a_broken_manifest_is_reported_as_malformed(demo_appliance: Path, content: bytes) -> None:
    layout().system_backup_manifest.write_bytes(content)
    with pytest.raises(MalformedApplianceFile):
        rescue.system_backup_info()


def test_a_manifest_without_its_image_is_no_backup(demo_appliance: Path) -> None:
    assert json.loads(layout().system_backup_manifest.read_text())["slot"] == "slot-a"
    (layout().rescue_dir / "current" / "system-backup.tar").unlink()
    assert rescue.system_backup_info() is None


def test_a_manifest_name_leading_off_the_partition_is_damage(demo_appliance: Path) -> None:
    the_layout = layout()
    outside = demo_appliance / "elsewhere.json"
    outside.write_bytes(the_layout.system_backup_manifest.read_bytes())
    the_layout.system_backup_manifest.unlink()
    the_layout.system_backup_manifest.symlink_to(outside)
    with pytest.raises(MalformedApplianceFile, match="not to an image"):
        rescue.system_backup_info()


# --- Images of an earlier version ------------------------------------------------------------


def test_an_image_of_an_earlier_version_is_shown_verified_and_restored(
    demo_appliance: Path,
) -> None:
    the_layout = layout()
    info = rescue.system_backup_info()
    etc_before = tree_snapshot(the_layout.etc_dir)
    as_earlier_version(demo_appliance)
    assert the_layout.system_backup_tar.is_file() and not the_layout.system_backup_tar.is_symlink()
    assert rescue.system_backup_info() == info
    assert rescue.system_backup_verify()
    assert rescue.system_backup_check() == info
    _change_system_and_config(demo_appliance)

    assert rescue.system_backup_restore() == info
    assert tree_snapshot(the_layout.etc_dir) == etc_before


def test_the_first_new_backup_moves_an_earlier_versions_image_and_replaces_it(
    demo_appliance: Path,
) -> None:
    old = rescue.system_backup_info()
    as_earlier_version(demo_appliance)
    (layout().etc_dir / "added-after-first-backup").write_text("x")
    new = rescue.system_backup_create()
    assert new.sha256 != old.sha256 and rescue.system_backup_info() == new
    _assert_one_clean_image(demo_appliance)
    assert rescue.system_backup_verify()


def test_an_earlier_versions_manifest_without_its_tar_is_replaced(demo_appliance: Path) -> None:
    as_earlier_version(demo_appliance)
    layout().system_backup_tar.unlink()
    assert rescue.system_backup_info() is None
    new = rescue.system_backup_create()
    assert rescue.system_backup_info() == new
    _assert_one_clean_image(demo_appliance)


# --- Leftovers of killed writes --------------------------------------------------------------


def _plant_leftovers(root: Path) -> list[str]:
    """What killed writes leave: a half-written image directory of ours, the temporary tar of an
    earlier version's atomic write, a pointer and a link that were never renamed into place."""
    rescue_dir = layout(root).rescue_dir
    half = rescue_dir / "image-20261205T120000Z-0badc0de"
    half.mkdir()
    (half / "system-backup.tar").write_bytes(b"\0" * 300_000)
    (rescue_dir / ".system-backup.tar.k3j2h1.tmp").write_bytes(b"\0" * 300_000)
    (rescue_dir / ".system-backup.json.a1b2c3.tmp").write_text("{")
    (rescue_dir / ".current.1a2b3c4d.tmp").symlink_to(half.name)
    (rescue_dir / ".system-backup.tar.5e6f7a8b.tmp").symlink_to("current/system-backup.tar")
    return sorted(
        [
            half.name,
            ".system-backup.tar.k3j2h1.tmp",
            ".system-backup.json.a1b2c3.tmp",
            ".current.1a2b3c4d.tmp",
            ".system-backup.tar.5e6f7a8b.tmp",
        ]
    )


def test_a_new_backup_sweeps_what_killed_writes_left(demo_appliance: Path) -> None:
    _plant_leftovers(demo_appliance)
    notes = layout().rescue_dir / "notes.txt"  # not ours: left alone
    notes.write_text("rescue partition of mailsec01\n")
    rescue.system_backup_create()
    notes.unlink()
    _assert_one_clean_image(demo_appliance)


def test_the_sweep_removes_only_what_no_reader_follows(demo_appliance: Path) -> None:
    info = rescue.system_backup_info()
    planted = _plant_leftovers(demo_appliance)
    assert sorted(rescue.system_backup_leftovers_remove()) == planted
    assert rescue.system_backup_info() == info and rescue.system_backup_verify()
    _assert_one_clean_image(demo_appliance)
    assert rescue.system_backup_leftovers_remove() == []


def test_the_sweep_leaves_an_earlier_versions_image_and_drops_a_pointer_beside_it(
    demo_appliance: Path,
) -> None:
    """A kill while an earlier version's image was being moved left ``current`` and a copy no
    reader follows: the earlier image stays current, the rest goes."""
    info = rescue.system_backup_info()
    as_earlier_version(demo_appliance)
    rescue_dir = layout().rescue_dir
    copy = rescue_dir / "image-20261205T120000Z-00c0ffee"
    copy.mkdir()
    for name in ("system-backup.tar", "system-backup.json"):
        os.link(rescue_dir / name, copy / name)
    (rescue_dir / "current").symlink_to(copy.name)

    assert sorted(rescue.system_backup_leftovers_remove()) == ["current", copy.name]
    assert rescue.system_backup_info() == info and rescue.system_backup_verify()


def test_a_write_that_fails_removes_its_half_image_and_keeps_the_old(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = rescue.system_backup_info()
    before = _image_dirs(demo_appliance)

    def disk_full(name: str) -> None:
        if name == "tar-started":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rescue, "_pause_point", disk_full)
    with pytest.raises(OSError, match="No space left"):
        rescue.system_backup_create()
    assert _image_dirs(demo_appliance) == before
    assert rescue.system_backup_info() == info and rescue.system_backup_verify()


def test_the_sweep_without_a_rescue_partition_does_nothing(appliance_root: Path) -> None:
    assert rescue.system_backup_leftovers_remove() == []
    assert not layout().rescue_dir.exists()


# --- Restore ---------------------------------------------------------------------------------


def _change_system_and_config(root: Path) -> None:
    the_layout = layout()
    write_firmware_release({**read_firmware_release(), "FIRMWARE_VERSION": "2.8.1.0"})
    (the_layout.active_system / "VERSION").write_text("2.8.1.0\n")
    (the_layout.active_system / "bin" / "new-tool").write_text("#!/bin/sh\n")
    (the_layout.hostname_file).write_text("changed.example.com\n")
    (the_layout.etc_dir / "added-later").write_text("x")


def test_restore_returns_system_and_configuration_to_the_image(demo_appliance: Path) -> None:
    the_layout = layout()
    rescue.system_backup_create()
    system_before = tree_snapshot(the_layout.active_system.resolve())
    etc_before = tree_snapshot(the_layout.etc_dir)
    msgstore_before = hashlib.sha256(the_layout.msgstore_db.read_bytes()).hexdigest()
    _change_system_and_config(demo_appliance)
    assert tree_snapshot(the_layout.etc_dir) != etc_before

    calls: list[tuple[int, int]] = []
    info = rescue.system_backup_restore(progress=lambda done, total: calls.append((done, total)))

    assert info == rescue.system_backup_info()
    active = the_layout.active_system.resolve()
    assert active.name.startswith("slot-restored-")
    assert os.readlink(the_layout.active_system) == active.name
    assert tree_snapshot(active) == system_before
    assert tree_snapshot(the_layout.etc_dir) == etc_before
    assert read_firmware_release()["FIRMWARE_VERSION"] == "2.8.0.0"
    assert hashlib.sha256(the_layout.msgstore_db.read_bytes()).hexdigest() == msgstore_before
    assert calls[-1][0] == calls[-1][1] > 0
    leftovers = [p.name for p in demo_appliance.iterdir() if p.name.startswith(".etc-")]
    assert leftovers == []
    assert not the_layout.system_restore_journal.exists()
    assert rescue.system_backup_verify()


def test_verify_detects_a_damaged_image(demo_appliance: Path) -> None:
    assert rescue.system_backup_verify() is True
    path = layout().system_backup_tar
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    assert rescue.system_backup_verify() is False


def test_verify_without_an_image_is_false(appliance_root: Path) -> None:
    assert rescue.system_backup_verify() is False


def test_a_tampered_image_is_refused_and_nothing_changes(demo_appliance: Path) -> None:
    path = layout().system_backup_tar
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01
    path.write_bytes(bytes(data))
    _change_system_and_config(demo_appliance)
    before = tree_snapshot(demo_appliance)
    with pytest.raises(rescue.SystemBackupError, match="does not match its checksum"):
        rescue.system_backup_restore()
    assert tree_snapshot(demo_appliance) == before


def test_restore_without_an_image_is_refused(appliance_root: Path) -> None:
    with pytest.raises(rescue.SystemBackupError, match="no system backup"):
        rescue.system_backup_restore()


def _plant_image(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """Replace the image by a hostile tar whose manifest checksum matches (a forged image)."""
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, content in entries:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    data = buffer.getvalue()
    the_layout = layout()
    the_layout.system_backup_tar.write_bytes(data)
    manifest = json.loads(the_layout.system_backup_manifest.read_text())
    manifest.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    the_layout.system_backup_manifest.write_text(json.dumps(manifest))


def _entry(
    name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if kind == tarfile.REGTYPE:
        info.size = len(content)
        return info, content
    return info, None


TOPS = [_entry("system", tarfile.DIRTYPE), _entry("etc", tarfile.DIRTYPE)]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (_entry("system/../../evil", content=b"x"), r'"\.\."'),
        (_entry("/etc/passwd", content=b"x"), "absolute"),
        (_entry("var/lib/mailsec/msgstore/msgstore.db", content=b"x"), "outside its system"),
        (_entry("system/lib", tarfile.SYMTYPE, link="../../.."), "points out of"),
        (_entry("etc/shadow", tarfile.SYMTYPE, link="/etc/shadow"), "points out of"),
        (_entry("etc/hard", tarfile.LNKTYPE, link="etc/HOSTNAME"), "link, device"),
        (_entry("system/dev", tarfile.CHRTYPE), "link, device"),
    ],
)
def test_a_forged_image_with_unsafe_members_is_refused(
    demo_appliance: Path, entry: tuple[tarfile.TarInfo, bytes | None], match: str
) -> None:
    _plant_image([*TOPS, _entry("etc/HOSTNAME", content=b"x\n"), entry])
    before = tree_snapshot(demo_appliance)
    with pytest.raises(rescue.SystemBackupError, match=match):
        rescue.system_backup_restore()
    assert tree_snapshot(demo_appliance) == before


def test_a_member_beneath_a_symlink_is_refused(demo_appliance: Path) -> None:
    _plant_image(
        [
            *TOPS,
            _entry("system/lib", tarfile.SYMTYPE, link="bin"),
            _entry("system/lib/evil", content=b"x"),
        ]
    )
    before = tree_snapshot(demo_appliance)
    with pytest.raises(rescue.SystemBackupError, match="beneath"):
        rescue.system_backup_restore()
    assert tree_snapshot(demo_appliance) == before


def test_a_crash_during_the_switch_is_rolled_forward(demo_appliance: Path) -> None:
    the_layout = layout()
    rescue.system_backup_create()
    system_before = tree_snapshot(the_layout.active_system.resolve())
    etc_before = tree_snapshot(the_layout.etc_dir)
    _change_system_and_config(demo_appliance)

    # The third step: after etc/ was moved aside, before the image's etc/ took its place.
    with pytest.raises(Crash), crash_on_call(rescue, "_restore_step", 3):
        rescue.system_backup_restore()
    assert not the_layout.etc_dir.exists()
    assert the_layout.system_restore_journal.exists()

    assert rescue.system_restore_recover() is True
    assert tree_snapshot(the_layout.active_system.resolve()) == system_before
    assert tree_snapshot(the_layout.etc_dir) == etc_before
    assert not the_layout.system_restore_journal.exists()
    assert rescue.system_restore_recover() is False


# --- What an image must hold ------------------------------------------------------------------

CPE = [_entry("etc/mailsec", tarfile.DIRTYPE), _entry("etc/mailsec/cpe", tarfile.DIRTYPE)]
RELEASE = _entry("etc/firmware-release", content=b"FIRMWARE_VERSION=2.8.0.0\n")


def test_the_demo_image_holds_the_firmware_level_and_restores_to_it(demo_appliance: Path) -> None:
    """The image init_demo made (not a later one): it once lacked etc/firmware-release."""
    with tarfile.open(layout().system_backup_tar) as tar:
        release = tar.extractfile("etc/firmware-release").read()  # type: ignore[union-attr]
    assert b"FIRMWARE_VERSION=2.8.0.0\n" in release
    assert rescue.system_backup_check().firmware_version == "2.8.0.0"
    _change_system_and_config(demo_appliance)

    rescue.system_backup_restore()

    assert read_firmware_release()["FIRMWARE_VERSION"] == "2.8.0.0"
    assert layout().cpe_dir.is_dir()


@pytest.mark.parametrize(
    ("entries", "missing"),
    [
        ([*TOPS, *CPE], r"the firmware level \(etc/firmware-release\)"),
        (
            [*TOPS, *CPE, _entry("etc/firmware-release", content=b"MODEL=x3650\n")],
            r"a readable firmware level \(FIRMWARE_VERSION\) in etc/firmware-release",
        ),
        (
            [*TOPS, *CPE, _entry("etc/firmware-release", content=b"FIRMWARE_VERSION=\xff\n")],
            r"a readable firmware level \(FIRMWARE_VERSION\) in etc/firmware-release",
        ),
        (
            [*TOPS, *CPE, _entry("etc/firmware-release", tarfile.SYMTYPE, link="HOSTNAME")],
            r"the firmware level \(etc/firmware-release\)",
        ),
        (
            [*TOPS, RELEASE],
            r"the mail-security configuration directory \(etc/mailsec/cpe/\)",
        ),
        (
            [_entry("system", tarfile.DIRTYPE), _entry("system/VERSION", content=b"2.8.0.0\n")],
            r"the configuration directory \(etc/\); the firmware level",
        ),
        ([_entry("etc", tarfile.DIRTYPE), *CPE, RELEASE], r"the firmware \(system/\)"),
    ],
)
def test_an_image_without_what_an_appliance_needs_is_refused_before_anything_changes(
    demo_appliance: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]], missing: str
) -> None:
    _plant_image(entries)
    _change_system_and_config(demo_appliance)
    before = tree_snapshot(demo_appliance)
    for attempt in (rescue.system_backup_check, rescue.system_backup_restore):
        with pytest.raises(rescue.SystemBackupError, match=missing) as refused:
            attempt()
        assert str(refused.value).startswith("The system backup image lacks what an appliance")
        assert str(refused.value).endswith("nothing was changed.")
    assert tree_snapshot(demo_appliance) == before


def test_an_image_with_what_an_appliance_needs_passes_the_check(demo_appliance: Path) -> None:
    _plant_image([*TOPS, *CPE, RELEASE])
    assert rescue.system_backup_check() == rescue.system_backup_info()


def test_the_check_refuses_no_image_and_a_damaged_manifest(demo_appliance: Path) -> None:
    layout().system_backup_manifest.write_text("{not json")
    with pytest.raises(rescue.SystemBackupError, match="manifest is damaged"):
        rescue.system_backup_check()
    layout().system_backup_manifest.unlink()
    with pytest.raises(rescue.SystemBackupError, match="no system backup"):
        rescue.system_backup_check()


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        ("etc/firmware-release", r"the firmware level \(etc/firmware-release\)"),
        ("etc/mailsec/cpe", r"the mail-security configuration directory"),
    ],
)
def test_creating_refuses_an_appliance_whose_image_could_not_be_restored(
    demo_appliance: Path, remove: str, missing: str
) -> None:
    info = rescue.system_backup_info()
    path = demo_appliance / remove
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    with pytest.raises(ApplianceNotInitialized, match=missing):
        rescue.system_backup_create()
    assert rescue.system_backup_info() == info
    _assert_one_clean_image(demo_appliance)
