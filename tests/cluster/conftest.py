"""Fixtures of the cluster tests: this process as Cluster Central or as a member, a member's
report as it arrives on Central (the same dictionaries cluster.member_services.member_report_build
makes), and messages sealed as the other node would seal them (cluster.signing.seal with the
key the two nodes share), for the receive services."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.system.facts import read_firmware_release, write_firmware_release
from cluster import member_services, plumbing, services, signing
from cluster.models import CentralLink, ClusterMember


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
            node=node,
            token_hash=signing.token_hash(token),
            info={"hostname": "mx", "firmware": firmware},
        )

    return join


def sent_message(sent: list[Any], kind: str, *, sender: str, recipient: str) -> dict[str, Any]:
    """The one cluster message among the callbacks a test captured on commit: task
    ``cluster.tasks.<kind>`` on the recipient's queue, its envelope naming kind, sender and
    recipient."""
    out = [c for c in sent if isinstance(c, plumbing.Outgoing)]
    assert [(c.task, c.queue) for c in out] == [(f"cluster.tasks.{kind}", f"lmi.node.{recipient}")]
    (message,) = out[0].args
    assert (message["kind"], message["from"], message["to"]) == (kind, sender, recipient)
    return message


# --- messages as the other node seals them ----------------------------------------------------


def from_member(
    secret: str, kind: str, body: dict[str, Any], *, node: str = "member1", **kwargs: Any
) -> dict[str, Any]:
    """A message from member ``node`` to Central, sealed with the member's key."""
    return signing.seal(
        signing.member_key(secret), kind=kind, sender=node, recipient="central", body=body,
        **kwargs,
    )  # fmt: skip


def report_message(
    node: str, secret: str, data: dict[str, Any] | None = None, events: Any = None, **kwargs: Any
) -> dict[str, Any]:
    body = {"report": data if data is not None else report(), "events": events or []}
    return from_member(secret, "member_report", body, node=node, **kwargs)


def receive_report(
    node: str, secret: str, data: dict[str, Any] | None = None, events: Any = None
) -> ClusterMember | None:
    """Central receives a report from ``node`` signed with ``secret``'s key."""
    return services.member_report_receive(message=report_message(node, secret, data, events))


def from_central(
    secret: str, kind: str, body: dict[str, Any], *, central: str = "central",
    node: str = "member1", **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """A message from Cluster Central to member ``node``, sealed with the member's key."""
    return signing.seal(
        signing.member_key(secret), kind=kind, sender=central, recipient=node, body=body,
        **kwargs,
    )  # fmt: skip


def join_request(token: str, *, node: str = "member1", info: dict | None = None, **kwargs) -> dict:
    """A join request as a member makes it with ``token`` (cluster_join_request)."""
    body = {"token": signing.token_hash(token), "info": info or {}}
    return signing.seal(signing.join_key(token), kind="member_join", sender=node,
                        recipient="central", body=body, **kwargs)  # fmt: skip


def join_answer(
    token: str, *, accepted: bool = True, secret: str = "s3cret", message: str = "",
    firmware: str = "2.8.0.0", central: str = "central", node: str = "member1", **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """Central's answer to a join request made with ``token`` (the secret encrypted)."""
    key = signing.join_key(token)
    body = {
        "accepted": accepted,
        "message": message,
        "secret": signing.secret_encrypt(key, secret) if accepted else "",
        "firmware": firmware,
    }
    return signing.seal(key, kind="join_answer", sender=central, recipient=node, body=body,
                        **kwargs)  # fmt: skip


def member_joins(
    token: str = "t" * 32, *, secret: str = "s3cret", firmware: str = "2.8.0.0"
) -> CentralLink | None:
    """On a member: ask to join with ``token`` and receive Central's acceptance."""
    member_services.cluster_join_request(token=token, user="admin")
    return member_services.join_answer_receive(
        message=join_answer(token, secret=secret, firmware=firmware)
    )
