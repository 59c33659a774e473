"""Login and logout pages, and System > Users.

Users changes are for administrators only (the read-only middleware refuses their POSTs earlier
too); each calls one service and says the outcome as a flash message. Changes that take
something away (a role, the right to log in) have a confirmation page first.
"""

from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, update_session_auth_hash
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.models import AbstractBaseUser
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import selectors, services
from accounts.forms import LoginForm, PasswordResetForm, RoleForm, UserCreateForm
from accounts.roles import ADMINISTRATOR, READ_ONLY, is_administrator, role_name
from lmi.actions import act, administrators_only


def _next_url(request: HttpRequest) -> str:
    candidate = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return settings.LOGIN_REDIRECT_URL


@login_not_required
@sensitive_post_parameters("password")
@csrf_protect
@never_cache
def login_view(request: HttpRequest) -> HttpResponse:
    """Show the login form; on POST try the credentials through the throttled service."""
    if request.user.is_authenticated:
        return redirect(_next_url(request))
    form = LoginForm(request.POST or None)
    error = ""
    status = 200
    if request.method == "POST" and form.is_valid():
        result = services.login_attempt(
            request, form.cleaned_data["username"], form.cleaned_data["password"]
        )
        if result.ok:
            return redirect(_next_url(request))
        error, status = result.message, 401
    return render(
        request,
        "accounts/login.html",
        {"form": form, "error": error, "next": _next_url(request)},
        status=status,
    )


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    """Log out (POST only, so a link or an image cannot end a session)."""
    services.logout_user(request)
    return redirect(settings.LOGOUT_REDIRECT_URL)


# --- System > Users --------------------------------------------------------------------------

USERS_PAGE = "accounts:users"
hides_passwords = sensitive_post_parameters("password", "password_again")


def _user_or_404(user_id: int) -> AbstractBaseUser:
    user = get_user_model().objects.filter(pk=user_id).first()
    if user is None:
        raise Http404("There is no such user.")
    return user


def _confirm_page(
    request: HttpRequest,
    target: AbstractBaseUser,
    change: str,
    breadcrumb: str,
    title: str,
    **confirm: object,
) -> HttpResponse:
    """A user change's confirmation page (templates/_confirm.html) with the user's facts.

    ``change`` names the change's view (``accounts:user_<change>``), which the button POSTs to;
    the button says what the title says.
    """
    facts = [
        ("User", target.get_username()),
        ("Role", role_name(target)),
        ("Status", "Enabled" if target.is_active else "Disabled"),
    ]
    page = {
        "title": title,
        "facts": facts,
        "action": reverse(f"accounts:user_{change}", args=[target.pk]),
        "button": title,
        "testid": f"{change}-confirm",
        "back": reverse(USERS_PAGE),
        "back_label": "Back to Users",
        "admin_does": "manages users.",
        **confirm,
    }
    return render(request, "_confirm.html", {"breadcrumb": breadcrumb, "confirm": page})


def _done(request: HttpRequest, action: Callable[[], object], message: str) -> HttpResponse:
    act(request, action, services.UserRefused, message)
    return redirect(USERS_PAGE)


def _user_form_page(
    request: HttpRequest, breadcrumb: str, form: forms.Form, target: AbstractBaseUser | None
) -> HttpResponse:
    """Add user and Reset password share one form page; a bound form shown again was refused."""
    return render(
        request,
        "accounts/user_form.html",
        {"breadcrumb": breadcrumb, "form": form, "target": target},
        status=400 if form.is_bound else 200,
    )


@require_GET
def users(request: HttpRequest) -> HttpResponse:
    """Every user with role, status and last login. Read-only users see the list (as they see
    every page) without the buttons; every change below is for administrators only."""
    return render(
        request,
        "accounts/users.html",
        {"breadcrumb": "System > Users", "users": selectors.users_list()},
    )


