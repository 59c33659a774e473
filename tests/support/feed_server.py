"""A loopback HTTP server for update feeds and firmware bundles, with faults on demand.

It serves the files of one directory on 127.0.0.1 (an ephemeral port) from a thread of the test
process, so a real Celery worker in another process downloads from it exactly as it would from
a vendor's server. What a test can make it do:

- honour ``Range: bytes=N-`` with 206 and ``If-Range`` (``ranges=True``, the default), or
  ignore Range and always send the whole file (``ranges=False``, a server without resume);
- throttle to ``rate`` bytes per second (changeable while a transfer runs);
- cut a transfer: ``cuts`` holds absolute file offsets; a response that would pass the first
  pending one sends the bytes up to it and then drops the connection, and the cut is used up;
- answer the next requests with error statuses (``fail_next = [503, 503]``);
- tell what was asked of it (``requests``: path, Range header, status, first byte sent).

Use the ``feed_server`` fixture, or ``FeedServer(directory).start()`` in a script (the
download benchmark does).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

CHUNK = 256 * 1024
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered."""

    path: str
    range: str | None
    status: int
    start: int = 0


@dataclass
class FeedServer:
    """The server, its knobs and its record of requests."""

    directory: Path
    ranges: bool = True
    rate: float | None = None  # bytes per second; None: as fast as the socket takes
    cuts: list[int] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    chunk: int = CHUNK
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def start(self) -> FeedServer:
        server = self

        class Handler(_Handler):
            feed = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll: stop() waits for the loop to see the shutdown (0.5 s by default, paid
        # by every test that serves a feed).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def take_cut(self, start: int, end: int) -> int | None:
        """The first pending cut inside (start, end), used up; None when the response is whole."""
        with self._lock:
            for cut in sorted(self.cuts):
                if start < cut < end:
                    self.cuts.remove(cut)
                    return cut
        return None

    def take_failure(self) -> int | None:
        with self._lock:
            return self.fail_next.pop(0) if self.fail_next else None

    def record(self, entry: RequestRecord) -> None:
        with self._lock:
            self.requests.append(entry)

    def downloads_of(self, name: str) -> list[RequestRecord]:
        """The answered requests for one file (not the feed), in order."""
        return [r for r in self.requests if r.path == f"/{name}"]


class _Handler(BaseHTTPRequestHandler):
    feed: FeedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read ``requests`` instead."""

    def _path(self) -> Path | None:
        name = unquote(urlsplit(self.path).path).lstrip("/")
        if not name or ".." in Path(name).parts:
            return None
        candidate = self.feed.directory / name
        return candidate if candidate.is_file() else None

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _error(self, status: int) -> None:
        self.feed.record(RequestRecord(self.path, self.headers.get("Range"), status))
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _serve(self, body: bool) -> None:
        failure = self.feed.take_failure()
        if failure:
            self._error(failure)
            return
        path = self._path()
        if path is None:
            self._error(404)
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        start, end = 0, size
        status = 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and self.feed.ranges and (if_range is None or if_range == etag):
            match = RANGE.match(wanted.strip())
            if match is None or int(match.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.feed.record(RequestRecord(self.path, wanted, 416))
                return
            start = int(match.group(1))
            if match.group(2):
                end = min(size, int(match.group(2)) + 1)
            status = 206
        self.feed.record(RequestRecord(self.path, wanted, status, start))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", self.date_time_string(int(stat.st_mtime)))
        if self.feed.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        cut = self.feed.take_cut(start, end)
        stop = cut if cut is not None else end
        self._send_range(path, start, stop)
        if cut is not None:
            # Drop the connection mid-body, as a network fault or a restarted proxy would.
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)

    def _send_range(self, path: Path, start: int, stop: int) -> None:
        began = time.monotonic()
        sent = 0
        with path.open("rb") as source:
            source.seek(start)
            remaining = stop - start
            while remaining > 0:
                rate = self.feed.rate
                if rate is None:
                    # Unthrottled: let the kernel copy (what a production web server does).
                    try:
                        done = os.sendfile(
                            self.connection.fileno(), source.fileno(), None, remaining
                        )
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if done == 0:
                        return
                    remaining -= done
                    continue
                data = source.read(min(self.feed.chunk, remaining, max(1024, int(rate / 10))))
                if not data:
                    return
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
                remaining -= len(data)
                sent += len(data)
                ahead = sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)


@pytest.fixture
def feed_server(tmp_path: Path) -> Iterator[FeedServer]:
    """A FeedServer serving tmp_path/served on 127.0.0.1; stopped after the test."""
    directory = tmp_path / "served"
    directory.mkdir()
    server = FeedServer(directory).start()
    yield server
    server.stop()
