"""Every page needs a login; read-only users may look but not change anything."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.services import first_admin_ensure
from events.models import Event

pytestmark = pytest.mark.django_db

PAGES = ["/home/", "/home/system/", "/home/resources/", "/system/events/", "/updates/licensing/"]


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_visitors_are_sent_to_the_login_page(client, url):
    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_a_read_only_user_cannot_post_anywhere(readonly_client):
    response = readonly_client.post("/system/events/", {})

    assert response.status_code == 403
    assert "read-only" in response.content.decode()


def test_a_read_only_user_may_still_log_out(readonly_user):
    client = Client()
    client.force_login(readonly_user)

    assert client.post("/accounts/logout/").status_code == 302


def test_the_first_administrator_is_created_once_with_a_generated_password():
    created, generated = first_admin_ensure(None)
    again, none = first_admin_ensure(None)

    assert created and generated and len(generated) >= 12
    assert (again, none) == (False, None)
    assert Client().login(username="admin", password=generated)
    assert generated not in "".join(Event.objects.values_list("message", flat=True))


def test_the_first_administrator_takes_the_configured_password():
    created, generated = first_admin_ensure("configured password 1")

    assert created and generated is None
    assert Client().login(username="admin", password="configured password 1")


def test_pages_carry_security_headers(admin_client, demo_appliance):
    response = admin_client.get("/home/system/")

    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in response["Content-Security-Policy"]
    assert response["Cache-Control"] == "no-store"
