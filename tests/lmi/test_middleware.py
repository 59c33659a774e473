"""Polled partials of an expired session send the browser to the login page, not into a table."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_an_htmx_poll_without_a_session_redirects_the_whole_page_to_login(client):
    response = client.get(
        "/home/resources/partial/",
        HTTP_HX_REQUEST="true",
        HTTP_HX_CURRENT_URL="http://testserver/home/resources/?x=1",
    )

    assert response.status_code == 200
    assert response.content == b""
    assert response["HX-Redirect"] == "/accounts/login/?next=%2Fhome%2Fresources%2F%3Fx%3D1"


def test_an_htmx_poll_never_redirects_to_another_site_after_login(client):
    response = client.get(
        "/home/notifications/",
        HTTP_HX_REQUEST="true",
        HTTP_HX_CURRENT_URL="https://evil.example/phish",
    )

    assert response["HX-Redirect"] == "/accounts/login/?next=%2F"


def test_a_plain_request_without_a_session_still_gets_an_ordinary_redirect(client):
    response = client.get("/home/notifications/")

    assert response.status_code == 302
    assert "HX-Redirect" not in response
