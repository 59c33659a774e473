"""MAIL FROM and RCPT TO paths: the service's quick parse gives aiosmtpd's own answers.

smtp.server.MailSMTP._getaddr takes a plain ``<local@domain>`` with a regular expression and
leaves everything else to aiosmtpd's parser. Both are asked about the same arguments here, with
and without a local-part length limit, and must agree on every one: the address, what follows
it (the MAIL FROM and RCPT TO parameters), and None for what cannot be parsed.
"""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from smtp.server import MailSMTP

ARGUMENTS = [
    "<a@b>",
    "<anna.schmidt@partner.example.net>",
    "<A.B+tag@Example.COM>",
    "<x!#$%&'*+/=?^_`{|}~-@y.test>",
    "<a@b.c-d.e>",
    "<a@-b>",
    "<a@b> SIZE=100",
    "<a@b>  BODY=8BITMIME SIZE=1",
    "<a@b>\tSIZE=1",
    "<a@b>x",
    "<a@b>>",
    # Left to aiosmtpd: comments, the null path, dots out of place, quoting, domain literals,
    # source routes, no brackets, non-ASCII, control characters.
    "<a@b> (comment) SIZE=1",
    "<a@b>(comment)",
    "<>",
    "<> SIZE=1",
    "<a..b@c>",
    "<.a@b>",
    "<a.@b>",
    "<a@b.>",
    "<a@b..c>",
    "<a@[192.0.2.1]>",
    '<"a b"@c>',
    '<"a@b"@c>',
    "<@relay.test:a@b>",
    "<a@b",
    "a@b",
    " <a@b>",
    "<a b@c>",
    "<a@b c>",
    "<ü@b>",
    "<a@ü.test>",
    "<a\x00@b>",
    "<" + "l" * 64 + "@b>",
    "<" + "l" * 65 + "@b>",
    "<" + "l" * 70 + "@b> SIZE=1",
]


class Bare(SMTP):
    """aiosmtpd's protocol, only to ask its address parser (nothing is connected)."""

    def __init__(self, local_part_limit: int) -> None:
        self.local_part_limit = local_part_limit


class Ours(MailSMTP):
    def __init__(self, local_part_limit: int) -> None:
        self.local_part_limit = local_part_limit


@pytest.mark.parametrize("local_part_limit", [0, 64])
@pytest.mark.parametrize("argument", ARGUMENTS)
def test_a_path_parses_as_aiosmtpd_parses_it(argument: str, local_part_limit: int) -> None:
    assert Ours(local_part_limit)._getaddr(argument) == Bare(local_part_limit)._getaddr(argument)
