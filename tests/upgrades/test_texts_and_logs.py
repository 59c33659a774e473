"""The release notes and the Policy Objects page tell this console's upgrade, with the
preflight's figures; firmware logs open from their listing, and only listed logs open."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import pytest

from appliance.firmware import demo_feed, preflight, updatelogs
from appliance.firmware.bundle import verify_bundle
from appliance.firmware.feed import parse_feed
from appliance.system.paths import layout
from tests.upgrades import bundles
from upgrades import services

pytestmark = pytest.mark.django_db

PAGE = "/updates/licensing/"
OLD_STORY = (
    "not migrated",
    "is deleted",
    "20 minutes",
    "grep",
    "JChGSUxFL",
    "back them up",
    "half speed",
    "50%",
)


def _said(text: str) -> str:
    return " ".join(text.split()).lower()


def test_the_demo_release_notes_tell_what_this_upgrade_does():
    notes = _said(demo_feed.NOTES_281)

    for phrase in OLD_STORY:
        assert phrase.lower() not in notes, phrase
    assert "files read by $(file) policy objects are carried over" in notes
    assert "stays restorable until the upgrade commits" in notes
    assert "the checklist estimates that time" in notes


def test_changed_notes_are_rebuilt_into_a_bundle_signed_again(
    demo_appliance: Path, tmp_path: Path, settings, monkeypatch
):
    var = tmp_path / "var"
    settings.TRUSTED_KEYS = []
    settings.TRUSTED_KEYS_DIR = var / "trusted-keys"
    settings.UPDATE_FEED_URL = str(var / "update-feed")
    old = dataclasses.replace(demo_feed.RELEASES[0], release_notes="The rescue image is deleted.")
    monkeypatch.setattr(demo_feed, "RELEASES", (old, *demo_feed.RELEASES[1:]))
    init = demo_feed.init_demo_updates
    init(var, demo_appliance, out=io.StringIO())
    monkeypatch.undo()  # the notes this code ships

    assert "bundle 2.8.1.0" in demo_feed.demo_updates_missing(var, demo_appliance)
    init(var, demo_appliance, out=io.StringIO())

    feed_dir = var / "update-feed"
    entry = parse_feed((feed_dir / "feed.json").read_bytes(), str(feed_dir))[0]
    assert entry.version == "2.8.1.0" and entry.release_notes == demo_feed.NOTES_281
    assert verify_bundle(Path(entry.url)).release_notes == demo_feed.NOTES_281
    assert demo_feed.demo_updates_missing(var, demo_appliance) == []


def test_the_updates_page_shows_the_notes_with_this_appliances_preflight_figures(
    admin_client, firmware, demo_appliance
):
    path = firmware.build("2.8.1.0", payload_bytes=4096)
    bundles.write_feed(firmware.directory, (path, "2.8.1.0", "2.8.0.0"), notes=demo_feed.NOTES_281)
    assert services.update_check(trigger="user", user="admin").ok

    html = admin_client.get(PAGE).content.decode()

    checks = {check.key: check for check in preflight.preflight_checks(None, "2.8.0.0")}
    downtime = checks["downtime"].value.removeprefix("about ")
    assert f'data-testid="downtime-estimate">{downtime}<' in html
    objects = checks["file-macros"].value.split()[0]
    assert f'data-testid="file-objects">{objects}<' in html
    assert 'data-testid="files-found">' in html
    assert "carried over" in html


def test_the_policy_objects_page_says_the_upgrade_carries_the_files_over(
    admin_client, demo_appliance
):
    html = _said(admin_client.get("/mail-security/policy-objects/").content.decode())

    assert "the firmware upgrade carries these files over" in html
    assert "nothing to back up by hand" in html
    for phrase in ("does not keep", "grep", "jchgsuxfl", "copy it back"):
        assert phrase not in html


@pytest.fixture
def logs(demo_appliance: Path) -> Path:
    updatelogs.log_append("install-1.log", "phase 1: download verified")
    updatelogs.log_append("install-1.log", "phase 10: <committed> & done")
    xpu = layout().xpu_dir
    (demo_appliance / "secret.txt").write_text("not a log")
    os.symlink(demo_appliance / "secret.txt", xpu / "link.log")
    return xpu


def test_log_names_link_to_the_log_for_administrators_and_read_only_users(
    admin_client, readonly_client, logs
):
    listing = admin_client.get(PAGE).content.decode()
    url = "/updates/licensing/logs/install-1.log/"
    assert f'<a href="{url}" data-testid="update-log-link">install-1.log</a>' in listing

    for client in (admin_client, readonly_client):
        response = client.get(url)
        assert response.status_code == 200
        page = response.content.decode()
        assert "phase 1: download verified" in page
        assert "phase 10: &lt;committed&gt; &amp; done" in page


@pytest.mark.parametrize(
    "name",
    ["link.log", "..", "secret.txt", "install-1.log.bak", "%2e%2e%2fsecret.txt", ".install-1.log"],
)
def test_a_name_that_is_not_a_listed_log_is_404(admin_client, logs, name):
    assert admin_client.get(f"/updates/licensing/logs/{name}/").status_code == 404
