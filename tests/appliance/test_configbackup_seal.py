"""The appliance's seal on its backups: a backup made here verifies; one from elsewhere, from
before the seal, or altered is unverified and is restored only once the files it writes were
confirmed, and without that confirmation nothing changes."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from appliance.config import backupmac
from appliance.config.backuprestore import ConfirmationRequired, backup_restore, restore_plan
from appliance.config.configbackup import (
    backup_create,
    backup_import,
    backup_list,
    backup_load,
    backup_path,
)
from appliance.system.paths import layout
from tests.backups.archives import join, split
from tests.support.trees import tree_snapshot

BLOCKED = "files/etc/mailsec/lists/blocked_senders.txt"


def altered(data: bytes) -> bytes:
    """The backup with one more address in a list, every checksum recomputed: only the seal,
    which needs the appliance's key, can tell."""
    header, members = split(data)
    members[BLOCKED] = members[BLOCKED] + b"partner@example.net\n"
    return join(header, members)


def state(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry of the appliance but the restore's lock, which a refused restore may create."""
    snapshot = tree_snapshot(root)
    return {k: v for k, v in snapshot.items() if not k.endswith(".config-restore.lock")}


def stored(data: bytes) -> str:
    return backup_import(data, filename="x.lmibak", uploaded_by="admin").name


def test_the_appliance_has_a_private_key_that_no_backup_carries(demo_appliance: Path) -> None:
    key_file = layout().backup_key
    assert len(key_file.read_bytes()) == backupmac.KEY_BYTES
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    loaded = backup_load(backup_create(created_by="admin").name)
    assert not any(name.endswith("backup.key") for name in loaded.files)
    assert key_file.read_bytes() not in b"".join(loaded.files.values())


def test_a_backup_made_here_is_verified_and_restores_without_confirmation(
    demo_appliance: Path,
) -> None:
    header = backup_create(created_by="admin")
    assert header.verified is True
    assert [h.verified for h in backup_list()] == [True]
    loaded = backup_load(header.name)
    assert loaded.verified
    backup_restore(loaded)


def test_an_encrypted_backup_is_verified_once_its_passphrase_opened_it(
    demo_appliance: Path,
) -> None:
    header = backup_create(created_by="admin", passphrase="correct horse")
    assert header.verified is None  # the list cannot tell before the passphrase
    assert backup_load(header.name, passphrase="correct horse").verified


def test_a_downloaded_and_uploaded_backup_stays_verified(demo_appliance: Path) -> None:
    data = backup_path(backup_create(created_by="admin").name).read_bytes()
    assert backup_load(stored(data)).verified


def test_an_altered_backup_is_unverified_and_restores_nothing_unconfirmed(
    demo_appliance: Path,
) -> None:
    data = backup_path(backup_create(created_by="admin").name).read_bytes()
    name = stored(altered(data))
    assert {h.name: h.verified for h in backup_list()}[name] is False
    loaded = backup_load(name)
    assert not loaded.verified
    before = state(demo_appliance)
    with pytest.raises(ConfirmationRequired, match="unverified") as refused:
        backup_restore(loaded)
    assert refused.value.files == ["etc/mailsec/lists/blocked_senders.txt"]
    assert "/etc/mailsec/lists/blocked_senders.txt" in str(refused.value)
    assert state(demo_appliance) == before


def test_a_confirmation_must_name_every_file_the_restore_writes(demo_appliance: Path) -> None:
    data = backup_path(backup_create(created_by="admin").name).read_bytes()
    header, members = split(altered(data))
    members["files/etc/HOSTNAME"] = b"other.example.com\n"
    loaded = backup_load(stored(join(header, members)))
    plan = restore_plan(loaded)
    assert sorted(plan.writes) == ["etc/HOSTNAME", "etc/mailsec/lists/blocked_senders.txt"]
    before = state(demo_appliance)
    with pytest.raises(ConfirmationRequired):
        backup_restore(loaded, confirmed=["etc/HOSTNAME"])
    assert state(demo_appliance) == before
    backup_restore(loaded, confirmed=plan.writes)
    assert layout().hostname_file.read_text() == "other.example.com\n"


def test_a_backup_from_another_appliance_is_unverified(
    demo_appliance: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(demo_appliance, other, symlinks=True)
    layout(other).backup_key.unlink()
    backupmac.appliance_key(other, create=True)
    made_there = backup_create(created_by="admin", root=other)
    assert made_there.verified
    data = backup_path(made_there.name, other).read_bytes()
    assert backup_load(stored(data)).verified is False


def test_a_backup_without_a_seal_is_unverified(demo_appliance: Path) -> None:
    data = backup_path(backup_create(created_by="admin").name).read_bytes()
    header, members = split(data)
    del header["mac"]
    assert backup_load(stored(join(header, members))).verified is False


def test_a_forged_seal_of_the_wrong_shape_is_refused(demo_appliance: Path) -> None:
    from appliance.config.backupformat import BackupRejected

    data = backup_path(backup_create(created_by="admin").name).read_bytes()
    header, members = split(data)
    header["mac"] = "not hex"
    with pytest.raises(BackupRejected, match="invalid seal"):
        stored(join(header, members))


def test_a_damaged_key_makes_every_backup_unverified_not_an_error(demo_appliance: Path) -> None:
    name = backup_create(created_by="admin").name
    layout().backup_key.write_bytes(b"short")
    assert [h.verified for h in backup_list()] == [False]
    assert backup_load(name).verified is False
