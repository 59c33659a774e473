"""Fixtures of the cluster tests: this process as Cluster Central or as a member, and a member's
report as it arrives on Central (the same dictionaries cluster.services.member_report_build
makes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.system import read_firmware_release, write_firmware_release
from cluster import services
from cluster.models import ClusterMember


def set_firmware(version: str) -> None:
    """Change this node's firmware level, as an install's phase 6 does."""
    release = read_firmware_release()
    release["FIRMWARE_VERSION"] = version
    write_firmware_release(release)


@pytest.fixture
def central(settings, demo_appliance: Path, db) -> str:
    settings.CLUSTER_ROLE = "central"
    settings.NODE_NAME = "central"
    return "central"


@pytest.fixture
def member_role(settings, demo_appliance: Path, db) -> str:
    settings.CLUSTER_ROLE = "member"
    settings.NODE_NAME = "member1"
    settings.CLUSTER_CENTRAL = "central"
    return "member1"


def report(
    firmware: str = "2.8.0.0",
    *,
    healthy: bool = True,
    install: dict[str, Any] | None = None,
    answer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "firmware": firmware,
        "hostname": "mx2.example.com",
        "health": {"appliance": True, "smtp": healthy, "accepting_mail": True, "healthy": healthy},
        "install": install or {},
    }
    if answer is not None:
        data["cluster_upgrade"] = answer
    return data


@pytest.fixture
def joined(central: str) -> Callable[[str], tuple[ClusterMember, str]]:
    """Join a member through a real token; returns the member and its report secret."""

    def join(node: str = "member1", firmware: str = "2.8.0.0") -> tuple[ClusterMember, str]:
        _row, token = services.join_token_create(user="admin")
        return services.member_join(
            node=node, token=token, info={"hostname": "mx", "firmware": firmware}
        )

    return join
