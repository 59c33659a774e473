"""Logging in and out, with throttling and events."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model, login, logout
from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.http import HttpRequest
from django.utils import timezone

from accounts.models import ApiToken, LoginThrottle
from accounts.roles import ADMINISTRATOR, ensure_role_groups
from events.models import Category, Severity
from events.services import event_write


@dataclass(frozen=True)
class LoginResult:
    """The outcome of a login attempt, with the message to show when it failed."""

    ok: bool
    message: str = ""


def client_ip(request: HttpRequest) -> str | None:
    """The peer address (gunicorn sits behind no proxy by default, so REMOTE_ADDR is honest)."""
    return request.META.get("REMOTE_ADDR") or None


def _address_key(ip: str | None) -> str:
    """The address as one counter key: canonical text, so ``::1`` and ``0::1`` are one client."""
    if not ip:
        return ""
    try:
        canonical = str(ipaddress.ip_address(ip))
    except ValueError:
        canonical = ip
    return canonical[:45]  # the column's width; only a scoped IPv6 address can be longer


def _throttle_claim(scope: LoginThrottle.Scope, username: str, address: str, limit: int) -> bool:
    """Count one attempt against a key unless it already holds ``limit`` failures.

    The check and the count are one conditional UPDATE with its row count read, so parallel
    attempts queue on the row and at most ``limit`` of them get through. A counter idle for the
    whole window starts again at one in the same statement.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS)
    counter = LoginThrottle.objects.filter(scope=scope, username=username, client_ip=address)
    open_ = Q(failures__lt=limit) | Q(last_failure_at__lt=stale)
    counted = {
        "failures": Case(When(last_failure_at__lt=stale, then=Value(1)), default=F("failures") + 1),
        "last_failure_at": now,
    }
    if counter.filter(open_).update(**counted):
        return True
    # Either the key has no row yet (or the prune just took it) or it is at the limit: create
    # an empty row if none is there, then claim again; a full row stays full.
    LoginThrottle.objects.bulk_create(
        [LoginThrottle(scope=scope, username=username, client_ip=address, last_failure_at=now)],
        ignore_conflicts=True,
    )
    return counter.filter(open_).update(**counted) == 1


def _login_attempt_record(username: str, address: str) -> LoginThrottle.Scope | None:
    """Count the attempt before the password is checked; the scope that refuses it, or None.

    The user name at this address and the address itself are counted together or not at all: a
    refused attempt counts nowhere, so hammering a locked key does not extend its lock. Rows are
    always locked in the same order (user at address, then address), so two attempts cannot
    deadlock on each other's rows.
    """
    limits = (
        (LoginThrottle.Scope.USER_AT_ADDRESS, username.lower(), settings.LOGIN_FAILURE_LIMIT),
        (LoginThrottle.Scope.ADDRESS, "", settings.LOGIN_ADDRESS_FAILURE_LIMIT),
    )
    with transaction.atomic():
        for scope, name, limit in limits:
            if not _throttle_claim(scope, name, address, limit):
                transaction.set_rollback(True)
                return scope
    return None


def _login_success_record(username: str, address: str) -> None:
    """Clear the user's failures at this address, and give the address back this attempt.

    Failures of the same user name from other addresses stay: they are someone else's guesses.
    """
    LoginThrottle.objects.filter(
        scope=LoginThrottle.Scope.USER_AT_ADDRESS, username=username.lower(), client_ip=address
    ).delete()
    LoginThrottle.objects.filter(
        scope=LoginThrottle.Scope.ADDRESS, client_ip=address, failures__gt=0
    ).update(failures=F("failures") - 1)


def login_attempt(request: HttpRequest, username: str, password: str) -> LoginResult:
    """Log the user in unless throttled or wrong; every outcome is an event.

    Throttled per user name at a client address (``LOGIN_FAILURE_LIMIT``) and per address
    (``LOGIN_ADDRESS_FAILURE_LIMIT``), never per user name alone: a stranger guessing the
    administrator's password locks out only their own address, not the administrator.
    """
    ip = client_ip(request)
    address = _address_key(ip)
    username = username.strip()[:150]
    refused_by = _login_attempt_record(username, address)
    if refused_by is not None:
        event_write(
            category=Category.AUTH,
            severity=Severity.WARNING,
            message=f"Login refused for {username!r}: too many failed attempts",
            details={"client_ip": ip, "throttled": refused_by.value},
        )
        minutes = max(1, settings.LOGIN_FAILURE_WINDOW_SECONDS // 60)
        return LoginResult(False, f"Too many failed logins. Try again in {minutes} minutes.")
    user = authenticate(request, username=username, password=password)
    if user is None:
        event_write(
            category=Category.AUTH,
            severity=Severity.WARNING,
            message=f"Failed login for {username!r}",
            details={"client_ip": ip},
        )
        return LoginResult(False, "The user name or password is not correct.")
    login(request, user)
    _login_success_record(username, address)
    event_write(
        category=Category.AUTH,
        message=f"{user.get_username()} logged in",
        user=user,
        details={"client_ip": ip},
    )
    return LoginResult(True)


def logout_user(request: HttpRequest) -> None:
    """End the session and record it."""
    user = request.user
    if user.is_authenticated:
        event_write(
            category=Category.AUTH,
            message=f"{user.get_username()} logged out",
            user=user,
            details={"client_ip": client_ip(request)},
        )
    logout(request)


def login_failures_prune() -> int:
    """Forget counters idle for the whole throttle window; they no longer count.

    Only tidiness: an idle counter already counts from one again (see _throttle_claim), and an
    attempt racing the prune recreates its row.
    """
    since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS)
    deleted, _ = LoginThrottle.objects.filter(last_failure_at__lt=since).delete()
    return deleted


@transaction.atomic
def user_create(
    username: str, password: str, *, administrator: bool, created_by: str = "system"
) -> AbstractBaseUser:
    """Create a console user in one of the two roles."""
    ensure_role_groups()
    user = get_user_model().objects.create_user(username=username, password=password)
    group = Group.objects.get(name=ADMINISTRATOR if administrator else "Read-only")
    user.groups.add(group)
    event_write(
        category=Category.AUTH,
        message=f"User {username} created ({group.name})",
        user=created_by,
    )
    return user


def first_admin_ensure(password: str | None) -> tuple[bool, str | None]:
    """Create the first administrator, `admin`, when no user exists yet.

    Returns (created, generated_password). The generated password is returned to be printed
    once by the caller; it is never written to the event log or any file.
    """
    ensure_role_groups()
    if get_user_model().objects.exists():
        return False, None
    generated = None
    if not password:
        generated = secrets.token_urlsafe(12)
        password = generated
    user_create("admin", password, administrator=True)
    return True, generated


def _token_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_token_create(user: AbstractBaseUser, name: str, created_by: str = "system") -> str:
    """Create an API token for the user and return it; only its digest is kept."""
    key = "lmi_" + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name, prefix=key[:8], digest=_token_digest(key))
    event_write(
        category=Category.AUTH,
        message=f"API token {name!r} created for {user.get_username()}",
        user=created_by,
    )
    return key


def api_token_user(key: str) -> AbstractBaseUser | None:
    """The active user a token stands for, or None; records when it was last used."""
    token = (
        ApiToken.objects.select_related("user")
        .filter(digest=_token_digest(key), user__is_active=True)
        .first()
    )
    if token is None:
        return None
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token.user
