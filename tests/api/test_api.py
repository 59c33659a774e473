"""The JSON API: a login for every call, JSON errors, read-only stays read-only."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.services import api_token_create
from events.models import Category
from events.services import event_write
from tests.support.users import bearer

pytestmark = pytest.mark.django_db


def test_an_anonymous_call_gets_401_json_not_a_login_redirect(client):
    for url in ("/api/v1/system", "/api/v1/events", "/api/v1/openapi.json"):
        response = client.get(url)
        assert response.status_code == 401, url
        assert response.json() == {"detail": "Unauthorized"}


def test_a_wrong_token_is_refused(client, admin_user):
    api_token_create(admin_user, "ci")

    assert client.get("/api/v1/me", **bearer("lmi_not-a-token")).status_code == 401


def test_a_token_acts_as_its_user_with_its_role(client, readonly_user):
    key = api_token_create(readonly_user, "monitoring")

    response = client.get("/api/v1/me", **bearer(key))

    assert response.json() == {"username": "viewer", "role": "Read-only"}


def test_a_session_user_reads_system_and_resources(admin_client, demo_appliance):
    system = admin_client.get("/api/v1/system").json()
    resources = admin_client.get("/api/v1/resources").json()

    assert system["firmware_version"] == "2.8.0.0"
    assert {i["name"]: i["mode"] for i in system["interfaces"]} == {
        "eth0": "dhcp",
        "eth1": "static",
    }
    assert [d["role"] for d in resources["disks"]] == ["Console database", "Message store"]
    assert resources["required_free_percent"] == 50.0


def test_system_without_an_appliance_is_a_503_with_the_reason(admin_client):
    response = admin_client.get("/api/v1/system")

    assert response.status_code == 503
    assert "firmware" in response.json()["detail"]


def test_events_page_by_cursor_with_the_console_filters(client, admin_user):
    for i in range(5):
        event_write(category=Category.SMTP, message=f"relay {i}")
    event_write(category=Category.SYSTEM, message="other")
    key = api_token_create(admin_user, "ci")

    first = client.get("/api/v1/events?category=smtp&limit=3", **bearer(key)).json()
    second = client.get(
        f"/api/v1/events?category=smtp&limit=3&after={first['older']}", **bearer(key)
    ).json()

    assert [e["message"] for e in first["events"]] == ["relay 4", "relay 3", "relay 2"]
    assert [e["message"] for e in second["events"]] == ["relay 1", "relay 0"]
    assert second["older"] is None


def test_bad_event_filters_are_a_400_with_the_reason(admin_client):
    response = admin_client.get("/api/v1/events?since=soon")

    assert response.status_code == 400
    assert "From" in response.json()["detail"] or "date" in response.json()["detail"]


def test_the_openapi_description_lists_the_routes_for_a_logged_in_caller(admin_client):
    schema = admin_client.get("/api/v1/openapi.json").json()

    assert schema["info"]["title"] == "LMI API"
    assert {"/api/v1/system", "/api/v1/resources", "/api/v1/events", "/api/v1/me"} <= set(
        schema["paths"]
    )


def test_a_token_may_read_the_openapi_description(client, readonly_user):
    key = api_token_create(readonly_user, "tooling")

    assert client.get("/api/v1/openapi.json", **bearer(key)).status_code == 200


def test_only_the_digest_of_a_token_is_stored(admin_user):
    from accounts.models import ApiToken

    key = api_token_create(admin_user, "ci")

    stored = ApiToken.objects.get()
    assert key not in (stored.digest, stored.prefix, stored.name)
    assert key.startswith(stored.prefix)


def test_a_deactivated_user_token_stops_working(client, admin_user):
    key = api_token_create(admin_user, "ci")
    admin_user.is_active = False
    admin_user.save()

    assert client.get("/api/v1/me", **bearer(key)).status_code == 401


def test_session_auth_does_not_need_a_token_header(admin_user):
    session = Client()
    session.force_login(admin_user)

    assert session.get("/api/v1/me").json()["role"] == "Administrator"
