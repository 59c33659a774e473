"""Updates > Install > Return to the previous firmware (issue 18).

The Install page shows the way back while it is kept (``way_back``, returning.return_available,
in templates/upgrades/_return.html); the button opens a confirmation page saying what a return
does (GET), whose one button starts it (POST, administrators only). The return's progress is
the install run page, since a return is an install run going the other way.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from upgrades import install_status, returning, story
from upgrades.install_views import _confirm, _refused_for_read_only, start_run
from upgrades.models import InstallTrigger


def _start(request: HttpRequest) -> HttpResponse:
    if refused := _refused_for_read_only(request):
        return refused
    return start_run(
        request,
        lambda: returning.return_start(user=request.user, trigger=InstallTrigger.CONSOLE),
        refused="The return did not start",
        started="Returning to firmware",
        back="#return",
    )


@require_http_methods(["GET", "POST"])
def return_confirm(request: HttpRequest) -> HttpResponse:
    """GET: what a return does, with its checks; POST: start it."""
    if request.method == "POST":
        return _start(request)
    way = returning.return_available()
    checks = returning.return_preflight(way)
    failed = [check for check in checks if check.status == "fail"]
    refusal = ""
    if (active := install_status.active_run()) is not None:
        refusal = f"{active.label} is in progress: a return can start once it has ended."
    elif failed:
        refusal = "A return is not possible now: " + "; ".join(
            f"{check.title}: {check.value}" for check in failed
        )
    upgrade = way.upgrade
    downtime = next((c.value for c in checks if c.key == "downtime"), "about the install's")
    target = way.target or "the previous firmware"
    return _confirm(
        request,
        "Return",
        title=f"Return to firmware {target}",
        facts=[
            ("Running firmware", way.current or "—"),
            ("Return to", target),
            (
                "Upgraded",
                f"{story.when(upgrade.finished_at)} by {upgrade.requested_by or 'the system'}"
                if upgrade is not None
                else "—",
            ),
            ("Possible until", way.until_text if way.until else "—"),
            ("Expected downtime", downtime),
        ],
        consequences=[
            f"The appliance switches back to the previous system and runs firmware {target} "
            "again, in ten phases shown live like an install's.",
            f"The configuration goes back to what it was before the upgrade: changes made "
            f"since the upgrade to firmware {way.current or 'the newer firmware'} are lost "
            "(a configuration backup of them is taken first).",
            "Every message is kept, including the mail that arrived since the upgrade: the "
            "message store is converted back to the previous format while mail flows.",
            f"Mail is held (answered 421, senders retry) for about as long as during the "
            f"install ({downtime}); a failure rolls everything back to firmware "
            f"{way.current or 'the running firmware'} by itself.",
            f"Firmware {way.current or 'the newer firmware'} stays downloaded and can be "
            "installed again later.",
        ],
        refusal=refusal,
        action=reverse("upgrades:return_confirm"),
        button=f"Return to firmware {target}",
        testid="return-confirm",
        admin_does="returns to the previous firmware.",
    )
