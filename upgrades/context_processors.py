"""The install in progress, on every page of the console.

Unlike the original, nothing forbids using the console during an upgrade; so every logged-in
page says that one is running (and, from phase 3, that configuration is read-only), with a link
to its progress, in every session.
"""

from __future__ import annotations

from django.http import HttpRequest

from upgrades import install_status
from upgrades.models import InstallRun


def install_banner(request: HttpRequest) -> dict[str, object]:
    """``install_banner_run``: the active install run for logged-in users, else None."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"install_banner_run": None}
    match = getattr(request, "resolver_match", None)
    if match is not None and match.view_name == "upgrades:install_run":
        # The progress page shows the run live; a banner loaded once would only lag behind it.
        return {"install_banner_run": None}
    run = install_status.active_run()
    context = banner_context(run)
    read_only = context["install_banner_read_only"]
    if run is None:  # issue 18: a scheduled install, in every session
        from upgrades.schedule import schedule_banner

        context["install_banner_schedule"] = schedule_banner()
    if read_only:
        # The pages render as for a read-only user, matching InstallMaintenanceMiddleware,
        # which refuses every change meanwhile: no form offers what would be refused.
        context["can_change"] = False
    return context


def banner_context(run: InstallRun | None, after: int | None = None) -> dict[str, object]:
    """The banner's own context for ``run`` (the active install or None): every page's, and
    the watch poll's (:func:`upgrades.install_views.install_banner_watch`). With no run, the
    slot keeps watching for a run newer than ``after`` (the newest when the page was made),
    so a page loaded before an install began learns of it, even of one that began and ended
    between two looks."""
    context: dict[str, object] = {
        "install_banner_run": run,
        "install_banner_read_only": install_status.holds_maintenance(run),
        "install_banner_watch": run is None,
    }
    if run is None:
        newest = InstallRun.objects.order_by("-pk").first()
        newest_pk = newest.pk if newest is not None else 0
        if after is not None and newest_pk > after:
            context["install_banner_ended"] = newest
        context["install_banner_after"] = newest_pk if after is None else after
    return context
