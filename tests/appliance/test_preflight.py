"""The upgrade preflight checklist on a demo appliance, and pinning a DHCP lease as static."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config.policy import PolicyObject, file_macro
from appliance.config.store import list_policy_objects, write_policy_objects
from appliance.firmware import preflight
from appliance.mail import msgstore
from appliance.system import network
from appliance.system.facts import read_firmware_release, write_firmware_release
from appliance.system.paths import layout
from tests.support.trees import tree_snapshot

GB = 1024**3


@dataclass(frozen=True)
class Usage:
    total: int
    free: int


class FakeDisks:
    """Stands in for psutil.disk_usage: a chosen usage for paths under given prefixes."""

    def __init__(self, default: Usage, **under: Usage) -> None:
        self.default = default
        self.under = {Path(prefix): usage for prefix, usage in under.items()}
        self.asked: list[str] = []

    def __call__(self, path: str) -> Usage:
        self.asked.append(path)
        for prefix, usage in self.under.items():
            if Path(path) == prefix or Path(path).is_relative_to(prefix):
                return usage
        return self.default


PLENTY = Usage(total=100 * GB, free=80 * GB)


def run(root: Path, disks: FakeDisks | None = None, **kwargs) -> dict[str, preflight.Check]:
    version = kwargs.pop("version", "2.8.1.0")
    minimum = kwargs.pop("minimum", "2.8.0.0")
    checks = preflight.preflight_checks(
        version, minimum, root, disk_usage=disks or FakeDisks(PLENTY), **kwargs
    )
    return {check.key: check for check in checks}


def test_the_demo_appliance_gets_every_check_in_order_with_real_disks(
    demo_appliance: Path, tmp_path: Path
) -> None:
    before = tree_snapshot(demo_appliance)
    checks = preflight.preflight_checks(
        "2.8.1.0", "2.8.0.0", console_db_path=tmp_path / "db.sqlite3"
    )

    assert [check.key for check in checks] == [
        "firmware",
        "disk-msgstore",
        "disk-console",
        "space-for-upgrade",
        "dhcp",
        "file-macros",
        "rescue",
        "downtime",
    ]
    by_key = {check.key: check for check in checks}
    assert by_key["firmware"].status == "pass"
    for key in ("disk-msgstore", "disk-console"):  # psutil on the real disk
        assert by_key[key].status in ("pass", "fail")
        assert "% free" in by_key[key].value
    assert by_key["dhcp"].status == "warn"
    assert by_key["file-macros"].status == "pass"
    assert by_key["rescue"].status == "warn"
    assert by_key["downtime"].status == "pass"
    assert all(check.title and check.value for check in checks)
    # Read-only: the appliance is byte-identical afterwards.
    assert tree_snapshot(demo_appliance) == before


def test_firmware_at_the_minimum_and_an_newer_bundle_passes(demo_appliance: Path) -> None:
    check = run(demo_appliance)["firmware"]
    assert check.status == "pass"
    assert "installed 2.8.0.0" in check.value and "2.8.1.0" in check.value


def test_firmware_below_the_minimum_fails_with_upgrade_first(demo_appliance: Path) -> None:
    values = read_firmware_release()
    values["FIRMWARE_VERSION"] = "2.7.3.0"
    write_firmware_release(values)
    check = run(demo_appliance)["firmware"]
    assert check.status == "fail"
    assert "Upgrade to 2.8.0.0 first" in check.advice


@pytest.mark.parametrize("bundle", ["2.8.0.0", "2.7.0.0"])
def test_a_bundle_not_newer_than_the_installed_firmware_fails(
    demo_appliance: Path, bundle: str
) -> None:
    check = run(demo_appliance, version=bundle, minimum="2.7.0.0")["firmware"]
    assert check.status == "fail"
    assert "not newer" in check.advice


@pytest.mark.parametrize("bundle", ["2.8.1.0; rm -rf /", "", "latest"])
def test_a_malformed_bundle_version_fails_clearly(demo_appliance: Path, bundle: str) -> None:
    check = run(demo_appliance, version=bundle)["firmware"]
    assert check.status == "fail"
    assert "firmware version" in check.advice


def test_message_store_disk_below_half_free_fails_with_the_reclaim_advice(
    demo_appliance: Path,
) -> None:
    store = layout().msgstore_dir
    disks = FakeDisks(PLENTY, **{str(store): Usage(total=100 * GB, free=49 * GB)})
    check = run(demo_appliance, disks)["disk-msgstore"]
    assert check.status == "fail"
    assert check.value.startswith("49% free")
    assert "Reclaim disk space" in check.advice
    assert "lower retention" in check.advice.lower()


def test_message_store_disk_at_exactly_half_free_passes(demo_appliance: Path) -> None:
    store = layout().msgstore_dir
    disks = FakeDisks(PLENTY, **{str(store): Usage(total=100 * GB, free=50 * GB)})
    assert run(demo_appliance, disks)["disk-msgstore"].status == "pass"


def test_console_database_disk_is_checked_when_it_is_local(
    demo_appliance: Path, tmp_path: Path
) -> None:
    db_dir = tmp_path / "console"
    db_dir.mkdir()
    disks = FakeDisks(PLENTY, **{str(db_dir): Usage(total=10 * GB, free=1 * GB)})
    check = run(demo_appliance, disks, console_db_path=db_dir / "db.sqlite3")["disk-console"]
    assert check.status == "fail"
    assert check.value.startswith("10% free")


def test_console_database_elsewhere_passes(demo_appliance: Path) -> None:
    check = run(demo_appliance, console_db_path=None)["disk-console"]
    assert check.status == "pass"
    assert check.value == "PostgreSQL: not on this disk"


def test_space_for_the_upgrade_counts_image_copy_and_new_store(demo_appliance: Path) -> None:
    store_bytes = msgstore.totals().bytes
    image = 500 * 1024 * 1024
    need = image + 2 * store_bytes
    tight = FakeDisks(Usage(total=100 * GB, free=need - 1))
    enough = FakeDisks(Usage(total=100 * GB, free=need))

    failing = run(demo_appliance, tight, image_bytes=image)["space-for-upgrade"]
    assert failing.status == "fail"
    assert "short" in failing.advice
    assert any("phase 4" in line for line in failing.details)
    assert run(demo_appliance, enough, image_bytes=image)["space-for-upgrade"].status == "pass"


def test_dhcp_interface_warns_with_its_leased_address(demo_appliance: Path) -> None:
    check = run(demo_appliance)["dhcp"]
    assert check.status == "warn"
    assert check.value == "eth0 on DHCP"
    assert check.details == ("eth0: DHCP, leased 192.0.2.25/24, gateway 192.0.2.1",)
    assert "return to DHCP" in check.advice


def test_pinning_writes_the_lease_as_static_and_unpinning_restores_the_files(
    demo_appliance: Path,
) -> None:
    the_layout = layout()
    ifcfg_before = the_layout.ifcfg("eth0").read_bytes()
    routes_before = the_layout.routes_file.read_bytes()

    pinned = network.dhcp_pin_static("eth0")

    assert (pinned.mode, pinned.address, pinned.prefix) == ("static", "192.0.2.25", 24)
    assert pinned.gateway == "192.0.2.1" and pinned.pinned_from_dhcp
    text = the_layout.ifcfg("eth0").read_text()
    assert "BOOTPROTO='static'" in text
    assert "IPADDR='192.0.2.25/24'" in text
    assert "LMI_PINNED_FROM_DHCP='yes'" in text
    assert "# Internet side" in text  # the administrator's comment is kept
    assert "default 192.0.2.1 - eth0" in the_layout.routes_file.read_text()
    assert network.dhcp_pin_static("eth0") == pinned  # idempotent

    check = run(demo_appliance)["dhcp"]
    assert check.status == "pass"
    assert check.advice == "Return eth0 to DHCP after the upgrade."

    unpinned = network.dhcp_unpin("eth0")
    assert unpinned.mode == "dhcp" and unpinned.address == "192.0.2.25"
    assert the_layout.ifcfg("eth0").read_bytes() == ifcfg_before
    assert the_layout.routes_file.read_bytes() == routes_before
    assert network.dhcp_unpin("eth0") == unpinned  # idempotent


def test_pinning_refuses_a_static_interface_or_a_missing_lease(demo_appliance: Path) -> None:
    the_layout = layout()
    before = tree_snapshot(demo_appliance / "etc")
    with pytest.raises(ValueError, match="already has a static address"):
        network.dhcp_pin_static("eth1")
    with pytest.raises(ValueError, match="not pinned from DHCP"):
        network.dhcp_unpin("eth1")
    with pytest.raises(ValueError, match="invalid interface name"):
        network.dhcp_pin_static("../eth0")
    assert tree_snapshot(demo_appliance / "etc") == before

    the_layout.dhcp_lease("eth0").unlink()
    before = tree_snapshot(demo_appliance / "etc")
    with pytest.raises(ValueError, match="no current DHCP lease"):
        network.dhcp_pin_static("eth0")
    assert tree_snapshot(demo_appliance / "etc") == before


def test_file_macro_objects_are_listed_with_their_files(demo_appliance: Path) -> None:
    check = run(demo_appliance)["file-macros"]
    assert check.status == "pass"
    assert check.value == "3 policy objects read files"
    assert "carried over automatically" in check.advice
    assert any(
        line.startswith("Blocked senders: /etc/mailsec/lists/blocked_senders.txt (")
        for line in check.details
    )


def test_a_file_macro_whose_file_is_missing_warns(demo_appliance: Path) -> None:
    (layout().lists_dir / "allowed_domains.txt").unlink()
    objects = list_policy_objects()
    objects.append(PolicyObject("x-1", "Sneaky", "domainlist", "$(FILE/../../etc/passwd)"))
    write_policy_objects(objects)

    check = run(demo_appliance)["file-macros"]
    assert check.status == "warn"
    assert "Allowed domains" in check.advice and "Sneaky" in check.advice
    assert "Allowed domains: /etc/mailsec/lists/allowed_domains.txt (missing)" in check.details


def test_no_file_macro_objects_passes_with_none(demo_appliance: Path) -> None:
    write_policy_objects([o for o in list_policy_objects() if o.file_path is None])
    check = run(demo_appliance)["file-macros"]
    assert (check.status, check.value) == ("pass", "none")
    assert file_macro("/etc/x")  # the helper the demo uses still builds macros


def test_the_rescue_image_will_be_overwritten_warning(demo_appliance: Path) -> None:
    check = run(demo_appliance)["rescue"]
    assert check.status == "warn"
    assert check.value.startswith("firmware 2.8.0.0, ")
    assert "configuration backup" in check.advice

    layout().system_backup_manifest.unlink()
    check = run(demo_appliance)["rescue"]
    assert (check.status, check.value) == ("warn", "no system backup image")


def test_downtime_is_estimated_from_the_real_store_size(demo_appliance: Path) -> None:
    totals = msgstore.totals()
    check = run(demo_appliance)["downtime"]
    expected = preflight.downtime_estimate_seconds(totals.bytes, totals.messages)
    assert check.status == "pass"
    assert check.value == f"about {expected:.1f} s"
    assert f"{totals.messages} messages" in check.details[0]
    # Flat in the store's size: a million messages of ~2 kB as long as 200,000 of them, about
    # a second (bench/upgrade.py measured 1.24 s and 1.06 s).
    million = preflight.downtime_estimate_seconds(2 * GB, 1_000_000)
    assert million == pytest.approx(preflight.downtime_estimate_seconds(2 * GB // 5, 200_000))
    assert 0.5 < million < 3


def test_a_check_that_cannot_be_measured_fails_with_the_reason(demo_appliance: Path) -> None:
    layout().policy_objects_xml.unlink()
    checks = run(demo_appliance)
    assert checks["file-macros"].status == "fail"
    assert checks["file-macros"].value == "could not be measured"
    assert "policy objects" in checks["file-macros"].advice
    assert not preflight.preflight_passed(list(checks.values()))


def test_preflight_passed_ignores_warnings(demo_appliance: Path) -> None:
    checks = list(run(demo_appliance).values())
    assert {check.status for check in checks} == {"pass", "warn"}
    assert preflight.preflight_passed(checks)
