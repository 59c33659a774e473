"""Read-only users cannot change anything: refuse their unsafe requests before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from accounts.roles import role_permits_request
from lmi.errors import read_only_refusal


class ReadOnlyRoleMiddleware:
    """Defence in depth: views check the role too, but no unsafe request of a read-only user
    reaches a view even if one forgets to.

    Only session users are known here; API token users meet the same rule in api.auth.TokenAuth,
    which runs before any API view.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not role_permits_request(request.user, request.method, request.path):
            return read_only_refusal(request)  # the console's 403 page; JSON under /api/
        return self.get_response(request)
