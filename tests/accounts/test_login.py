"""Logging in and out: every outcome is an event, failures are throttled, sessions are safe."""

from __future__ import annotations

import pytest
from django.test import Client

from events.models import Category, Event, Severity
from tests.support.users import ADMIN_PASSWORD

pytestmark = pytest.mark.django_db


def _login(client: Client, username: str, password: str, **extra):
    return client.post("/accounts/login/", {"username": username, "password": password}, **extra)


def test_it_logs_an_administrator_in_and_records_the_login(client, admin_user):
    response = _login(client, "admin", ADMIN_PASSWORD)

    assert response.status_code == 302
    assert response["Location"] == "/home/"
    event = Event.objects.get(category=Category.AUTH, message="admin logged in")
    assert event.username == "admin"
    assert event.details == {"client_ip": "127.0.0.1"}


def test_it_refuses_a_wrong_password_with_a_message_and_a_warning_event(client, admin_user):
    response = _login(client, "admin", "not the password")

    assert response.status_code == 401
    assert "The user name or password is not correct." in response.content.decode()
    event = Event.objects.get(message="Failed login for 'admin'")
    assert event.severity == Severity.WARNING
    assert "not the password" not in str(event.details)


def test_it_throttles_repeated_failures_even_with_the_right_password(client, admin_user, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    for _ in range(3):
        _login(client, "admin", "wrong")

    response = _login(client, "admin", ADMIN_PASSWORD)

    assert response.status_code == 401
    assert "Too many failed logins" in response.content.decode()
    assert Event.objects.filter(message__startswith="Login refused for 'admin'").exists()
    assert "_auth_user_id" not in client.session


def test_it_throttles_by_client_address_across_user_names(client, admin_user, settings):
    settings.LOGIN_ADDRESS_FAILURE_LIMIT = 3
    for name in ("alice", "bob", "carol"):
        _login(client, name, "guess")

    assert _login(client, "admin", ADMIN_PASSWORD).status_code == 401


def test_logout_needs_a_post_and_records_the_logout(admin_user):
    client = Client()
    client.force_login(admin_user)
    assert client.get("/accounts/logout/").status_code == 405

    response = client.post("/accounts/logout/")

    assert response.status_code == 302
    assert Event.objects.filter(message="admin logged out").exists()
    assert client.get("/home/").status_code == 302


def test_login_form_is_csrf_protected(admin_user):
    client = Client(enforce_csrf_checks=True)

    response = _login(client, "admin", ADMIN_PASSWORD)

    assert response.status_code == 403
    assert not Event.objects.filter(message="admin logged in").exists()


def test_it_does_not_redirect_to_another_site_after_login(client, admin_user):
    response = client.post(
        "/accounts/login/?next=https://evil.example/",
        {"username": "admin", "password": ADMIN_PASSWORD},
    )

    assert response["Location"] == "/home/"


def test_the_session_cookie_is_http_only_and_same_site_strict(client, admin_user):
    response = _login(client, "admin", ADMIN_PASSWORD)

    cookie = response.cookies["sessionid"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
