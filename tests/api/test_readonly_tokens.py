"""A read-only API token can read but never change: every unsafe call is refused before a view."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import URLPattern

from accounts.roles import READ_ONLY_REFUSAL
from api.api import api
from events.models import Event
from jobs.models import Job

pytestmark = pytest.mark.django_db

PREFIX = "/api/v1/"
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def _url(route: str) -> str:
    """A concrete URL for a route: every path parameter (<int:run_id>, {name}) becomes 1."""
    return PREFIX + re.sub(r"<[^>]+>|\{[^}]+\}", "1", route.removeprefix(PREFIX))


def _api_urls() -> list[str]:
    """Every URL the API serves, from its URL patterns (the root only answers 404)."""
    patterns, _, _ = api.urls
    return [_url(str(p.pattern)) for p in patterns if isinstance(p, URLPattern) and str(p.pattern)]


def _declared_changes() -> set[tuple[str, str]]:
    """(method, url) of every unsafe operation the API's OpenAPI description declares."""
    paths = api.get_openapi_schema(path_prefix=PREFIX.rstrip("/"))["paths"]
    return {
        (method.upper(), _url(path))
        for path, operations in paths.items()
        for method in operations
        if method.upper() in UNSAFE_METHODS
    }


def _send(client: Client, method: str, url: str, auth: dict[str, str]):
    return client.generic(method, url, "{}", content_type="application/json", **auth)


def test_a_read_only_token_gets_403_json_on_every_unsafe_api_call(client, viewer_token):
    events_before = Event.objects.count()
    reached = set()

    for url in _api_urls():
        for method in UNSAFE_METHODS:
            response = _send(client, method, url, viewer_token)
            if response.status_code == 405:  # the route has no such operation
                continue
            reached.add((method, url))
            assert response.status_code == 403, (method, url, response.content)
            assert response["Content-Type"].startswith("application/json"), (method, url)
            assert response.json()["detail"] == READ_ONLY_REFUSAL, (method, url)

    assert _declared_changes() <= reached
    assert ("POST", "/api/v1/backups/config/1/diff") in reached
    assert Event.objects.count() == events_before
    assert not Job.objects.exists()


def test_a_read_only_token_may_still_read(client, viewer_token):
    for url in ("/api/v1/me", "/api/v1/events", "/api/v1/cluster", "/api/v1/openapi.json"):
        assert client.get(url, **viewer_token).status_code == 200, url


def test_an_administrator_token_still_changes_and_compares_backups(
    client, demo_appliance, admin_token
):
    created = _send(client, "POST", "/api/v1/backups/config", admin_token)
    assert created.status_code == 201, created.content
    name = created.json()["name"]

    diff = _send(client, "POST", f"/api/v1/backups/config/{name}/diff", admin_token)

    assert diff.status_code == 200, diff.content
    assert isinstance(diff.json(), list)


def test_a_read_only_token_overrides_an_administrator_session(admin_client, viewer_token):
    # The API runs as the token's user when a token is sent, so the token's role decides.
    response = _send(admin_client, "POST", "/api/v1/backups/config/1/diff", viewer_token)

    assert response.status_code == 403
    assert response.json()["detail"] == READ_ONLY_REFUSAL
