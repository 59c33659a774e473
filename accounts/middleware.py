"""Read-only users cannot change anything: refuse their unsafe requests before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden

from accounts.roles import is_administrator

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Paths a read-only user may still POST to: ending their own session.
READ_ONLY_POST_ALLOWED = ("/accounts/logout/",)


class ReadOnlyRoleMiddleware:
    """Defence in depth: views check the role too, but no unsafe request of a read-only user
    reaches a view even if one forgets to."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = request.user
        if (
            request.method not in SAFE_METHODS
            and user.is_authenticated
            and not is_administrator(user)
            and request.path not in READ_ONLY_POST_ALLOWED
        ):
            return HttpResponseForbidden(
                "Your account is read-only: ask an administrator to make this change."
            )
        return self.get_response(request)
