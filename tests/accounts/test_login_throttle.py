"""The login throttle: per user name at an address and per address, never raced past its limit."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import Client, RequestFactory

from accounts import services
from accounts.models import LoginThrottle
from events.models import Event
from tests.support.users import ADMIN_PASSWORD

STRANGER = "203.0.113.9"
ADMIN_DESK = "192.0.2.10"
THREADS = 32


def _login(client: Client, username: str, password: str, address: str):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address
    )


def _refused(response) -> bool:
    return response.status_code == 401 and "Too many failed logins" in response.content.decode()


def test_parallel_wrong_passwords_get_no_more_password_checks_than_the_limit(
    transactional_db, admin_user, settings, monkeypatch
):
    # Real threads on real connections: on SQLite each claim is a BEGIN IMMEDIATE transaction
    # (settings' transaction_mode), on PostgreSQL a row-locking conditional UPDATE.
    settings.LOGIN_FAILURE_LIMIT = 5
    checks: list[str] = []
    real_authenticate = services.authenticate

    def slow_counting_authenticate(request, **credentials):
        checks.append(credentials["username"])
        # Widen the gap between the throttle and the password check, where the race used to be.
        time.sleep(0.02)
        return real_authenticate(request, **credentials)

    monkeypatch.setattr(services, "authenticate", slow_counting_authenticate)
    start = threading.Barrier(THREADS)
    results: list[services.LoginResult] = []
    errors: list[BaseException] = []

    def guess() -> None:
        try:
            request = RequestFactory().post("/accounts/login/", REMOTE_ADDR=STRANGER)
            start.wait()
            results.append(services.login_attempt(request, "admin", "wrong guess"))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=guess) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(results) == THREADS
    assert len(checks) == 5
    assert sum("Too many failed logins" in r.message for r in results) == THREADS - 5
    assert Event.objects.filter(message="Failed login for 'admin'").count() == 5
    refused = Event.objects.filter(message__startswith="Login refused for 'admin'")
    assert refused.count() == THREADS - 5


@pytest.mark.django_db
def test_a_strangers_guesses_do_not_lock_the_administrator_out_from_another_address(
    admin_user, settings
):
    settings.LOGIN_FAILURE_LIMIT = 3
    stranger, administrator = Client(), Client()
    for _ in range(3):
        _login(stranger, "admin", "wrong guess", STRANGER)

    assert _refused(_login(stranger, "admin", ADMIN_PASSWORD, STRANGER))
    assert _login(administrator, "admin", ADMIN_PASSWORD, ADMIN_DESK).status_code == 302


@pytest.mark.django_db
def test_the_address_limit_counts_failures_across_user_names(client, admin_user, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    settings.LOGIN_ADDRESS_FAILURE_LIMIT = 5
    for name in ("alice", "bob", "carol", "dave", "erin"):
        _login(client, name, "guess", STRANGER)

    assert _refused(_login(client, "admin", ADMIN_PASSWORD, STRANGER))
    event = Event.objects.filter(message__startswith="Login refused for 'admin'").get()
    assert event.details == {"client_ip": STRANGER, "throttled": "address"}
    assert _login(Client(), "admin", ADMIN_PASSWORD, ADMIN_DESK).status_code == 302


@pytest.mark.django_db
def test_the_lock_ends_once_the_window_passes_without_a_counted_failure(
    client, admin_user, settings, clock
):
    settings.LOGIN_FAILURE_LIMIT = 3
    settings.LOGIN_FAILURE_WINDOW_SECONDS = 900
    clock.travel(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    for _ in range(3):
        _login(client, "admin", "wrong guess", STRANGER)

    clock.shift(timedelta(seconds=840))
    # Refused, and a refused attempt is not a failure: it does not push the lock further out.
    assert _refused(_login(client, "admin", ADMIN_PASSWORD, STRANGER))
    clock.shift(timedelta(seconds=61))

    assert _login(client, "admin", ADMIN_PASSWORD, STRANGER).status_code == 302


@pytest.mark.django_db
def test_a_successful_login_clears_the_users_failures_at_that_address(admin_user, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    client = Client()
    for _ in range(2):
        _login(client, "admin", "typo", ADMIN_DESK)
    assert _login(client, "admin", ADMIN_PASSWORD, ADMIN_DESK).status_code == 302
    client.post("/accounts/logout/")

    for _ in range(2):
        _login(client, "admin", "typo", ADMIN_DESK)

    assert _login(client, "admin", ADMIN_PASSWORD, ADMIN_DESK).status_code == 302
    counter = LoginThrottle.objects.get(scope=LoginThrottle.Scope.ADDRESS, client_ip=ADMIN_DESK)
    assert counter.failures == 4  # the two successful attempts were given back


@pytest.mark.django_db
def test_user_names_are_throttled_whatever_their_case(client, admin_user, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    for name in ("admin", "ADMIN", "Admin"):
        _login(client, name, "wrong guess", STRANGER)

    assert _refused(_login(client, "admin", ADMIN_PASSWORD, STRANGER))


@pytest.mark.django_db
def test_an_address_is_one_client_however_it_is_written(client, admin_user, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    _login(client, "admin", "wrong guess", "2001:db8::1")
    _login(client, "admin", "wrong guess", "2001:0db8:0:0::1")

    assert _refused(_login(client, "admin", ADMIN_PASSWORD, "2001:db8::1"))


@pytest.mark.django_db
def test_the_prune_forgets_only_counters_idle_for_the_window(client, settings, clock):
    settings.LOGIN_FAILURE_WINDOW_SECONDS = 900
    clock.travel(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    _login(client, "alice", "guess", STRANGER)
    clock.shift(timedelta(seconds=600))
    _login(client, "bob", "guess", ADMIN_DESK)
    clock.shift(timedelta(seconds=400))

    # Alice's counter at the stranger's address and that address's own counter.
    assert services.login_failures_prune() == 2
    assert set(LoginThrottle.objects.values_list("username", "client_ip")) == {
        ("bob", ADMIN_DESK),
        ("", ADMIN_DESK),
    }
