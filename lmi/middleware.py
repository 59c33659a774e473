"""Security headers Django 5.2 does not set by itself."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import resolve_url

# Pages load scripts and styles only from our own origin: no inline script anywhere, so a
# stored string in an event message can never run as code even if escaping failed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"


class SecurityHeadersMiddleware:
    """Adds Content-Security-Policy, Permissions-Policy and no-store for logged-in pages."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        if getattr(request, "user", None) is not None and request.user.is_authenticated:
            # Appliance state must not linger in shared browser or proxy caches.
            response.setdefault("Cache-Control", "no-store")
        return response


class HtmxLoginRedirectMiddleware:
    """An expired session must not swap the login page into a polled table.

    htmx follows a redirect inside its XMLHttpRequest and would place the login form where the
    partial was; for htmx requests we answer with HX-Redirect instead, which makes the browser
    go to the login page, coming back afterwards to the page (not the partial) it was showing.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.headers.get("HX-Request") != "true" or response.status_code != 302:
            return response
        login_url = resolve_url(settings.LOGIN_URL)
        if not response["Location"].startswith(login_url):
            return response
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        same_site = not current.netloc or current.netloc == request.get_host()
        page = current.path if same_site and current.path.startswith("/") else "/"
        if current.query and same_site:
            page += "?" + current.query
        redirect = HttpResponse(status=200)
        redirect["HX-Redirect"] = f"{login_url}?{urlencode({'next': page})}"
        return redirect
