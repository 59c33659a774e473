"""The install preflight's "cluster" check: a member never runs firmware newer than its Cluster
Central (the guide: upgrade Cluster Central first, then the members).

Its own module, below cluster.services: the install's preflight reads it, and cluster.services
starts installs, so the two would otherwise import each other.
"""

from __future__ import annotations

from django.conf import settings

from appliance.firmware.bundle import version_tuple
from appliance.firmware.preflight import FAIL, PASS, Check
from cluster.models import CentralLink, JoinState

TITLE = "Cluster"


def newer(a: str, b: str) -> bool:
    """True when version a is newer than version b (unknown versions are never newer)."""
    try:
        return version_tuple(a) > version_tuple(b)
    except ValueError:
        return False


def cluster_preflight_check(bundle_version: str) -> Check:
    """Pass on a standalone node and on Central; on a member, pass only when Central's firmware
    is known and not older than ``bundle_version``."""
    role = settings.CLUSTER_ROLE
    if role == "standalone":
        return Check("cluster", TITLE, PASS, "standalone", "")
    if role == "central":
        return Check("cluster", TITLE, PASS, "Central", "")
    link = CentralLink.objects.filter(pk=1).first() or CentralLink(pk=1)
    central = link.central or settings.CLUSTER_CENTRAL
    if link.state != JoinState.JOINED or not link.central_firmware:
        return Check(
            "cluster",
            TITLE,
            FAIL,
            f"Cluster Central {central}'s firmware level is not known",
            "Join the cluster (Cluster page or manage.py cluster_join TOKEN) and wait for "
            "Cluster Central's answer.",
        )
    if newer(bundle_version, link.central_firmware):
        return Check(
            "cluster",
            TITLE,
            FAIL,
            f"Cluster Central runs {link.central_firmware}",
            "Upgrade Cluster Central first",
        )
    return Check("cluster", TITLE, PASS, f"Central runs {link.central_firmware}", "")
