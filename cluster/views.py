"""Cluster page: role, this node, Central, the members (and removing one), join tokens,
"Upgrade cluster".

Views parse, call one service and render or redirect. Changes are for administrators only.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.roles import READ_ONLY_REFUSAL, is_administrator
from cluster import member_services, plumbing, rolling, schedule, selectors, services
from cluster.forms import JoinForm
from lmi.actions import act, administrators_only
from upgrades.schedule_views import schedule_context


def _context(request: HttpRequest, **extra: object) -> dict[str, object]:
    return {
        "breadcrumb": "Cluster",
        "overview": selectors.cluster_overview(),
        "join_form": JoinForm(),
        **extra,
    }


def _page(request: HttpRequest, **extra: object) -> dict[str, object]:
    """The whole page: the status, and on Central with members "Upgrade the cluster at"
    (upgrades' schedule partial, posting to upgrades' schedule views with its kind)."""
    if schedule.rolling_schedulable():
        extra.update(schedule_context(schedule.ROLLING_UPGRADE))
    return _context(request, **extra)


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "cluster/index.html", _page(request))


@never_cache
@require_GET
def progress(request: HttpRequest) -> HttpResponse:
    """The members and the rolling upgrade alone; htmx polls it while an upgrade runs."""
    return render(request, "cluster/_status.html", _context(request))


@require_POST
@administrators_only
def token_create(request: HttpRequest) -> HttpResponse:
    """Create a join token and show it once (it is stored hashed)."""
    try:
        row, token = services.join_token_create(user=request.user)
    except plumbing.ClusterError as exc:
        messages.error(request, str(exc))
        return redirect("cluster:index")
    return render(request, "cluster/index.html", _page(request, new_token=token, token_row=row))


@require_POST
@administrators_only
def join(request: HttpRequest) -> HttpResponse:
    """A member joins Cluster Central with a token."""
    form = JoinForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Enter the join token created on Cluster Central.")
        return redirect("cluster:index")
    act(
        request,
        lambda: member_services.cluster_join_request(
            token=form.cleaned_data["token"], user=request.user
        ),
        plumbing.ClusterError,
        lambda link: f"Asked Cluster Central {link.central} to accept this node.",
    )
    return redirect("cluster:index")


@require_http_methods(["GET", "POST"])
def upgrade(request: HttpRequest) -> HttpResponse:
    """Upgrade cluster: GET is the confirmation (which nodes, in which order), POST starts it:
    Central first, then each member in sequence."""
    if request.method == "POST":
        if not is_administrator(request.user):
            return HttpResponseForbidden(READ_ONLY_REFUSAL)
        try:
            started = rolling.cluster_upgrade_start(user=request.user)
        except plumbing.ClusterError as exc:
            messages.error(request, str(exc))
        else:
            if started.state == "stopped":
                messages.error(request, f"The cluster upgrade stopped: {started.error}")
            else:
                messages.success(request, f"Upgrading the cluster to {started.version}.")
        return redirect("cluster:index")
    overview = selectors.cluster_overview()
    target = overview["target_version"]
    upgrade_running = bool(overview["upgrade"]) and overview["upgrade"]["state"] == "running"
    refusal = ""
    if overview["role"] != "central":
        refusal = "Only Cluster Central upgrades the cluster."
    elif upgrade_running:
        refusal = "A cluster upgrade is running already."
    elif not target:
        refusal = "There is nothing to upgrade to: no firmware newer than a node runs is ready."
    nodes = [(overview["node"], "Cluster Central", overview["firmware_version"] or "—")] + [
        (m["node"], "Member", m["firmware_version"] or "—") for m in overview["members"]
    ]
    confirm = {
        "title": f"Upgrade the cluster to firmware {target}" if target else "Upgrade the cluster",
        "facts": [
            (
                f"{n}. {node} ({role})",
                f"runs {version}{' (already on it)' if version == target else ''}",
            )
            for n, (node, role, version) in enumerate(nodes, start=1)
        ],
        "consequences": [
            f"Each node not on firmware {target} yet installs it, in the order above: Cluster "
            "Central first, then each member, each waiting until the previous one runs the new "
            "firmware and is healthy.",
            "During its install each node holds mail for a few minutes (senders retry) and its "
            "configuration is read-only.",
            "The first failure stops the upgrade: that node rolls back by itself, and the "
            "nodes after it are not touched.",
        ],
        "refusal": refusal,
        "action": reverse("cluster:upgrade"),
        "button": f"Upgrade cluster to {target}",
        "button_class": "primary",
        "testid": "upgrade-cluster-confirm",
        "back": reverse("cluster:index"),
        "back_label": "Back to Cluster",
        "admin_does": "upgrades the cluster.",
    }
    return render(
        request, "_confirm.html", {"breadcrumb": "Cluster > Upgrade cluster", "confirm": confirm}
    )


@require_http_methods(["GET", "POST"])
def member_remove(request: HttpRequest, node: str) -> HttpResponse:
    """Remove a member: GET is the confirmation (what will happen), POST removes.

    Anyone signed in may read the confirmation; only an administrator sees the button, and a
    POST from anyone else is 403, as on every other change.
    """
    if request.method == "POST":
        if not is_administrator(request.user):
            return HttpResponseForbidden(READ_ONLY_REFUSAL)
        act(
            request,
            lambda: services.member_remove(node=node, user=request.user),
            plumbing.ClusterError,
            f"Removed {node} from the cluster: it must join again with a new token.",
        )
        return redirect("cluster:index")
    member = selectors.member_for_removal(node)
    if member is None:
        raise Http404(f"{node} is not a member of this cluster.")
    return render(
        request,
        "cluster/remove.html",
        {"breadcrumb": "Cluster > Remove member", "member": member},
    )
