"""What the tests of every log's filter form share (issue 13 and the log pages): the widest
range the form accepts, page links it refuses as damaged, and filtering in a real browser. The
times out of range are in tests/support/odd_input.py."""

from __future__ import annotations

import pytest

# The widest since and until the filter forms accept: the edges odd_input.OUT_OF_RANGE names.
WIDEST_RANGE = {"since": "0001-01-02T00:00:00+00:00", "until": "9999-12-30T00:00:00+00:00"}
DAMAGED_LINK = "This page link is damaged"


def damaged_link(params: dict[str, str], name: str) -> pytest.ParameterSet:
    """A (params, words) case whose page link the log refuses as damaged, named ``name``."""
    return pytest.param(params, DAMAGED_LINK, id=name)


def filter_in_browser(page, url: str, choices: dict[str, str], button: str, lands_on: str) -> None:
    """Open the log at ``url`` in a Playwright page, pick each labelled select's option, press
    ``button`` and wait until the URL matches ``lands_on`` (a glob): the filters are in the URL,
    so a filtered view can be bookmarked and shared."""
    page.goto(url)
    for label, option in choices.items():
        page.get_by_label(label).select_option(option)
    page.get_by_role("button", name=button).click()
    page.wait_for_url(lands_on)
