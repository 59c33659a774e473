"""The system backup image on the rescue partition."""

from __future__ import annotations

import hashlib
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance import rescue
from appliance.errors import ApplianceNotInitialized, MalformedApplianceFile
from appliance.paths import layout


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
