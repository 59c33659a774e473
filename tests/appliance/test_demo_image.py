"""The demo's system backup image is made last, so it holds everything the demo wrote."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from appliance import demo
from appliance.demo import init_demo
from appliance.mail import msgstore
from appliance.system import rescue
from appliance.system.facts import appliance_exists
from appliance.system.paths import layout


def test_the_image_is_made_after_the_firmware_release_and_holds_it(
    appliance_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    create = rescue.system_backup_create

    def create_watched(root: Path | None = None, progress: rescue.Progress | None = None):
        seen.append(appliance_exists(root))
        seen.append(msgstore.totals(root))
        return create(root, progress)

    monkeypatch.setattr(demo.rescue, "system_backup_create", create_watched)
    init_demo(appliance_root, messages=5)

    marked, totals = seen
    assert marked is True  # etc/firmware-release was there to go into the image
    assert totals is not None and totals.messages == 5
    with tarfile.open(layout().system_backup_tar) as tar:
        release = tar.extractfile("etc/firmware-release").read()  # type: ignore[union-attr]
    assert release == layout().firmware_release.read_bytes()
    assert rescue.system_backup_check().firmware_version == "2.8.0.0"
