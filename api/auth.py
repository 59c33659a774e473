"""Who may call the API: a session (with CSRF on unsafe methods) or a bearer token.

A token acts as its user, with the user's role. Read-only users, by session or by token, may
only read: the console's ReadOnlyRoleMiddleware sees session users only, so writes check the
role here as well.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja.errors import HttpError
from ninja.security import HttpBearer, SessionAuth

from accounts.roles import is_administrator
from accounts.services import api_token_user


class TokenAuth(HttpBearer):
    """``Authorization: Bearer lmi_…``; the request then runs as the token's user."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = api_token_user(token)
        if user is not None:
            request.user = user
        return user


AUTH = [TokenAuth(), SessionAuth()]


def require_administrator(request: HttpRequest) -> None:
    """Refuse a change from a read-only user with 403, whichever way they authenticated."""
    if not is_administrator(request.auth):  # type: ignore[attr-defined]
        raise HttpError(403, "Your account is read-only: ask an administrator to make this change.")


def docs_access(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """The OpenAPI description also needs a login (a session or a token), never a redirect."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            user = api_token_user(token) if scheme.lower() == "bearer" and token else None
            if user is None:
                return JsonResponse({"detail": "Unauthorized"}, status=401)
            request.user = user
        return view(request, *args, **kwargs)

    return wrapped
