"""DATA read in one piece (smtp.server.MailSMTP.smtp_DATA) gives what aiosmtpd's reader gives.

The same bytes go, over raw sockets and in the same chunks, to the service and to a bare
aiosmtpd server: the replies must be the same, and so must the message (the service's copy is
in its spool or sink, below its envelope and its own Received header).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from appliance.system.paths import layout
from smtp.server import MailService
from smtp.spool import parse_spool_file
from tests.smtp.test_accept_group_fsync import service  # noqa: F401
from tests.support.services import wait_for
from tests.support.smtp import free_port

HEADERS = (
    b"From: colleague@elsewhere.test\r\nTo: user@example.com\r\n"
    b"Date: Tue, 01 Oct 2013 12:00:00 +0000\r\nMessage-ID: <bulk.1@elsewhere.test>\r\n"
    b"Subject: status\r\n\r\n"
)


class Capture:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.contents.append(envelope.original_content or b"")
        return "250 2.0.0 Ok: queued as BARE"


@pytest.fixture
def bare() -> Iterator[tuple[int, Capture]]:
    capture = Capture()
    controller = Controller(capture, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, capture
    controller.stop()


def converse(port: int, chunks: list[bytes], replies: int = 1) -> list[bytes]:
    """The envelope, then DATA sent in ``chunks``; the reply lines after the 354."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # banner
        sock.sendall(b"HELO client.test\r\n")
        reader.readline()
        for command in (b"MAIL FROM:<colleague@elsewhere.test>", b"RCPT TO:<user@example.com>"):
            sock.sendall(command + b"\r\n")
            assert reader.readline().startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert reader.readline().startswith(b"354")
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.02)  # separate reads on the server's side
        return [reader.readline() for _ in range(replies)]


def stored(root: Path, reply: bytes) -> bytes:
    """The message the service kept for the 250 ``reply``, without its Received header."""
    queue_id = reply.decode().split()[-1]

    def read() -> bytes | None:
        # Delivery may move the file from the spool to the sink between the look and the read.
        for directory in (layout(root).mail_spool_dir, layout(root).mail_sink_dir):
            if directory.is_dir():
                for path in directory.glob(f"*-{queue_id}.eml"):
                    try:
                        return parse_spool_file(path, path.read_bytes()).message
                    except FileNotFoundError:
                        continue
        return None

    message = wait_for(read, message=f"{queue_id} is neither spooled nor delivered")
    assert message.startswith(b"Received: ")
    end = message.index(b"\r\n")
    while message[end + 2 : end + 3] in (b"\t", b" "):  # the header's continuation lines
        end = message.index(b"\r\n", end + 2)
    return message[end + 2 :]


@pytest.mark.parametrize(
    ("chunks", "replies"),
    [
        ([HEADERS + b"plain text\r\n.\r\n"], 1),
        ([HEADERS + b"..leading dot\r\n.\r\n..\r\nlast\r\n.\r\n"], 1),
        ([b".stuffed first line\r\nno headers\r\n.\r\n"], 1),
        ([HEADERS + b"bare\nLF and a lone CR\r here\r\n.\r\n"], 1),
        ([HEADERS + b"split ", b"over\r\n", b".", b"\r\n"], 1),
        ([HEADERS + b"split at the end\r\n", b".\r\n"], 1),
        ([HEADERS + b"then a pipelined command\r\n.\r\nNOOP\r\n"], 2),
        ([HEADERS + b"x" * 995 + b"\r\n.\r\n"], 1),  # left to aiosmtpd: near the line limit
        ([HEADERS + b"y" * 1200 + b"\r\n.\r\n"], 1),  # too long: aiosmtpd's own 500
        ([HEADERS + (b"z" * 900 + b"\r\n") * 300 + b".\r\n"], 1),  # past the bulk limit
    ],
)
def test_the_service_reads_data_as_aiosmtpd_does(
    service: MailService,  # noqa: F811
    bare: tuple[int, Capture],
    chunks: list[bytes],
    replies: int,
) -> None:
    bare_port, capture = bare
    theirs = converse(bare_port, chunks, replies)
    ours = converse(service.port, chunks, replies)

    assert [line[:3] for line in ours] == [line[:3] for line in theirs]
    if theirs[0].startswith(b"250"):
        assert stored(service.root, ours[0]) == capture.contents[-1]
