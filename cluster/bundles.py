"""Central serves the firmware bundle it verified; its members fetch it from there.

In a cluster Central downloads a bundle from the feed and verifies it once (upgrades.downloader);
each member's own download then takes the bytes from Central's console instead of the feed
(``LMI_CLUSTER_CENTRAL_URL``), over the same loop: Range resumes, progress, and every check of a
feed download (the feed's SHA-256, the vendor's signature, the payload digest, every path).
Central is trusted for nothing but bytes: a bundle it serves tampered is refused by the member
exactly as a tampered feed download is.

A request proves its member the way every cluster message does (``cluster.signing``): a sealed
envelope (kind ``bundle_fetch``, addressed to Central, naming the bundle) signed with the
member's key, in the ``X-LMI-Cluster-Request`` header. Central opens it like any message from a
member (its nonce recorded, so a captured header is good once, and a refusal is an event), so
there is no second scheme of credentials. Every request (every resume) is sealed anew.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.conf import settings

from appliance.firmware import spool
from cluster import signing
from cluster.models import CentralLink, JoinState
from cluster.plumbing import (
    CENTRAL,
    MEMBER,
    cluster_role,
    member_key,
    open_sealed,
)
from events.models import Category, Severity
from events.services import event_write
from upgrades import http

KIND = "bundle_fetch"
HEADER = "X-LMI-Cluster-Request"
META_HEADER = "HTTP_X_LMI_CLUSTER_REQUEST"
MAX_HEADER = 4096  # a sealed bundle request is about 400 characters
SHA256_RE = re.compile(r"[0-9a-f]{64}")
WAIT_SECONDS = 1.0  # how often a member looks at a download another executor holds


def bundle_url(base: str, version: str, sha256: str) -> str:
    """Where Central serves the bundle ``version``/``sha256`` (cluster.urls ``bundle``)."""
    return (
        f"{base.rstrip('/')}/cluster/bundles/{quote(version, safe='')}/"
        f"{quote(sha256.lower(), safe='')}/"
    )


def request_header(
    key: str, *, sender: str, recipient: str, version: str, sha256: str
) -> dict[str, str]:
    """The header of one bundle request: a sealed message naming the bundle, base64url-encoded
    (an envelope is JSON, which a header cannot carry as it is)."""
    message = signing.seal(
        key,
        kind=KIND,
        sender=sender,
        recipient=recipient,
        body={"version": version, "sha256": sha256.lower()},
    )
    encoded = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()
    return {HEADER: base64.urlsafe_b64encode(encoded).decode("ascii")}


def _decoded(value: str) -> Any:
    """The envelope in a request header, or None (then refused as not a signed message)."""
    try:
        return json.loads(base64.urlsafe_b64decode(value.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError):
        return None


# --- Central: serving a member -------------------------------------------------------------


class FetchRefused(Exception):
    """A bundle request Central does not serve; ``status`` is the HTTP answer, the text the
    reason (never a key or a secret)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class ServedBundle:
    """A verified bundle Central may send to the member that asked for it."""

    path: Path
    version: str
    sha256: str
    size: int
    member: str


def bundle_for_member(*, header: str, version: str, sha256: str, origin: str = "") -> ServedBundle:
    """Central: the bundle a member's signed request asks for, or FetchRefused.

    401 without a signed request; 403 when it is not from a member (forged, altered, replayed,
    stale, or for another bundle than the URL's: the refusal is a WARNING event, as for any
    message); 404 when this node is not Central or has no verified copy of that very bundle
    (its download is not ready, or its file left the spool).
    """
    from upgrades.selectors import ready_bundle_of

    if cluster_role() != CENTRAL:
        raise FetchRefused(404, "This node is not Cluster Central.")
    if not header:
        raise FetchRefused(401, f"A bundle is served only to members (a signed {HEADER}).")
    message = _decoded(header) if len(header) <= MAX_HEADER else None
    opened = open_sealed(message, kind=KIND, key=member_key, origin=origin)
    if opened is None:
        raise FetchRefused(403, "The request is not signed by a member of this cluster.")
    if opened.body.get("version") != version or opened.body.get("sha256") != sha256:
        raise FetchRefused(403, "The signed request names another bundle than the URL.")
    download = ready_bundle_of(version, sha256) if SHA256_RE.fullmatch(sha256) else None
    if download is None:
        raise FetchRefused(
            404, f"Cluster Central has no verified bundle of firmware {version[:32]} to serve."
        )
    path = spool.bundle_path(spool.bundle_id(download.version, download.sha256))
    return ServedBundle(
        path=path,
        version=download.version,
        sha256=download.sha256.lower(),
        size=download.size,
        member=opened.sender,
    )


