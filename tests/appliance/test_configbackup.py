"""Configuration backups: create, list, load, diff, restore (all or nothing), recovery."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from appliance.config import backuprestore, configbackup
from appliance.config.backupdiff import backup_diff
from appliance.config.backupformat import (
    BackupError,
    BackupRejected,
    PassphraseRequired,
    WrongPassphrase,
)
from appliance.config.backuprestore import backup_restore, restore_recover
from appliance.config.configbackup import (
    backup_create,
    backup_delete,
    backup_header,
    backup_import,
    backup_list,
    backup_load,
    backup_path,
    backup_prune,
)
from appliance.config.policy import object_file
from appliance.config.store import (
    list_policy_objects,
    read_smtp_settings,
    write_policy_objects,
    write_smtp_settings,
)
from appliance.mail.retention import retention_settings, store_retention_set
from appliance.system.facts import read_firmware_release, write_firmware_release
from appliance.system.network import Interface, write_interface
from appliance.system.paths import layout
from tests.support.crash import Crash, crash_on_call

CONFIG_DIRS = ("etc/mailsec", "etc/sysconfig/network", "etc/HOSTNAME")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file in the configuration the backup covers (relative path → digest)."""
    result: dict[str, str] = {}
    for entry in CONFIG_DIRS:
        path = root / entry
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in paths:
            if file.name.startswith("."):
                continue
            result[file.relative_to(root).as_posix()] = hashlib.sha256(
                file.read_bytes()
            ).hexdigest()
    return result


def retention_by_name(root: Path) -> dict[str, int]:
    return {store.name: store.retention_days for store in retention_settings(root).stores}


def change_everything(root: Path) -> None:
    """Change SMTP settings, a policy object, a $(FILE) list, an interface and a retention."""
    smtp = read_smtp_settings()
    smtp.listen_port = 2525
    smtp.next_hop = "relay.example.net"
    write_smtp_settings(smtp)
    objects = list_policy_objects()
    plain = next(obj for obj in objects if obj.file_path is None and obj.type == "keywordlist")
    plain.value = plain.value + "\nnew-keyword"
    write_policy_objects(objects)
    listed = next(obj for obj in objects if obj.file_path is not None)
    object_file(listed).write_text("someone@evil.example\n")
    write_interface(Interface("eth1", "static", "203.0.113.7", 24, None))
    store = retention_settings().stores[0]
    store_retention_set(store.id, store.retention_days + 11)
    (layout().network_dir / "ifcfg-eth9").write_text("BOOTPROTO='dhcp'\n")


