"""Maintenance mode survives restarts and a damaged state file never means "accept mail"."""

from __future__ import annotations

import pytest

from appliance.system import maintenance, paths
from appliance.system.errors import MalformedApplianceFile


def test_it_is_off_until_entered_and_off_again_after_leaving(appliance_root):
    assert maintenance.maintenance_status() is None

    state = maintenance.maintenance_enter("Firmware upgrade, phase 3", by="admin")

    assert maintenance.maintenance_status() == state
    assert maintenance.maintenance_leave() is True
    assert maintenance.maintenance_status() is None
    assert maintenance.maintenance_leave() is False


def test_a_damaged_state_file_is_an_error_not_normal_operation(appliance_root):
    path = paths.layout().maintenance_file
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    with pytest.raises(MalformedApplianceFile):
        maintenance.maintenance_status()
