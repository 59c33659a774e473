"""Fetching feeds and bundles with the standard library: http(s) URLs and local files alike.

Downloads go through :func:`open_source`, which starts a transfer at a byte offset: for HTTP a
``Range: bytes=N-`` request guarded by ``If-Range`` (the server's ETag or Last-Modified from the
first transfer), so a server whose file changed, or that ignores Range, answers with the whole
file and the caller starts over. A local path (a feed in a directory) is read the same way, so
both go through one download loop with the same progress and verification.

Errors are sorted in two: :class:`TransientError` (connection reset or refused, timeout, 5xx,
408, 429, a body cut short), which the download retries with backoff, and
:class:`FetchError` for everything else (404, a malformed URL, a redirect loop).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urljoin, urlsplit

USER_AGENT = "LMI-update-control/1"
# Seconds without a byte before a connection or read counts as timed out (then retried).
TIMEOUT = 10.0
MAX_REDIRECTS = 5
# A feed is a small JSON document; anything larger is refused unread.
MAX_FEED_BYTES = 1024 * 1024
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class FetchError(Exception):
    """A fetch that retrying will not cure; the message says what and where."""


class TransientError(FetchError):
    """A fetch that may work if tried again: the network or the server hiccuped."""


# The low-level errors that mean "try again": resets, refusals, timeouts, cut bodies.
TRANSIENT_OS_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # reset, refused, aborted, broken pipe; RemoteDisconnected
    TimeoutError,  # socket.timeout
    http.client.IncompleteRead,
    ssl.SSLEOFError,  # a TLS connection cut mid-transfer
)


def is_http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def describe(exc: BaseException) -> str:
    """A short name for a low-level error, for events and retry messages."""
    if isinstance(exc, FetchError):
        return str(exc)
    if isinstance(exc, ConnectionResetError | http.client.RemoteDisconnected):
        return "the connection was reset"
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, TimeoutError):
        return f"no data for {TIMEOUT:.0f} s (timeout)"
    if isinstance(exc, http.client.IncompleteRead | ssl.SSLEOFError):
        return "the transfer was cut short"
    return f"{type(exc).__name__}: {exc}"


class Reader(Protocol):
    def read1(self, size: int = ..., /) -> bytes: ...


@dataclass
class Source:
    """An open transfer: the body from ``offset`` on (``length`` bytes when known)."""

    url: str
    body: Reader | BinaryIO
    offset: int
    length: int | None
    total: int | None
    etag: str = ""
    last_modified: str = ""
    _closer: object = None

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes as soon as any are there; b"" at the end of the body."""
        return self.body.read1(size)  # type: ignore[union-attr]

    def close(self) -> None:
        closer = self._closer
        if closer is not None:
            closer.close()  # type: ignore[attr-defined]


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"not an http(s) URL: {url}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if parts.scheme == "https":
        return (
            http.client.HTTPSConnection(
                parts.hostname,
                parts.port,
                timeout=TIMEOUT,
                context=ssl.create_default_context(),
            ),
            path,
        )
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT), path


def _request(url: str, headers: dict[str, str]) -> tuple[str, http.client.HTTPResponse, object]:
    """GET, following redirects; returns the final URL, the response and its connection."""
    for _ in range(MAX_REDIRECTS + 1):
        connection, path = _connection(url)
        try:
            connection.request("GET", path, headers={"User-Agent": USER_AGENT, **headers})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if isinstance(exc, TRANSIENT_OS_ERRORS):
                raise TransientError(f"{describe(exc)} ({url})") from exc
            if isinstance(exc, socket.gaierror):
                raise TransientError(f"the host name cannot be resolved ({url})") from exc
            raise FetchError(f"{describe(exc)} ({url})") from exc
        if response.status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            response.close()
            connection.close()
            if not location:
                raise FetchError(f"redirect without a Location from {url}")
            url = urljoin(url, location)
            continue
        return url, response, connection
    raise FetchError(f"more than {MAX_REDIRECTS} redirects from {url}")


def _check_status(url: str, response: http.client.HTTPResponse) -> None:
    if response.status in (200, 206):
        return
    reason = f"the server answered {response.status} {response.reason} for {url}"
    response.close()
    if response.status in TRANSIENT_STATUSES:
        raise TransientError(reason)
    raise FetchError(reason)


def fetch_bytes(url: str, limit: int = MAX_FEED_BYTES) -> bytes:
    """The whole (small) document at an http(s) URL or local path, refused above ``limit``."""
    if not is_http(url):
        path = Path(url)
        try:
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError as exc:
            raise FetchError(f"no such file: {path}") from exc
        except OSError as exc:
            raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    else:
        final_url, response, connection = _request(url, {"Accept-Encoding": "identity"})
        try:
            _check_status(final_url, response)
            try:
                data = response.read(limit + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{describe(exc)} ({final_url})") from exc
        finally:
            response.close()
            connection.close()  # type: ignore[attr-defined]
    if len(data) > limit:
        raise FetchError(f"{url} is larger than {limit} bytes")
    return data


def open_source(
    url: str,
    offset: int = 0,
    *,
    validator: str = "",
    auth: Callable[[], dict[str, str]] | None = None,
) -> Source:
    """Start a transfer at ``offset``; the returned Source's offset may be 0 (start over).

    ``validator`` is the ETag (or Last-Modified) the first transfer saw: the server resumes only
    if the file is still that one. ``auth`` gives the headers that authenticate one request
    (a cluster member's signed request to Central, cluster.bundles): called for each request,
    since a signed request is good once.
    """
    if not is_http(url):
        return _open_file(Path(url), offset)
    headers = {"Accept-Encoding": "identity", **(auth() if auth is not None else {})}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    final_url, response, connection = _request(url, headers)
    if response.status == 416 and offset > 0:
        # The part file is not a prefix the server can continue: start over from byte 0.
        response.close()
        connection.close()  # type: ignore[attr-defined]
        return open_source(url, 0, auth=auth)
    _check_status(final_url, response)
    length_header = response.getheader("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    start, total = 0, length
    if response.status == 206:
        match = CONTENT_RANGE.match(response.getheader("Content-Range") or "")
        if match is None or int(match.group(1)) != offset:
            response.close()
            connection.close()  # type: ignore[attr-defined]
            raise FetchError(f"the server sent a range other than the one asked for ({url})")
        start = offset
        total = int(match.group(3)) if match.group(3) != "*" else None
    return Source(
        url=final_url,
        body=response,
        offset=start,
        length=length,
        total=total,
        etag=response.getheader("ETag") or "",
        last_modified=response.getheader("Last-Modified") or "",
        _closer=connection,
    )


def _open_file(path: Path, offset: int) -> Source:
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise FetchError(f"no such file: {path}") from exc
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    size = path.stat().st_size
    start = offset if 0 < offset <= size else 0
    handle.seek(start)
    return Source(
        url=str(path),
        body=handle,
        offset=start,
        length=size - start,
        total=size,
        _closer=handle,
    )
