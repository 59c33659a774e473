"""The console's error pages (400, 403, 404, 500), in the console's own layout.

A person who meets an error should still be in the console: the same top bar and menu, what
happened in plain words, and a way back (Home, and the page they came from when it is known).
The API under /api/ answers in JSON instead, as its own operations do (``{"detail": ...}``),
so a client never has to parse an HTML page. The 500 page renders without a request context:
the database or a context processor may be what failed.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from django.core.exceptions import DisallowedHost, PermissionDenied
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseForbidden,
    HttpResponseNotFound,
    HttpResponseServerError,
    JsonResponse,
)
from django.template import loader
from django.utils.http import url_has_allowed_host_and_scheme

from accounts.roles import READ_ONLY_REFUSAL, is_administrator

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"
NOT_FOUND = "There is no page at this address."
BAD_REQUEST = "The console could not understand this request."
FORBIDDEN = "This page or action is not open to your account."
SERVER_ERROR = "Something went wrong in the console while it handled this request."

# The last resort when even the 500 template cannot be rendered (a broken base template).
BARE_SERVER_ERROR = (
    "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Server error · LMI</title>"
    "</head><body><h1>Server error</h1><p>" + SERVER_ERROR + "</p><p><a href='/home/'>Home</a>"
    "</p></body></html>"
)


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def _previous_page(request: HttpRequest) -> str | None:
    """The page the person came from, if it is one of ours and not this very page."""
    referer = request.headers.get("Referer", "")
    if not referer:
        return None
    try:
        host = request.get_host()
    except DisallowedHost:  # the very reason for a 400: no host to compare with
        return None
    if not url_has_allowed_host_and_scheme(
        referer, allowed_hosts={host}, require_https=request.is_secure()
    ):
        return None
    if request.method in ("GET", "HEAD") and urlsplit(referer).path == request.path:
        return None  # a link to this very page; after a refused POST it is the way back
    return referer


def _exception_text(exception: Exception | None) -> str:
    """The message a view gave its exception, if it gave one meant for people."""
    if exception is None or not exception.args:
        return ""
    text = exception.args[0]
    return text if isinstance(text, str) else ""


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """400: a request the console cannot read (a bad Host header, a broken upload)."""
    if _is_api(request):
        return JsonResponse({"detail": BAD_REQUEST}, status=400)
    context = {"previous_page": _previous_page(request)}
    return HttpResponseBadRequest(loader.render_to_string("400.html", context, request))


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """403: for a read-only account this says so, with what the view gave as the reason."""
    user = getattr(request, "user", None)
    read_only = bool(user is not None and user.is_authenticated and not is_administrator(user))
    reason = _exception_text(exception) or (READ_ONLY_REFUSAL if read_only else FORBIDDEN)
    if _is_api(request):
        return JsonResponse({"detail": reason}, status=403)
    context = {
        "reason": reason,
        "read_only": read_only,
        "previous_page": _previous_page(request),
    }
    return HttpResponseForbidden(loader.render_to_string("403.html", context, request))


def read_only_refusal(request: HttpRequest) -> HttpResponse:
    """The 403 for a read-only user's change, as a response rather than an exception, so the
    role's middleware and views decorated as administrators-only return it directly."""
    return permission_denied(request, PermissionDenied(READ_ONLY_REFUSAL))


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """404: no such page (a mistyped address, or a backup or member that is gone)."""
    if _is_api(request):
        return JsonResponse({"detail": f"Nothing is served at {request.path}."}, status=404)
    context = {"path": request.path, "previous_page": _previous_page(request)}
    return HttpResponseNotFound(loader.render_to_string("404.html", context, request))


def server_error(request: HttpRequest) -> HttpResponse:
    """500: rendered without context processors (no menus, no user), since the database or a
    processor may be what failed; the traceback is in the server's log, not on the page."""
    if _is_api(request):
        return JsonResponse({"detail": SERVER_ERROR}, status=500)
    context = {"previous_page": _previous_page(request)}
    try:
        body = loader.get_template("500.html").render(context)
    except Exception:
        logger.exception("the 500 page could not be rendered")
        body = BARE_SERVER_ERROR
    return HttpResponseServerError(body)
