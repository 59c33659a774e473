"""The demo appliance: the files and formats the console and the upgrade guide rely on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from xml.sax.saxutils import unescape

import pytest

from appliance.config import policy, store
from appliance.config.store import read_smtp_settings
from appliance.demo import init_demo
from appliance.mail import demo_store, msgstore
from appliance.system import network, rescue
from appliance.system.errors import ApplianceExists
from appliance.system.facts import (
    appliance_exists,
    system_info,
)
from appliance.system.paths import layout


def test_it_reports_firmware_2800_on_sles10(demo_appliance: Path) -> None:
    info = system_info()
    assert info.firmware_version == "2.8.0.0"
    assert info.os_release == "SUSE Linux Enterprise Server 10 (x86_64)"
    assert info.hostname == "mailsec01.example.com"
    assert info.model and info.build and info.serial
    os_release = layout().os_release.read_text().splitlines()
    assert os_release[1:] == ["VERSION = 10", "PATCHLEVEL = 3"]


def test_the_guides_grep_lists_exactly_the_file_macro_objects(demo_appliance: Path) -> None:
    result = subprocess.run(
        ["grep", "-B", "1", "JChGSUxFL", str(layout().policy_objects_xml)],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = [unescape(name) for name in re.findall(r"<name>(.*)</name>", result.stdout)]
    expected = [obj.name for obj in store.file_macro_objects()]
    assert len(expected) >= 3
    assert listed == expected


def test_it_has_every_policy_object_type_and_inline_values(demo_appliance: Path) -> None:
    objects = store.list_policy_objects()
    assert {obj.type for obj in objects} == set(policy.OBJECT_TYPES)
    assert any(obj.file_path is None and obj.value for obj in objects)
    assert len({obj.id for obj in objects}) == len(objects)


def test_every_file_a_macro_names_exists_with_entries(demo_appliance: Path) -> None:
    for obj in store.file_macro_objects():
        assert obj.file_path is not None and obj.file_path.startswith("/etc/mailsec/lists/")
        path = policy.object_file(obj)
        assert path.parent == layout().lists_dir
        assert len(policy.read_object_lines(obj)) >= 3


def test_it_writes_readable_smtp_settings(demo_appliance: Path) -> None:
    smtp = read_smtp_settings()
    assert smtp.listen_port == 25
    assert smtp.smtp_log_retention_days == 90
    assert smtp.tracking_log_retention_days == 90


def test_eth0_uses_dhcp_with_a_lease_and_eth1_is_static(demo_appliance: Path) -> None:
    interfaces = {iface.name: iface for iface in network.list_interfaces()}
    assert set(interfaces) == {"eth0", "eth1"}
    eth0, eth1 = interfaces["eth0"], interfaces["eth1"]
    assert (eth0.mode, eth0.cidr, eth0.gateway) == ("dhcp", "192.0.2.25/24", "192.0.2.1")
    assert (eth1.mode, eth1.cidr) == ("static", "198.51.100.10/24")
    assert layout().routes_file.is_file()


def test_the_active_system_is_a_relative_link_to_slot_a(demo_appliance: Path) -> None:
    the_layout = layout()
    assert the_layout.active_system.is_symlink()
    assert os.readlink(the_layout.active_system) == "slot-a"
    slot = the_layout.system_dir / "slot-a"
    assert (slot / "VERSION").read_text().strip() == "2.8.0.0"
    assert (slot / "etc" / "firmware-release").read_text() == (
        the_layout.firmware_release.read_text()
    )
    assert any((slot / "bin").iterdir()) and any((slot / "lib").iterdir())


def test_it_fills_the_message_store_and_leaves_the_xpu_dir_empty(demo_appliance: Path) -> None:
    totals = msgstore.totals()
    assert totals is not None and totals.messages == 200
    assert layout().xpu_dir.is_dir() and not any(layout().xpu_dir.iterdir())


def test_the_tracking_log_has_a_row_for_each_recipient_in_order(demo_appliance: Path) -> None:
    """As the mail service writes it: a search for any recipient finds the message."""
    conn = msgstore.connect(readonly=True)
    try:
        messages = conn.execute("SELECT id, recipients FROM quarantined_message").fetchall()
        rows = conn.execute("SELECT quarantine_id, recipient FROM tracking_log ORDER BY id")
        tracked = rows.fetchall()
    finally:
        conn.close()
    expected = [
        (id_, rcpt) for id_, value in sorted(map(tuple, messages)) for rcpt in value.split(", ")
    ]
    assert [tuple(row) for row in tracked] == expected
    assert len({id_ for id_, _ in tracked}) == 200 < len(tracked)


def test_it_puts_a_system_backup_on_the_rescue_partition(demo_appliance: Path) -> None:
    backup = rescue.system_backup_info()
    assert backup is not None and backup.firmware_version == "2.8.0.0"


def test_it_refuses_to_overwrite_an_existing_appliance(demo_appliance: Path) -> None:
    before = layout().firmware_release.stat().st_mtime_ns
    with pytest.raises(ApplianceExists):
        init_demo(demo_appliance, messages=10)
    assert layout().firmware_release.stat().st_mtime_ns == before
    assert msgstore.totals().messages == 200


def test_force_replaces_the_appliance_and_empties_the_root(demo_appliance: Path) -> None:
    stray = demo_appliance / "stray.txt"
    stray.write_text("left by hand")
    summary = init_demo(demo_appliance, messages=20, force=True)
    assert not stray.exists()
    assert summary.messages == 20
    assert msgstore.totals().messages == 20


def test_an_interrupted_build_is_redone_without_doubling_the_store(appliance_root: Path) -> None:
    demo_store.fill_demo(appliance_root, messages=50)  # as if init_demo died after the fill
    assert not appliance_exists()
    summary = init_demo(appliance_root, messages=30)
    assert summary.messages == 30
    assert msgstore.totals().messages == 30


def test_the_summary_counts_what_was_built(appliance_root: Path) -> None:
    summary = init_demo(appliance_root, messages=12)
    assert summary.firmware_version == "2.8.0.0"
    assert summary.messages == 12
    assert summary.policy_objects == len(store.list_policy_objects())
    assert summary.file_macro_objects == len(store.file_macro_objects())


def test_todays_policy_judges_every_stored_demo_message_as_it_was_stored(
    demo_appliance: Path,
) -> None:
    """The message detail page shows the stored verdict beside what the policy says today: on
    the demo appliance the two agree (spam by its phrases, viruses by the EICAR test file,
    policy violations by the confidential keywords, the archive clean)."""
    from smtp.engine import compile_policy, envelope_address, evaluate

    compiled, _ = compile_policy()
    conn = msgstore.connect(readonly=True)
    try:
        rows = conn.execute("SELECT id, sender, recipients, verdict FROM quarantined_message")
        judged = set()
        for message_id, sender, to, stored in rows:
            raw = msgstore.read_raw(conn, message_id)
            assert raw is not None
            today = evaluate(compiled, envelope_address(sender), tuple(to.split(",")), raw)
            judged.add((stored, today.verdict))
    finally:
        conn.close()
    assert judged == {(verdict, verdict) for verdict in ("spam", "virus", "policy", "clean")}
