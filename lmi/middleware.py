"""Security headers Django 5.2 does not set by itself; htmx login redirects; the read-only
configuration while a firmware install holds maintenance."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import resolve_url
from django.urls import Resolver404, resolve, reverse

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


# While an install holds the appliance in maintenance, these may still change things: the
# install itself (start is refused by its own service, abort by its phase), and signing in/out.
INSTALL_ALLOWED_URL_NAMES = frozenset(
    {
        "upgrades:install_start",
        "upgrades:install_abort",
        "accounts:login",
        "accounts:logout",
    }
)
INSTALL_ALLOWED_API = re.compile(r"^/api/v1/updates/install(?:/\d+/abort)?/?$")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class InstallMaintenanceMiddleware:
    """Configuration is read-only while a firmware install holds maintenance (phases 3-9 and a
    rollback): the install backs the configuration up in phase 5 and converts it in phase 8, so
    a change made meanwhile would be lost or, worse, half converted. Refused with a clear
    message (JSON 409 for the API, a message and a redirect back for pages), nothing changed.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method in UNSAFE_METHODS and not self._allowed(request.path_info):
            from upgrades import install_status

            run = install_status.active_run()
            if install_status.holds_maintenance(run):
                return self._refuse(request, run)
        return self.get_response(request)

    @staticmethod
    def _allowed(path: str) -> bool:
        if INSTALL_ALLOWED_API.match(path):
            return True
        try:
            match = resolve(path)
        except Resolver404:
            return False
        return match.view_name in INSTALL_ALLOWED_URL_NAMES

    @staticmethod
    def _refuse(request: HttpRequest, run: Any) -> HttpResponse:
        from django.contrib import messages

        page = reverse("upgrades:install_run", args=[run.pk])
        text = (
            f"The configuration is read-only while firmware {run.version} is being installed "
            f"(phase {run.phase} of 10): nothing was changed. Try again when the install has "
            f"finished."
        )
        if request.path_info.startswith("/api/"):
            return JsonResponse({"detail": text}, status=409)
        if request.headers.get("HX-Request") == "true":
            return HttpResponse(text, status=409, content_type="text/plain; charset=utf-8")
        messages.error(request, text)
        referer = urlsplit(request.headers.get("Referer", ""))
        same_site = referer.netloc == request.get_host() and referer.path.startswith("/")
        target = referer.path + (f"?{referer.query}" if referer.query else "")
        return HttpResponseRedirect(target if same_site else page)
