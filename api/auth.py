"""Who may call the API: a session (with CSRF on unsafe methods) or a bearer token.

A token acts as its user, with the user's role. Read-only users, by session or by token, may
only read: the console's ReadOnlyRoleMiddleware refuses a read-only session user's unsafe
request, and TokenAuth applies the same rule (accounts.roles.role_permits_request) to a token
user before any API view runs. Views still call require_administrator as defence in depth.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja.errors import HttpError
from ninja.security import HttpBearer, SessionAuth

from accounts.roles import READ_ONLY_REFUSAL, is_administrator, role_permits_request
from accounts.services import api_token_user


class TokenAuth(HttpBearer):
    """``Authorization: Bearer lmi_…``; the request then runs as the token's user."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = api_token_user(token)
        if user is None:
            return None
        # Raised here, the 403 goes through the API's error handling and no view runs.
        if not role_permits_request(user, request.method, request.path):
            raise HttpError(403, READ_ONLY_REFUSAL)
        request.user = user
        return user


AUTH = [TokenAuth(), SessionAuth()]


def require_administrator(request: HttpRequest) -> None:
    """Refuse a change from a read-only user with 403, whichever way they authenticated."""
    if not is_administrator(request.auth):  # type: ignore[attr-defined]
        raise HttpError(403, READ_ONLY_REFUSAL)


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
            if not role_permits_request(user, request.method, request.path):
                return JsonResponse({"detail": READ_ONLY_REFUSAL}, status=403)
            request.user = user
        return view(request, *args, **kwargs)

    return wrapped
