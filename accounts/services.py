"""Logging in and out, with throttling and events; the console's users and their roles."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model, login, logout
from django.contrib.auth.models import AbstractBaseUser, Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Case, F, Q, QuerySet, Value, When
from django.http import HttpRequest
from django.utils import timezone

from accounts.models import ApiToken, LoginThrottle
from accounts.roles import (
    ADMINISTRATOR,
    READ_ONLY,
    ROLES,
    ensure_role_groups,
    is_administrator,
    role_name,
)
from events.models import Category, Severity
from events.services import User as EventUser
from events.services import event_write, username_of


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


class UserRefused(Exception):
    """A change to the console's users refused, in words for the administrator.

    ``field`` names the form field the refusal is about (the name, the password), so a form can
    show it next to that field; None when it is about the change as a whole.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _name_check(username: str) -> None:
    """Refuse a name that Django would store but the console could not tell apart or log in with.

    Taken is checked case-insensitively: "Admin" beside "admin" would be two accounts that the
    event log and the login throttle (which lower-cases names) cannot tell apart.
    """
    model = get_user_model()
    if not username:
        raise UserRefused("Enter a user name.", "username")
    if len(username) > 150:
        raise UserRefused("A user name has at most 150 characters.", "username")
    try:
        model.username_validator(username)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise UserRefused(" ".join(exc.messages), "username") from exc
    if model.objects.filter(username__iexact=username).exists():
        raise UserRefused(f"The user name {username!r} is taken.", "username")


def _password_check(password: str, user: AbstractBaseUser) -> None:
    """Django's password validators (settings.AUTH_PASSWORD_VALIDATORS), as one refusal."""
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise UserRefused(" ".join(exc.messages), "password") from exc


def _role_group(role: str) -> Group:
    if role not in ROLES:
        raise UserRefused(f"There is no role {role!r}: choose {' or '.join(ROLES)}.", "role")
    ensure_role_groups()
    return Group.objects.get(name=role)


@transaction.atomic
def user_create(
    username: str,
    password: str,
    *,
    administrator: bool,
    created_by: EventUser = "system",
    check_password: bool = True,
) -> AbstractBaseUser:
    """Create a console user in one of the two roles; refuse a taken name or a weak password.

    ``check_password=False`` only for the first administrator, whose password the operator
    chose in LMI_ADMIN_PASSWORD before any console existed to refuse it. The password is never
    written to the event.
    """
    username = username.strip()
    _name_check(username)
    group = _role_group(ADMINISTRATOR if administrator else READ_ONLY)
    model = get_user_model()
    if check_password:
        _password_check(password, model(username=username))
    user = model.objects.create_user(username=username, password=password)
    user.groups.add(group)
    event_write(
        category=Category.AUTH,
        message=f"User {username} created ({group.name})",
        user=created_by,
        details={"username": username, "role": group.name},
    )
    return user


def active_administrators() -> QuerySet[AbstractBaseUser]:
    """The enabled users who may change things: superusers and the Administrator group."""
    return (
        get_user_model()
        .objects.filter(is_active=True)
        .filter(Q(is_superuser=True) | Q(groups__name=ADMINISTRATOR))
        .distinct()
    )


def user_lockout_refusal(target: AbstractBaseUser, by: EventUser) -> str | None:
    """Why ``target`` may not lose the Administrator role or be disabled now, or None.

    Nobody may shut themself out (an administrator who demotes or disables their own account by
    mistake cannot undo it), and the console keeps one enabled administrator at least, or
    nobody could manage users again except from the command line. Shown on the confirmation
    page before the button, and checked again by the services under a lock.
    """
    if username_of(by) == target.get_username():
        return (
            "You cannot remove your own administrator role or disable your own account: ask "
            "another administrator."
        )
    if not is_administrator(target) or not target.is_active:
        return None
    if not active_administrators().exclude(pk=target.pk).exists():
        return (
            f"{target.get_username()} is the last enabled administrator: make another user an "
            "administrator first, or nobody could manage the console."
        )
    return None


def _lock_roles() -> None:
    """Serialise changes that can take away an administrator: two administrators demoting each
    other at once must not both see "one other left" and leave none (PostgreSQL; SQLite's
    IMMEDIATE transactions already run one writer at a time)."""
    ensure_role_groups()
    Group.objects.select_for_update().filter(name=ADMINISTRATOR).first()


def _user_locked(user_id: int) -> AbstractBaseUser:
    user = get_user_model().objects.select_for_update().filter(pk=user_id).first()
    if user is None:
        raise UserRefused("There is no such user.")
    return user


@transaction.atomic
def user_set_role(*, user_id: int, role: str, by: EventUser) -> AbstractBaseUser:
    """Give a user one of the two roles (a no-op, without an event, when it has it already).

    Demoting takes superuser status away too: the role the console shows is the one it applies.
    """
    group = _role_group(role)
    _lock_roles()
    user = _user_locked(user_id)
    if role_name(user) == role:
        return user
    if role != ADMINISTRATOR and (refusal := user_lockout_refusal(user, by)):
        raise UserRefused(refusal)
    user.groups.remove(*Group.objects.filter(name__in=ROLES))
    user.groups.add(group)
    if role != ADMINISTRATOR and user.is_superuser:  # type: ignore[attr-defined]
        user.is_superuser = False  # type: ignore[attr-defined]
        user.save(update_fields=["is_superuser"])
    user.__dict__.pop("_lmi_is_admin", None)
    event_write(
        category=Category.AUTH,
        message=f"User {user.get_username()} is now {role}",
        user=by,
        details={"username": user.get_username(), "role": role},
    )
    return user


@transaction.atomic
def user_disable(*, user_id: int, by: EventUser) -> AbstractBaseUser:
    """Disable a user: no more logins, its sessions and API tokens stop working at once.

    Django refuses inactive users on every request (ModelBackend.get_user), and API tokens only
    stand for active users, so nothing else needs revoking; the account and its history stay.
    """
    _lock_roles()
    user = _user_locked(user_id)
    if not user.is_active:
        return user
    if refusal := user_lockout_refusal(user, by):
        raise UserRefused(refusal)
    return _set_active(user, False, by)


@transaction.atomic
def user_enable(*, user_id: int, by: EventUser) -> AbstractBaseUser:
    """Let a disabled user log in again, with the role and password they had."""
    user = _user_locked(user_id)
    if user.is_active:
        return user
    return _set_active(user, True, by)


def _set_active(user: AbstractBaseUser, active: bool, by: EventUser) -> AbstractBaseUser:
    """Disable or enable, with its event (the callers checked what may be changed)."""
    user.is_active = active
    return _saved_with_event(
        user, "is_active", f"User {user.get_username()} {'enabled' if active else 'disabled'}", by
    )


def _saved_with_event(
    user: AbstractBaseUser, field: str, message: str, by: EventUser
) -> AbstractBaseUser:
    """Save the one changed field and write the change's event, naming the user it was for."""
    user.save(update_fields=[field])
    event_write(
        category=Category.AUTH,
        message=message,
        user=by,
        details={"username": user.get_username()},
    )
    return user


@transaction.atomic
def user_password_set(*, user_id: int, password: str, by: EventUser) -> AbstractBaseUser:
    """Give a user a new password (Django's validators apply); their other sessions end.

    Changing the password hash invalidates every session made with the old one; the view keeps
    the acting administrator's own session when they reset their own password.
    """
    user = _user_locked(user_id)
    _password_check(password, user)
    user.set_password(password)
    return _saved_with_event(user, "password", f"Password of user {user.get_username()} reset", by)


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
    user_create("admin", password, administrator=True, check_password=False)
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