def test_a_backup_lists_with_its_header(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", comment="before the upgrade")
    assert header.name.endswith(".lmibak")
    assert header.firmware_version == "2.8.0.0"
    assert header.config_format == "2.8.0"
    assert header.created_by == "admin"
    assert header.comment == "before the upgrade"
    assert header.trigger == "manual"
    assert header.encrypted is False
    assert header.size == backup_path(header.name).stat().st_size
    assert header.hostname
    assert backup_list() == [header]
    assert backup_header(header.name) == header
    assert backup_path(header.name).read_bytes().startswith(b"LMIBAK1\n")


def test_a_backup_holds_config_lists_network_and_settings(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", console={"automatic_downloads": True})
    loaded = backup_load(header.name)
    assert "etc/mailsec/cpe/mailsec_policyobjects1_1.xml" in loaded.files
    assert "etc/mailsec/cpe/mailsec_smtp1_0.xml" in loaded.files
    assert "etc/mailsec/lists/blocked_senders.txt" in loaded.files
    assert "etc/sysconfig/network/ifcfg-eth0" in loaded.files
    assert "etc/sysconfig/network/routes" in loaded.files
    assert "etc/HOSTNAME" in loaded.files
    assert loaded.console == {"automatic_downloads": True}
    assert loaded.appliance_settings["store_retention"] == retention_by_name(demo_appliance)
    assert loaded.converted_from is None
    for relative, data in loaded.files.items():
        assert (demo_appliance / relative).read_bytes() == data


def test_round_trip_restores_every_file_and_retention(demo_appliance: Path) -> None:
    before = snapshot(demo_appliance)
    retention = retention_by_name(demo_appliance)
    header = backup_create(created_by="admin")
    change_everything(demo_appliance)
    assert snapshot(demo_appliance) != before

    result = backup_restore(backup_load(header.name))

    assert snapshot(demo_appliance) == before
    assert retention_by_name(demo_appliance) == retention
    assert result.files_written >= 4
    assert result.files_removed == 1  # ifcfg-eth9, which the backup does not have
    assert result.stores_updated == 1
    assert not layout().config_restore_journal.exists()
    leftovers = [p for p in demo_appliance.rglob("*lmirestore*")]
    assert leftovers == []


def test_the_diff_names_each_changed_object(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    assert backup_diff(backup_load(header.name)) == []
    change_everything(demo_appliance)
    diff = backup_diff(backup_load(header.name))
    by_section: dict[str, set[str]] = {}
    for item in diff:
        by_section.setdefault(item.section, set()).add(item.name)
    assert {"listen_port", "next_hop"} <= by_section["SMTP settings"]
    assert len(by_section["Policy objects"]) == 2  # the keyword list and the $(FILE) list
    assert "eth1 IPADDR" in by_section["Network"]
    assert "eth9 BOOTPROTO" in by_section["Network"]
    assert len(by_section["Message store retention"]) == 1
    port = next(item for item in diff if item.name == "listen_port")
    assert (port.change, port.before, port.after) == ("changed", "2525", "25")
    eth9 = next(item for item in diff if item.name == "eth9 BOOTPROTO")
    assert eth9.change == "removed"


def test_the_diff_shows_mail_policy_rules(demo_appliance: Path) -> None:
    from appliance.config.mailpolicy import MailPolicy
    from appliance.config.store import read_mail_policy, write_mail_policy

    header = backup_create(created_by="admin")
    policy = read_mail_policy()
    write_mail_policy(MailPolicy(policy.rules[1:], policy.quarantine))
    diff = backup_diff(backup_load(header.name))
    assert [(item.section, item.change) for item in diff] == [("Mail policy", "added")]


def test_an_encrypted_backup_needs_its_passphrase(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", passphrase="correct horse")
    assert header.encrypted
    data = backup_path(header.name).read_bytes()
    assert b"mailsec" not in data.split(b"}", 1)[1]  # the payload is not readable
    with pytest.raises(PassphraseRequired):
        backup_load(header.name)
    with pytest.raises(WrongPassphrase, match="passphrase is wrong"):
        backup_load(header.name, passphrase="wrong horse")
    loaded = backup_load(header.name, passphrase="correct horse")
    assert "etc/HOSTNAME" in loaded.files


def test_an_encrypted_round_trip(demo_appliance: Path) -> None:
    before = snapshot(demo_appliance)
    header = backup_create(created_by="admin", passphrase="s3cret pass")
    change_everything(demo_appliance)
    backup_restore(backup_load(header.name, passphrase="s3cret pass"))
    assert snapshot(demo_appliance) == before


def test_a_wrong_passphrase_changes_nothing(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", passphrase="s3cret pass")
    change_everything(demo_appliance)
    changed = snapshot(demo_appliance)
    with pytest.raises(WrongPassphrase):
        backup_restore(backup_load(header.name, passphrase="other"))
    assert snapshot(demo_appliance) == changed


def test_a_crash_between_renames_is_rolled_forward(demo_appliance: Path) -> None:
    before = snapshot(demo_appliance)
    retention = retention_by_name(demo_appliance)
    header = backup_create(created_by="admin")
    change_everything(demo_appliance)
    loaded = backup_load(header.name)

    with pytest.raises(Crash), crash_on_call(backuprestore, "_rename_into_place", 3):
        backup_restore(loaded)
    assert layout().config_restore_journal.exists()
    assert snapshot(demo_appliance) not in (before,)

    assert restore_recover() is True
    assert snapshot(demo_appliance) == before
    assert retention_by_name(demo_appliance) == retention
    assert not layout().config_restore_journal.exists()
    assert restore_recover() is False


def test_the_next_restore_finishes_an_interrupted_one_first(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(demo_appliance)
    header = backup_create(created_by="admin")
    change_everything(demo_appliance)
    loaded = backup_load(header.name)
    real_rename = backuprestore._rename_into_place

    def crash(source: Path, target: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(backuprestore, "_rename_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        backup_restore(loaded)
    monkeypatch.setattr(backuprestore, "_rename_into_place", real_rename)
    backup_restore(loaded)
    assert snapshot(demo_appliance) == before


def test_an_error_during_the_renames_rolls_everything_back(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = backup_create(created_by="admin")
    change_everything(demo_appliance)
    changed = snapshot(demo_appliance)
    retention = retention_by_name(demo_appliance)
    loaded = backup_load(header.name)
    real_rename = backuprestore._rename_into_place
    calls = 0

    def fail_on_second(source: Path, target: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(backuprestore, "_rename_into_place", fail_on_second)
    with pytest.raises(OSError):
        backup_restore(loaded)
    assert snapshot(demo_appliance) == changed
    assert retention_by_name(demo_appliance) == retention
    assert not layout().config_restore_journal.exists()
    assert [p for p in demo_appliance.rglob("*lmirestore*")] == []


def test_a_crash_while_staging_leaves_the_old_configuration(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    change_everything(demo_appliance)
    changed = snapshot(demo_appliance)
    loaded = backup_load(header.name)
    # What a crash while staging leaves: a journal not yet committed, a staged file and a link
    # to the old one.
    target = layout().smtp_xml
    staged = target.with_name(f".{target.name}.lmirestore-new")
    old = target.with_name(f".{target.name}.lmirestore-old")
    staged.write_bytes(loaded.files["etc/mailsec/cpe/mailsec_smtp1_0.xml"])
    os.link(target, old)
    journal = {
        "state": "staging",
        "backup": header.name,
        "write": [
            {
                "target": "etc/mailsec/cpe/mailsec_smtp1_0.xml",
                "staged": "etc/mailsec/cpe/.mailsec_smtp1_0.xml.lmirestore-new",
                "old": "etc/mailsec/cpe/.mailsec_smtp1_0.xml.lmirestore-old",
            }
        ],
        "remove": [],
        "store_retention": {"Spam quarantine": 1},
    }
    layout().config_restore_journal.write_text(json.dumps(journal))
    retention = retention_by_name(demo_appliance)
    assert restore_recover() is False
    assert snapshot(demo_appliance) == changed
    assert retention_by_name(demo_appliance) == retention
    assert not staged.exists() and not old.exists()
    assert not layout().config_restore_journal.exists()


def test_a_newer_firmware_backup_is_refused(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    release = read_firmware_release()
    write_firmware_release({**release, "FIRMWARE_VERSION": "2.7.0.0"})
    with pytest.raises(BackupRejected, match=r"made by firmware 2\.8\.0\.0.*runs 2\.7\.0\.0"):
        backup_load(header.name)


def test_an_older_firmware_backup_loads(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    release = read_firmware_release()
    write_firmware_release({**release, "FIRMWARE_VERSION": "2.8.0.5"})
    assert backup_load(header.name).header.firmware_version == "2.8.0.0"


def test_names_are_checked(demo_appliance: Path) -> None:
    for name in ("../x.lmibak", "a/b.lmibak", "x.tar", "", "..lmibak", "missing.lmibak"):
        with pytest.raises(KeyError):
            backup_path(name)


def test_delete_and_prune(demo_appliance: Path) -> None:
    made = [backup_create(created_by="beat", trigger="scheduled") for _ in range(4)]
    manual = backup_create(created_by="admin")
    deleted = backup_prune("scheduled", 2)
    assert len(deleted) == 2
    remaining = {header.name for header in backup_list()}
    assert manual.name in remaining
    assert len(remaining & {header.name for header in made}) == 2
    backup_delete(manual.name)
    with pytest.raises(KeyError):
        backup_header(manual.name)


def test_an_unreadable_file_is_skipped_in_the_list(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    (layout().config_backups_dir / "junk.lmibak").write_bytes(b"not a backup")
    assert [h.name for h in backup_list()] == [header.name]


def test_an_upload_is_stored_byte_for_byte(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", passphrase="abcdefgh")
    data = backup_path(header.name).read_bytes()
    with open(backup_path(header.name), "rb") as handle:
        imported = backup_import(handle, filename="x.lmibak", uploaded_by="admin")
    assert imported.trigger == "upload"
    assert imported.name != header.name
    assert backup_path(imported.name).read_bytes() == data
    plain = backup_create(created_by="admin")
    imported = backup_import(
        backup_path(plain.name).read_bytes(), filename="y.lmibak", uploaded_by="admin"
    )
    assert backup_load(imported.name).files == backup_load(plain.name).files


def test_invalid_create_arguments_are_refused(demo_appliance: Path) -> None:
    with pytest.raises(BackupError):
        backup_create(created_by="admin", trigger="whenever")
    with pytest.raises(BackupError):
        backup_create(created_by="admin", comment="x" * 501)
    with pytest.raises(BackupError):
        backup_create(created_by="admin", passphrase="")
    assert backup_list() == []


def test_a_different_config_format_without_a_converter_is_refused(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = backup_create(created_by="admin")
    monkeypatch.setattr(configbackup, "_configconvert", lambda: None)
    monkeypatch.setattr(configbackup, "_running_config_format", lambda root: "2.8.1")
    with pytest.raises(BackupRejected, match=r"format 2\.8\.0.*uses 2\.8\.1"):
        backup_load(header.name)


def test_a_backup_of_a_newer_config_format_is_refused(
    demo_appliance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = backup_create(created_by="admin")
    monkeypatch.setattr(configbackup, "_running_config_format", lambda root: "2.7.0")
    with pytest.raises(BackupRejected, match=r"2\.8\.0"):
        backup_load(header.name)


def test_restore_keeps_file_modes(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    os.chmod(layout().smtp_xml, 0o640)
    smtp = read_smtp_settings()
    smtp.listen_port = 26
    write_smtp_settings(smtp)
    backup_restore(backup_load(header.name))
    assert layout().smtp_xml.stat().st_mode & 0o777 == 0o640
    assert read_smtp_settings().listen_port == 25


def test_a_2_8_0_backup_is_converted_after_the_upgrade(demo_appliance: Path) -> None:
    configconvert = pytest.importorskip("appliance.config.configconvert")
    objects_before = list_policy_objects()
    smtp_before = read_smtp_settings()
    header = backup_create(created_by="admin")
    configconvert.config_convert()
    assert configconvert.config_format() == "2.8.1"
    change_everything(demo_appliance)

    loaded = backup_load(header.name)
    assert loaded.converted_from == "2.8.0"
    assert "etc/mailsec/cpe/mailsec_policyobjects1_1.xml" not in loaded.files
    result = backup_restore(loaded)

    assert result.converted_from == "2.8.0"
    assert configconvert.config_format() == "2.8.1"
    assert list_policy_objects() == objects_before
    assert read_smtp_settings() == smtp_before
    listed = next(obj for obj in objects_before if obj.file_path is not None)
    assert object_file(listed).read_bytes() == loaded.files[listed.file_path.lstrip("/")]
