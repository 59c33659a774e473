"""Appliance files damaged on disk (a host name that is not UTF-8, an interface file with a
broken address): the readers raise MalformedApplianceFile naming the file, and every page that
shows them reports the damage with the rest of the page working, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.http import HttpResponse
from django.test import Client

from appliance.config.backupdiff import backup_diff
from appliance.config.backuprestore import backup_restore
from appliance.config.configbackup import backup_create, backup_load
from appliance.system import network
from appliance.system.errors import MalformedApplianceFile
from appliance.system.facts import read_firmware_release, read_os_release, system_info
from appliance.system.paths import layout

NOT_UTF8 = b"\xffmailsec01\n"
DAMAGE = "the file etc/HOSTNAME cannot be read: not UTF-8"


@pytest.fixture
def damaged_hostname(demo_appliance: Path) -> Path:
    layout().hostname_file.write_bytes(NOT_UTF8)
    return demo_appliance


def test_system_info_reports_a_host_name_that_is_not_utf8(damaged_hostname: Path) -> None:
    with pytest.raises(MalformedApplianceFile, match=DAMAGE):
        system_info()


def test_release_files_that_are_not_utf8_are_reported_by_name(demo_appliance: Path) -> None:
    layout().os_release.write_bytes(b"SUSE Linux \xe9nterprise\n")
    with pytest.raises(MalformedApplianceFile, match="etc/SuSE-release cannot be read"):
        read_os_release()
    layout().firmware_release.write_bytes(b"FIRMWARE_VERSION=2.8.0.0\xff\n")
    with pytest.raises(MalformedApplianceFile, match="etc/firmware-release cannot be read"):
        read_firmware_release()


@pytest.mark.parametrize(
    ("relative", "content", "match"),
    [
        ("etc/sysconfig/network/ifcfg-eth1", b"IPADDR='\xff'\n", "ifcfg-eth1 cannot be read"),
        ("etc/sysconfig/network/ifcfg-eth1", b"IPADDR='999.1.2.3/24'\n", "invalid address"),
        ("etc/sysconfig/network/ifcfg-eth1", b"BOOTPROTO='bogus'\n", "unsupported BOOTPROTO"),
        ("etc/sysconfig/network/routes", b"default \xfe\n", "routes cannot be read"),
        ("etc/sysconfig/network/routes", b"default gw - -\n", "invalid default route"),
    ],
)
def test_damaged_interface_files_are_reported_by_name(
    demo_appliance: Path, relative: str, content: bytes, match: str
) -> None:
    (demo_appliance / relative).write_bytes(content)
    with pytest.raises(MalformedApplianceFile, match=match):
        network.list_interfaces()


def test_a_damaged_dhcp_lease_is_reported_by_name(demo_appliance: Path) -> None:
    layout().dhcp_lease("eth0").write_bytes(b"IPADDR=192.0.2.\xff\n")
    with pytest.raises(MalformedApplianceFile, match=r"dhcpcd-eth0\.info cannot be read"):
        network.read_interface("eth0")


def test_interface_files_that_name_no_interface_are_skipped(demo_appliance: Path) -> None:
    (layout().network_dir / "ifcfg-").write_text("BOOTPROTO='dhcp'\n")
    (layout().network_dir / "ifcfg-.hidden").write_text("BOOTPROTO='dhcp'\n")
    assert [iface.name for iface in network.list_interfaces()] == ["eth0", "eth1"]


@pytest.mark.parametrize("url", ["/home/", "/home/system/", "/updates/licensing/"])
def test_pages_report_a_damaged_host_name_instead_of_failing(
    admin_client: Client, damaged_hostname: Path, url: str
) -> None:
    response = admin_client.get(url)

    assert response.status_code == 200
    assert DAMAGE in response.content.decode()


def test_home_keeps_its_notices_and_graphs_with_a_damaged_host_name(
    admin_client: Client, damaged_hostname: Path
) -> None:
    response = admin_client.get("/home/")

    assert response.status_code == 200
    assert DAMAGE in response.context["appliance_error"]
    assert any(DAMAGE in notice.message for notice in response.context["notices"])
    assert response.context["graph_panel"] is not None


@pytest.mark.parametrize(
    "url",
    [
        "/home/notifications/",
        "/updates/licensing/install/",
        "/api/v1/updates",
        "/api/v1/updates/install/preflight",
    ],
)
def test_other_pages_with_a_damaged_host_name_do_not_fail(
    admin_client: Client, damaged_hostname: Path, url: str
) -> None:
    assert admin_client.get(url).status_code == 200


def test_the_api_reports_a_damaged_host_name(admin_client: Client, damaged_hostname: Path) -> None:
    response = admin_client.get("/api/v1/system")

    assert response.status_code == 503
    assert DAMAGE in response.json()["detail"]


def _post(client: Client, url: str) -> HttpResponse:
    client.get("/updates/licensing/")
    token = client.cookies["csrftoken"].value
    return client.post(url, {}, follow=True, HTTP_X_CSRFTOKEN=token)


def test_check_now_with_a_damaged_host_name_does_not_fail(
    admin_client: Client, damaged_hostname: Path
) -> None:
    assert _post(admin_client, "/updates/licensing/check/").status_code == 200


def test_creating_a_backup_reports_a_damaged_host_name(
    admin_client: Client, damaged_hostname: Path
) -> None:
    response = _post(admin_client, "/backup/system/config/create/")

    assert response.status_code == 200
    assert DAMAGE in response.content.decode()
    assert not list(layout().config_backups_dir.glob("*.lmibak"))


def test_no_backup_is_made_of_a_damaged_host_name(damaged_hostname: Path) -> None:
    # Its restore would be refused, so the backup would only look like a way back.
    with pytest.raises(MalformedApplianceFile, match=DAMAGE):
        backup_create(created_by="admin")


def test_restoring_a_good_backup_repairs_a_damaged_host_name(demo_appliance: Path) -> None:
    header = backup_create(created_by="admin")
    layout().hostname_file.write_bytes(NOT_UTF8)
    loaded = backup_load(header.name)

    diff = {item.name: item for item in backup_diff(loaded) if item.section == "Host name"}
    assert DAMAGE in (diff["hostname"].before or "")
    assert diff["hostname"].after == "mailsec01.example.com"

    backup_restore(loaded)
    assert system_info().hostname == "mailsec01.example.com"