@hides_passwords
@require_http_methods(["GET", "POST"])
@administrators_only
def user_add(request: HttpRequest) -> HttpResponse:
    """Add user: a refused name or password re-renders the form with the reason by the field."""
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            user = services.user_create(
                data["username"],
                data["password"],
                administrator=data["role"] == ADMINISTRATOR,
                created_by=request.user,
            )
        except services.UserRefused as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            messages.success(request, f"User {user.get_username()} added ({data['role']}).")
            return redirect(USERS_PAGE)
    return _user_form_page(request, "System > Users > Add user", form, None)


@hides_passwords
@require_http_methods(["GET", "POST"])
@administrators_only
def user_password(request: HttpRequest, user_id: int) -> HttpResponse:
    """Reset password: the administrator gives the user a new one (never shown or logged)."""
    target = _user_or_404(user_id)
    form = PasswordResetForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.user_password_set(
                user_id=target.pk, password=form.cleaned_data["password"], by=request.user
            )
        except services.UserRefused as exc:
            form.add_error("password", str(exc))
        else:
            if user.pk == request.user.pk:
                update_session_auth_hash(request, user)  # keep the administrator logged in
            messages.success(request, f"Password of {user.get_username()} reset.")
            return redirect(USERS_PAGE)
    return _user_form_page(request, "System > Users > Reset password", form, target)


@require_http_methods(["GET", "POST"])
@administrators_only
def user_role(request: HttpRequest, user_id: int) -> HttpResponse:
    """Change role: GET confirms the other role (and refuses a lock-out), POST role=... sets it."""
    target = _user_or_404(user_id)
    if request.method == "POST":
        form = RoleForm(request.POST)
        if not form.is_valid():
            return HttpResponseBadRequest("Choose a role: Administrator or Read-only.")
        role = form.cleaned_data["role"]
        return _done(
            request,
            lambda: services.user_set_role(user_id=target.pk, role=role, by=request.user),
            f"User {target.get_username()} is now {role}.",
        )
    name = target.get_username()
    if is_administrator(target):
        role = READ_ONLY
        consequences = [
            f"{name} can still open every page, but can no longer change anything.",
            "This applies from their next request; they stay logged in.",
        ]
        refusal = services.user_lockout_refusal(target, request.user)
    else:
        role = ADMINISTRATOR
        consequences = [
            f"{name} may change everything: configuration, backups and restores, firmware "
            "installs, the cluster, and users.",
            "This applies from their next request; they stay logged in.",
        ]
        refusal = None
    return _confirm_page(
        request,
        target,
        "role",
        "System > Users > Change role",
        f"Make {name} {role}",
        consequences=consequences,
        refusal=refusal,
        fields=[("role", role)],
        button_class="primary",
    )


@require_http_methods(["GET", "POST"])
@administrators_only
def user_disable(request: HttpRequest, user_id: int) -> HttpResponse:
    """Disable: GET says what it does (and refuses a lock-out), POST disables."""
    return _login_change(request, user_id, enable=False)


@require_http_methods(["GET", "POST"])
@administrators_only
def user_enable(request: HttpRequest, user_id: int) -> HttpResponse:
    """Enable: GET says what it does, POST enables."""
    return _login_change(request, user_id, enable=True)


def _login_change(request: HttpRequest, user_id: int, *, enable: bool) -> HttpResponse:
    """Disable and Enable are one change, the right to log in, in either direction."""
    target = _user_or_404(user_id)
    name = target.get_username()
    verb = "Enable" if enable else "Disable"
    change = verb.lower()
    if request.method == "POST":
        service = services.user_enable if enable else services.user_disable
        return _done(
            request,
            lambda: service(user_id=target.pk, by=request.user),
            f"User {name} {change}d.",
        )
    if enable:
        consequences = [
            f"{name} can log in again with the password and the role ({role_name(target)}) "
            "they had.",
        ]
        refusal = None
    else:
        consequences = [
            f"{name} can no longer log in; a session open now ends at its next request.",
            f"API tokens of {name} stop working.",
            "The account, its role and its events stay: enable it again at any time.",
        ]
        refusal = services.user_lockout_refusal(target, request.user) if target.is_active else None
    return _confirm_page(
        request,
        target,
        change,
        f"System > Users > {verb} user",
        f"{verb} {name}",
        consequences=consequences,
        refusal=refusal,
        button_class="primary" if enable else "danger",
    )
