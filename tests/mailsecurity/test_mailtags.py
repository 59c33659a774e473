"""Long addresses break where a reader expects: after the "@" and before a dot."""

from __future__ import annotations

from mailsecurity.templatetags.mailtags import address_breaks


def test_an_address_breaks_after_the_at_and_before_its_dots_and_stays_escaped() -> None:
    assert address_breaks("oscar_richter@mail.example.com") == (
        "oscar_richter@<wbr>mail<wbr>.example<wbr>.com"
    )
    assert address_breaks("<script>@x.y") == "&lt;script&gt;@<wbr>x<wbr>.y"
    assert address_breaks(None) == ""
