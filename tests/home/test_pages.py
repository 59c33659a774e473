"""Home, Home > System and Home > Resources show the appliance and this machine's real figures."""

from __future__ import annotations

import psutil
import pytest

from appliance.system import paths

pytestmark = pytest.mark.django_db


def test_home_shows_the_firmware_level_and_the_message_store(admin_client, demo_appliance):
    page = admin_client.get("/home/").content.decode()

    assert 'data-testid="firmware-version">2.8.0.0<' in page
    assert 'data-testid="store-messages">200<' in page
    assert "Processing graphs" in page


def test_home_says_how_to_create_a_missing_appliance(admin_client):
    page = admin_client.get("/home/").content.decode()

    assert "init_appliance" in page


def test_system_shows_firmware_os_hostname_and_network_mode_per_interface(
    admin_client, demo_appliance
):
    page = admin_client.get("/home/system/").content.decode()

    assert "SUSE Linux Enterprise Server 10" in page
    assert 'data-testid="hostname">' in page
    assert "eth0" in page and "DHCP" in page
    assert "eth1" in page and "Static" in page


def test_resources_reports_the_real_free_space_of_both_upgrade_disks(admin_client, demo_appliance):
    response = admin_client.get("/home/resources/")
    disks = response.context["disks"]

    assert [disk.role for disk in disks] == ["Console database", "Message store"]
    store = disks[1]
    measured = psutil.disk_usage(str(paths.layout().msgstore_dir))
    assert store.total == measured.total
    assert abs(store.free - measured.free) < 256 * 1024 * 1024  # the disk is live
    assert store.meets_upgrade_requirement == (store.free_percent >= 50)


def test_resources_marks_a_disk_below_half_free_as_failing_with_reclaim_links(
    admin_client, demo_appliance, monkeypatch
):
    real = psutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=usage.total // 5, used=usage.total - usage.total // 5)

    monkeypatch.setattr(psutil, "disk_usage", nearly_full)
    page = admin_client.get("/home/resources/").content.decode()

    assert "Fail" in page
    assert "SMTP &gt; Configuration &gt; Maintenance" in page
    assert "Mail Security &gt; Policy Objects &gt; Message Stores" in page


def test_the_resources_partial_refreshes_alone(admin_client, demo_appliance):
    response = admin_client.get("/home/resources/partial/")

    assert response.status_code == 200
    assert b"<html" not in response.content
    assert b'data-testid="disks"' in response.content


def test_healthz_needs_no_login_and_says_only_up_or_down(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there

    response = client.get("/healthz")

    assert response.status_code == 503
    assert response.json() == {
        "status": "degraded", "database": "up", "redis": "down", "worker": "down"
    }  # fmt: skip


def test_home_explains_a_damaged_message_store_instead_of_failing(admin_client, demo_appliance):
    paths.layout().msgstore_db.write_bytes(b"this is not a database" * 100)

    response = admin_client.get("/home/")

    assert response.status_code == 200
    assert "message store" in response.context["appliance_error"]
