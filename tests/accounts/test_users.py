"""System > Users: administrators add users, change roles, disable, enable and reset passwords,
each with an event; nobody locks the console out; read-only users see the list and nothing to
click; `manage.py adduser` applies the same rules."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client

from accounts.roles import ADMINISTRATOR, READ_ONLY, is_administrator
from accounts.services import UserRefused, user_create, user_disable, user_set_role
from events.models import Event

pytestmark = pytest.mark.django_db

USERS = "/system/users/"
NEW_PASSWORD = "quiet harbour lantern 7"


def csrf(client: Client) -> dict[str, str]:
    client.get(USERS)
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def post(client: Client, url: str, data: dict | None = None, **kw):
    return client.post(url, data or {}, **csrf(client), **kw)


def fresh(username: str):
    return get_user_model().objects.get(username=username)


def test_the_list_shows_role_status_and_last_login_with_actions_for_administrators(
    admin_client, readonly_user
):
    html = admin_client.get(USERS).content.decode()

    row = html.split('data-testid="user-viewer"')[1].split("</tr>")[0]
    assert "Read-only" in row and "Enabled" in row and "never" in row
    assert 'data-testid="disable"' in row and 'data-testid="reset-password"' in row
    assert 'data-testid="add-user"' in html


def test_read_only_users_see_the_list_without_buttons_and_every_change_is_403(
    readonly_client, admin_user
):
    html = readonly_client.get(USERS).content.decode()
    assert 'data-testid="user-admin"' in html and 'data-testid="read-only-note"' in html
    for testid in ("add-user", "change-role", "disable", "reset-password"):
        assert f'data-testid="{testid}"' not in html, testid

    pk = admin_user.pk
    urls = [
        f"{USERS}add/",
        *(f"{USERS}{pk}/{a}/" for a in ("role", "disable", "enable", "password")),
    ]
    token = csrf(readonly_client)
    for url in urls:
        assert readonly_client.get(url).status_code == 403, url
        assert readonly_client.post(url, {"role": READ_ONLY}, **token).status_code == 403, url
    assert is_administrator(fresh("admin")) and fresh("admin").is_active


def test_an_administrator_adds_a_user_with_an_event_that_holds_no_password(admin_client):
    data = {
        "username": "carol",
        "role": READ_ONLY,
        "password": NEW_PASSWORD,
        "password_again": NEW_PASSWORD,
    }
    response = post(admin_client, f"{USERS}add/", data, follow=True)

    assert "User carol added (Read-only)." in response.content.decode()
    carol = fresh("carol")
    assert carol.check_password(NEW_PASSWORD) and not is_administrator(carol)
    event = Event.objects.get(message="User carol created (Read-only)")
    assert event.username == "admin" and NEW_PASSWORD not in str(event.details)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"username": "Admin"}, "username", "is taken"),
        ({"password": "password", "password_again": "password"}, "password", "too common"),
        ({"password_again": NEW_PASSWORD + "x"}, "password_again", "two passwords differ"),
        ({"role": "root"}, "role", "Select a valid choice"),
    ],
)
def test_a_refused_new_user_keeps_the_form_with_the_reason_by_the_field(
    admin_client, admin_user, data, field, message
):
    form = {"username": "dave", "role": ADMINISTRATOR, "password": NEW_PASSWORD}
    form["password_again"] = NEW_PASSWORD
    response = post(admin_client, f"{USERS}add/", {**form, **data})

    html = response.content.decode()
    assert response.status_code == 400
    assert message in html.split(f'data-testid="error-{field}"')[1].split("</p>")[0]
    assert f'value="{form["username"] if field != "username" else "Admin"}"' in html
    assert NEW_PASSWORD not in html  # passwords are never sent back
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["admin"]


def test_role_change_confirms_then_applies_with_an_event(admin_client, readonly_user):
    url = f"{USERS}{readonly_user.pk}/role/"
    page = admin_client.get(url).content.decode()
    assert "may change everything" in page and 'data-testid="role-confirm"' in page
    assert not is_administrator(fresh("viewer"))  # looking changes nothing

    post(admin_client, url, {"role": ADMINISTRATOR})
    post(admin_client, url, {"role": ADMINISTRATOR})  # a repeated POST does not flip it back

    assert is_administrator(fresh("viewer"))
    assert (
        Event.objects.filter(message="User viewer is now Administrator", username="admin").count()
        == 1
    )


def test_disable_confirms_then_blocks_the_login_and_enable_restores_it(admin_client, readonly_user):
    url = f"{USERS}{readonly_user.pk}/disable/"
    page = admin_client.get(url).content.decode()
    assert "can no longer log in" in page and 'data-testid="disable-confirm"' in page
    assert fresh("viewer").is_active

    post(admin_client, url)
    viewer = Client()
    assert not viewer.login(username="viewer", password="read only eyes 2026")
    assert Event.objects.filter(message="User viewer disabled", username="admin").exists()

    post(admin_client, f"{USERS}{readonly_user.pk}/enable/")
    assert viewer.login(username="viewer", password="read only eyes 2026")
    assert Event.objects.filter(message="User viewer enabled", username="admin").exists()


def test_reset_password_applies_validators_and_logs_no_password(admin_client, readonly_user):
    url = f"{USERS}{readonly_user.pk}/password/"
    weak = post(admin_client, url, {"password": "viewer", "password_again": "viewer"})
    assert weak.status_code == 400 and "too short" in weak.content.decode()

    post(admin_client, url, {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD})

    assert fresh("viewer").check_password(NEW_PASSWORD)
    event = Event.objects.get(message="Password of user viewer reset")
    assert event.username == "admin" and NEW_PASSWORD not in str(event.details)


def test_resetting_your_own_password_keeps_you_logged_in(admin_client, admin_user):
    url = f"{USERS}{admin_user.pk}/password/"
    post(admin_client, url, {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD})

    assert admin_client.get(USERS).status_code == 200


def test_an_administrator_cannot_demote_or_disable_themself(admin_client, admin_user):
    user_create("second", NEW_PASSWORD, administrator=True)  # not the last one either
    for action in ("role", "disable"):
        url = f"{USERS}{admin_user.pk}/{action}/"
        page = admin_client.get(url).content.decode()
        assert "your own" in page and 'data-testid="confirm-refusal"' in page
        refused = post(admin_client, url, {"role": READ_ONLY}, follow=True).content.decode()
        assert "You cannot remove your own administrator role" in refused

    admin = fresh("admin")
    assert is_administrator(admin) and admin.is_active


def test_the_last_enabled_administrator_cannot_be_demoted_or_disabled(admin_user, readonly_user):
    user_create("former", NEW_PASSWORD, administrator=True)
    user_disable(user_id=fresh("former").pk, by="admin")  # disabled admins do not count

    for change in (
        lambda: user_set_role(user_id=admin_user.pk, role=READ_ONLY, by="viewer"),
        lambda: user_disable(user_id=admin_user.pk, by="viewer"),
    ):
        with pytest.raises(UserRefused, match="last enabled administrator"):
            change()
    assert is_administrator(fresh("admin")) and fresh("admin").is_active


def test_adduser_reads_the_password_from_stdin_and_refuses_with_clear_messages(
    admin_user, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO(NEW_PASSWORD + "\n"))
    out = io.StringIO()
    call_command("adduser", "erin", "--role", "admin", "--password-stdin", stdout=out)
    assert "Added user erin (Administrator)." in out.getvalue()
    assert is_administrator(fresh("erin")) and fresh("erin").check_password(NEW_PASSWORD)

    for name, role, password, message in [
        ("ERIN", "read-only", NEW_PASSWORD, "is taken"),
        ("frank", "read-only", "frank", "too short"),
        ("frank", "read-only", "", "No password on stdin"),
    ]:
        monkeypatch.setattr("sys.stdin", io.StringIO(password and password + "\n"))
        with pytest.raises(CommandError, match=message):
            call_command("adduser", name, "--role", role, "--password-stdin")
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("adduser", "frank", "--role", "root", "--password-stdin")
    assert not get_user_model().objects.filter(username="frank").exists()


def test_adduser_asks_the_password_twice_at_the_prompt(db, monkeypatch):
    answers = iter([NEW_PASSWORD, NEW_PASSWORD + "x", NEW_PASSWORD, NEW_PASSWORD])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))

    with pytest.raises(CommandError, match="two passwords differ"):
        call_command("adduser", "gina", "--role", "read-only")
    call_command("adduser", "gina", "--role", "read-only", stdout=io.StringIO())

    assert not is_administrator(fresh("gina"))
