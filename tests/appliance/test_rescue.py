"""The system backup image on the rescue partition."""

from __future__ import annotations

import hashlib
import json
import os
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


def test_a_new_backup_replaces_the_only_one(demo_appliance: Path) -> None:
    (layout().etc_dir / "added-after-first-backup").write_text("x")
    rescue.system_backup_create()
    rescue_files = sorted(
        path.name for path in layout().rescue_dir.iterdir() if not path.name.startswith(".")
    )
    assert rescue_files == ["system-backup.json", "system-backup.tar"]
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
    layout().system_backup_tar.unlink()
    assert rescue.system_backup_info() is None


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
