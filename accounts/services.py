"""Logging in and out, with throttling and events."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model, login, logout
from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import transaction
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone

from accounts.models import ApiToken, LoginFailure
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


def _recent_failures(username: str, ip: str | None) -> int:
    since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS)
    match = Q(username__iexact=username)
    if ip:
        match |= Q(client_ip=ip)
    return LoginFailure.objects.filter(match, created_at__gte=since).count()


def login_attempt(request: HttpRequest, username: str, password: str) -> LoginResult:
    """Log the user in unless throttled or wrong; every outcome is an event."""
    ip = client_ip(request)
    username = username.strip()[:150]
    if _recent_failures(username, ip) >= settings.LOGIN_FAILURE_LIMIT:
        event_write(
            category=Category.AUTH,
            severity=Severity.WARNING,
            message=f"Login refused for {username!r}: too many failed attempts",
            details={"client_ip": ip},
        )
        minutes = max(1, settings.LOGIN_FAILURE_WINDOW_SECONDS // 60)
        return LoginResult(False, f"Too many failed logins. Try again in {minutes} minutes.")
    user = authenticate(request, username=username, password=password)
    if user is None:
        LoginFailure.objects.create(username=username, client_ip=ip)
        event_write(
            category=Category.AUTH,
            severity=Severity.WARNING,
            message=f"Failed login for {username!r}",
            details={"client_ip": ip},
        )
        return LoginResult(False, "The user name or password is not correct.")
    login(request, user)
    LoginFailure.objects.filter(username__iexact=username).delete()
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
    """Forget failures older than the throttle window; they no longer count."""
    since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS)
    deleted, _ = LoginFailure.objects.filter(created_at__lt=since).delete()
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