def served_event(bundle: ServedBundle, offset: int) -> None:
    """Central: one event per member fetch (a resume says where it went on)."""
    where = f" from byte {offset}" if offset else ""
    event_write(
        category=Category.CLUSTER,
        message=f"Sending firmware {bundle.version} to {bundle.member}{where}",
        details={
            "node": bundle.member,
            "version": bundle.version,
            "sha256": bundle.sha256,
            "offset": offset,
            "size": bundle.size,
        },
    )


# --- A member: fetching from Central ---------------------------------------------------------


class CentralSource:
    """One download run's way to Cluster Central's copy of its bundle (a member's).

    ``open`` starts a transfer from Central, or returns None once Central cannot serve it (no
    verified copy there, refused, unreachable): the downloader then takes the feed's URL for
    the rest of its run, as a standalone console does. Once Central has sent bytes a failure is
    the downloader's to retry (a cut, a restart of Central's console).
    """

    def __init__(
        self, *, base: str, key: str, node: str, central: str, version: str, sha256: str
    ) -> None:
        self.url = bundle_url(base, version, sha256)
        self.key = key
        self.node = node
        self.central = central
        self.version = version
        self.sha256 = sha256.lower()
        self.declined = False
        self.served = False

    @classmethod
    def for_bundle(cls, version: str, sha256: str) -> CentralSource | None:
        """The source of a member joined to a Central whose console address it knows; None
        on Central, a standalone console, or a member not (or no longer) joined."""
        if cluster_role() != MEMBER or not settings.CLUSTER_CENTRAL_URL:
            return None
        link = CentralLink.objects.filter(pk=1).first()
        if link is None or link.state != JoinState.JOINED or not link.secret:
            return None
        return cls(
            base=settings.CLUSTER_CENTRAL_URL,
            key=signing.member_key(link.secret),
            node=settings.NODE_NAME,
            central=link.central,
            version=version,
            sha256=sha256,
        )

    def auth(self) -> dict[str, str]:
        """The headers of one request (sealed afresh: Central accepts each nonce once)."""
        return request_header(
            self.key,
            sender=self.node,
            recipient=self.central,
            version=self.version,
            sha256=self.sha256,
        )

    def open(self, offset: int, validator: str = "") -> http.Source | None:
        """A transfer from Central at ``offset``, or None: take the feed's URL instead."""
        if self.declined:
            return None
        try:
            source = http.open_source(self.url, offset, validator=validator, auth=self.auth)
        except http.FetchError as exc:
            if self.served:
                raise
            self.declined = True
            event_write(
                category=Category.UPDATE,
                severity=Severity.WARNING,
                message=f"Cluster Central {self.central} does not serve firmware "
                f"{self.version} ({exc}): downloading it from the update feed",
                details={"version": self.version, "central": self.central, "reason": str(exc)},
            )
            return None
        if not self.served:
            self.served = True
            event_write(
                category=Category.UPDATE,
                message=f"Downloading firmware {self.version} from Cluster Central "
                f"{self.central}" + (f" from byte {source.offset}" if source.offset else ""),
                details={"version": self.version, "central": self.central, "url": self.url},
            )
        return source


def member_bundle_fetch(version: str, *, user: str) -> tuple[Any, str]:
    """A member asked to install ``version`` with no bundle of it ready: download it now, in
    this process, through the downloader (which takes the bytes from Central); (the ready
    download, "") or (None, why not).

    The member learns what the bundle is (size, SHA-256) from its own feed, checked once more
    if it lists no such version yet; only the bytes come from Central. A download of that
    version already running (Central asked again while an earlier request still fetched) is
    waited for, or taken over when its executor is gone, never started twice.
    """
    from upgrades import downloader
    from upgrades import services as updates
    from upgrades.models import CheckTrigger, DownloadState, DownloadTrigger
    from upgrades.selectors import active_download, listed_offers

    download = active_download()
    if download is None or download.version != version:
        if not any(view.offer.version == version for view in listed_offers()):
            updates.update_check(trigger=CheckTrigger.SCHEDULE, user=user)
        try:
            download = updates.download_start(
                user=user, trigger=DownloadTrigger.USER, version=version, enqueue=False
            )
        except updates.UpdateError as exc:
            return None, f"cannot download {version} on {settings.NODE_NAME}: {exc}"
    while True:
        downloader.download_execute(download.pk, user=user)
        download.refresh_from_db()
        if not download.is_active:
            break
        time.sleep(WAIT_SECONDS)  # another executor holds it: its lease says it is alive
    if download.state != DownloadState.READY:
        state = DownloadState(download.state).label.lower()
        return None, f"the download of {version} on {settings.NODE_NAME} {state}: {download.error}"
    return download, ""
