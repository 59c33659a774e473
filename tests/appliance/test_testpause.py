"""The kill tests' checkpoints (JOB_PAUSE): one entry or several, anything else returns at once."""

from __future__ import annotations

import time

import pytest

from appliance.system.testpause import pause_for_tests


@pytest.mark.parametrize(
    ("configured", "kind", "step", "pauses"),
    [
        ("", "install_rollback", "store", False),
        ("install_rollback:store:40", "install_rollback", "store", True),
        ("install_rollback:store:40", "install_rollback", "config", False),
        ("system_backup:tar-started:40", "install_rollback", "tar-started", False),
        ("config_restore:1:40, system_backup:tar-started:40", "system_backup", "tar-started", True),
        ("config_restore:1:40,system_backup:tar-started:40", "config_restore", 1, True),
    ],
)
def test_a_pause_is_taken_only_where_an_entry_names_the_kind_and_step(
    settings, configured: str, kind: str, step: int | str, pauses: bool
) -> None:
    settings.JOB_PAUSE = configured
    started = time.monotonic()
    pause_for_tests(kind, step)
    assert (time.monotonic() - started >= 0.04) is pauses
