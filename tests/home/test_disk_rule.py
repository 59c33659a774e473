"""Every text about the free-space rule states the rule in force, and a failing disk comes with
advice whose figures add up: what must go, what each lever frees, and what else to do."""

from __future__ import annotations

import os
from collections import namedtuple
from datetime import UTC, datetime
from html import unescape

import psutil
import pytest
from django.template.defaultfilters import filesizeformat

from appliance.system import paths
from home import selectors
from mailsecurity import selectors as mail_selectors

pytestmark = pytest.mark.django_db

GB = 1024**3
Usage = namedtuple("Usage", "total used free percent")
HOST = selectors.HostFigures(
    memory_total=8 * GB,
    memory_used=GB,
    memory_available=7 * GB,
    memory_percent=12.5,
    swap_total=0,
    swap_used=0,
    cpu_count=2,
    cpu_percent=7.0,
    load_1=0.1,
    load_5=0.1,
    load_15=0.1,
    boot_time=datetime(2026, 1, 1, tzinfo=UTC),
    uptime_seconds=60,
)


@pytest.fixture
def disk(monkeypatch, settings):
    """Every disk reads as ``total`` bytes with ``free`` free; the host's own figures are fixed
    so that no "50%" of memory or CPU can stand in for the rule."""
    settings.UPGRADE_MIN_FREE_PERCENT = 20
    monkeypatch.setattr(selectors, "host_figures", lambda: HOST)
    figures = {"total": 100 * GB, "free": 29 * GB}

    def usage(path: str) -> Usage:
        total, free = figures["total"], figures["free"]
        return Usage(total, total - free, free, 100.0 * (total - free) / total)

    monkeypatch.setattr(psutil, "disk_usage", usage)
    return figures


def _page(client, url: str) -> str:
    return unescape(client.get(url).content.decode())


def test_home_and_resources_state_the_rule_in_force_not_the_guides_50(
    admin_client, demo_appliance, disk
):
    home = _page(admin_client, "/home/")
    resources = _page(admin_client, "/home/resources/")

    assert "meets 20%" in home
    assert "at least 20% free" in resources
    for page in (home, resources):
        assert "50%" not in page and "50 %" not in page


def test_a_failing_disk_says_how_much_must_go_and_each_lever_adds_up(
    admin_client, demo_appliance, disk
):
    disk["free"] = 15 * GB  # below 20% of 100 GB: 5 GB to free

    response = admin_client.get("/home/resources/")
    page = unescape(response.content.decode())

    store_disk = response.context["disks"][1]
    advice = store_disk.advice
    assert advice.needed == 20 * GB - 15 * GB
    assert advice.levers_total == sum(lever.bytes for lever in advice.levers)
    assert advice.free_after == advice.free + advice.levers_total
    # Each retention lever is what the planner frees with that retention at one day.
    plan_sources = {s.key: s for s in mail_selectors.reclaim_view().sources}
    retention = [lever for lever in advice.levers if lever.key in plan_sources]
    assert {lever.key for lever in retention} == set(plan_sources)
    for lever in retention:
        assert lever.bytes == plan_sources[lever.key].freed_at(1)
    assert filesizeformat(advice.needed) in page
    assert filesizeformat(advice.levers_total) in page
    assert "bring the disk to 20% free" in page  # the reclaim planner's link
    assert "50%" not in page


def test_when_all_levers_are_not_enough_the_pages_say_so_and_what_else_to_do(
    admin_client, demo_appliance, disk
):
    disk["free"] = 1 * GB  # 19 GB short: far more than a 200-message demo store holds

    home = _page(admin_client, "/home/")
    resources = _page(admin_client, "/home/resources/")
    notice = _page(admin_client, "/mail-security/policy-objects/message-stores/")
    reclaim = _page(admin_client, "/mail-security/reclaim/")

    assert "not enough" in home and "below 20%" in home
    for page in (resources, notice, reclaim):
        assert "Not enough" in page
        assert "Move the message store to a bigger disk" in page
        assert "LMI_UPGRADE_MIN_FREE_PERCENT" in page
        assert "50%" not in page
    advice = selectors.upgrade_disks()[1].advice
    assert not advice.enough
    assert advice.still_short == advice.needed - advice.levers_total
    assert filesizeformat(advice.still_short) in resources


def test_the_reserved_blocks_explain_why_used_plus_free_is_not_the_size(
    admin_client, demo_appliance, monkeypatch, settings
):
    settings.UPGRADE_MIN_FREE_PERCENT = 20
    monkeypatch.setattr(selectors, "host_figures", lambda: HOST)
    block = 4096
    blocks, bfree, bavail = 1_000_000, 150_000, 100_000  # 5% reserved for root
    fake = os.statvfs_result((block, block, blocks, bfree, bavail, 0, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: fake)
    monkeypatch.setattr(
        psutil,
        "disk_usage",
        lambda path: Usage(blocks * block, (blocks - bfree) * block, bavail * block, 0.0),
    )

    response = admin_client.get("/home/resources/")
    page = unescape(response.content.decode())

    store_disk = response.context["disks"][1]
    reserved = (bfree - bavail) * block
    assert selectors.reserved_for_root(fake) == reserved
    assert store_disk.reserved == reserved
    assert store_disk.used + store_disk.free + store_disk.reserved == store_disk.total
    assert 'data-testid="reserved"' in page
    assert f"The other {filesizeformat(reserved)} (5.0%) are blocks the file system reserves" in (
        page.replace('<strong data-testid="reserved-bytes">', "").replace("</strong>", "")
    )


def test_the_rule_is_read_when_asked_not_when_the_module_was_imported(settings, demo_appliance):
    settings.UPGRADE_MIN_FREE_PERCENT = 20
    disk = selectors.disk_usage("Message store", paths.layout().msgstore_dir)

    assert disk.required_percent == 20.0
    assert selectors.UPGRADE_FREE_PERCENT == 20.0
