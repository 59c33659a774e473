"""Return to 2.8.0.0 end to end (issue 18's "done when"): a real worker, the real mail service,
mail flowing the whole time.

The demo appliance is upgraded to 2.8.1.0 by the worker, receives mail (some of it quarantined,
so it is stored whole), and returns to 2.8.0.0 while mail keeps coming, some of it during the
return's online conversion (phase 2). Afterwards every message answered 250 is in the 2.8.0
store, the quarantined ones byte for byte, the firmware level is 2.8.0.0, the configuration
files are byte-equal to the ones before the upgrade, and mail is accepted again.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from appliance.config import configconvert
from appliance.mail import msgcounts, msgstore
from appliance.mail.eicar import EICAR
from appliance.system.facts import system_info
from appliance.system.maintenance import maintenance_status
from tests.support.mailload import mail_flowing
from tests.support.services import wait_for
from tests.support.smtp import (
    CLIENT_NAME,
    SmtpServiceProcess,
    read_banner,
    smtp_service,  # noqa: F401
)
from tests.upgrades.test_install import (  # noqa: F401
    INSTALL_OWN_LOG_ROWS,
    NEW_VERSION,
    OLD_VERSION,
    roomy_preflight_disk,
    wait_final,
    wait_for_checkpoint,
)
from tests.upgrades.test_return_services import cpe_files
from upgrades import install, returning
from upgrades.models import Download, InstallState, PhaseState
from upgrades.story import Stage, update_story

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def send_quarantined(port: int, marker: str) -> None:
    """One message the virus filter quarantines: stored whole in the message store."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=10) as client:
        client.sendmail(
            "anna.schmidt@partner.example.net",
            ["bob.meyer@example.com"],
            f"Subject: {marker}\r\nMessage-ID: <{marker}@partner.example.net>\r\n\r\n".encode()
            + EICAR
            + b"\r\n",
        )


def stored_raws(markers: list[str]) -> dict[str, bytes]:
    """The stored copies whose subject is one of ``markers``, by marker."""
    found: dict[str, bytes] = {}
    conn = msgstore.connect(readonly=True)
    try:
        newest = conn.execute("SELECT id FROM quarantined_message ORDER BY id DESC LIMIT 50")
        ids = [row[0] for row in newest]
    finally:
        conn.close()
    for message_id in ids:
        raw = msgstore.message_raw(message_id)
        if raw is None:
            continue
        for marker in markers:
            if f"Subject: {marker}\r\n".encode() in raw:
                found[marker] = raw
    return found


def test_return_after_an_upgrade_with_new_mail_loses_no_message(
    ready_firmware: Download,
    smtp_service: SmtpServiceProcess,  # noqa: F811
    worker_paused_at,
    admin_user,
    appliance_root: Path,
) -> None:
    # A pause in phase 2 (both ways), so mail certainly arrives during the return's conversion.
    worker_paused_at(phase=2, ms=1500)
    config_before = cpe_files(appliance_root)
    before = msgcounts.store_counts()
    markers: list[str] = []
    with mail_flowing(smtp_service.port) as load:
        upgrade = wait_final(install.install_start(user=admin_user).pk)
        assert upgrade.state == InstallState.SUCCEEDED, (upgrade.phase, upgrade.error)
        assert msgstore.format_version() == "2.8.1"
        for n in range(3):  # quarantined on 2.8.1, before the return
            markers.append(f"after-upgrade-{n}")
            send_quarantined(smtp_service.port, markers[-1])
        accepted = load.accepted
        wait_for(lambda: load.accepted >= accepted + 5, message="no mail after the upgrade")

        run = returning.return_start(user=admin_user)
        wait_for_checkpoint(run, 2, timeout=60, interval=0.05)
        accepted = load.accepted
        for n in range(3):  # quarantined while the return converts the store back
            markers.append(f"during-return-{n}")
            send_quarantined(smtp_service.port, markers[-1])
        wait_for(lambda: load.accepted >= accepted + 5, message="no mail during phase 2")
        run = wait_final(run.pk)
        assert run.state == InstallState.SUCCEEDED, (run.phase, run.error)
        accepted = load.accepted
        wait_for(lambda: load.accepted >= accepted + 5, message="no mail after the return")
    assert load.failed == [], load.failed

    assert system_info().firmware_version == OLD_VERSION
    assert msgstore.format_version() == "2.8.0" and configconvert.config_format() == "2.8.0"
    assert cpe_files(appliance_root) == config_before
    assert maintenance_status() is None
    assert [p.state for p in run.phases.order_by("number")] == [PhaseState.SUCCEEDED] * 10
    after = msgcounts.store_counts()
    # Every 250 in the SMTP log once, with the upgrade's own test messages and the return's
    # health probe, and the six quarantined messages stored whole, in the 2.8.0 format.
    own = INSTALL_OWN_LOG_ROWS + 1
    assert after.smtp_log == before.smtp_log + load.accepted + len(markers) + own
    assert after.messages == before.messages + len(markers)
    raws = stored_raws(markers)
    assert sorted(raws) == sorted(markers)
    assert all(EICAR in raw for raw in raws.values())
    assert read_banner(smtp_service.host, smtp_service.port)[:3] == b"220"
    assert update_story().stage == Stage.RETURNED
    refused_s = (len(load.refused) * load.pause) if load.refused else 0.0
    print(  # the figures of the report: the return's downtime against the install's
        f"\ndowntime: install {upgrade.downtime_seconds:.2f} s, "
        f"return {run.downtime_seconds:.2f} s; return took {run.elapsed_seconds:.1f} s; "
        f"{load.accepted} messages accepted, "
        f"{len(load.refused)} answers 421 (~{refused_s:.1f} s)"
    )
