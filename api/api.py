"""The API object and the routes of the foundation: who am I, system, resources, events.

Later features add routers here (``api.add_router``) so that /api/v1/openapi.json always
describes the whole API.
"""

from __future__ import annotations

from django.http import HttpRequest
from ninja import NinjaAPI, Query, Schema, Status
from ninja.errors import HttpError

from accounts.roles import role_name
from api.auth import AUTH, docs_access
from api.schemas import EventOut, EventPageOut, MeOut, Problem, ResourcesOut, SystemOut
from appliance import network
from appliance.errors import ApplianceError
from appliance.system import system_info
from events.forms import EventQueryForm
from events.models import Severity
from events.selectors import event_page
from home import selectors

api = NinjaAPI(
    title="LMI API",
    version="1",
    description="The JSON API of the Lotus Protector Manager console. Authenticate with the "
    "console's session (send X-CSRFToken on changes) or 'Authorization: Bearer <token>' "
    "(manage.py api_token USER). Read-only users can only read.",
    auth=AUTH,
    urls_namespace="api-v1",
    # The interactive docs page loads Swagger UI from a CDN, which the console's CSP (and an
    # appliance without Internet access) would refuse; the description itself is served.
    docs_url=None,
    docs_decorator=docs_access,
)
api.add_router("/updates", "upgrades.api.router")
api.add_router("/cluster", "cluster.api.router")
api.add_router("/backups", "backups.api.router")
SEVERITY_TOKENS = {int(level): level.name.lower() for level in Severity}


@api.get("/me", response=MeOut, tags=["console"])
def me(request: HttpRequest) -> dict[str, str]:
    """The user the call runs as, and their role."""
    return {"username": request.auth.get_username(), "role": role_name(request.auth)}


@api.get("/system", response={200: SystemOut, 503: Problem}, tags=["home"])
def system(request: HttpRequest):
    """Home > System: firmware level, operating system, host, uptime, network per interface."""
    try:
        info = system_info()
        interfaces = network.list_interfaces()
    except ApplianceError as exc:
        return Status(503, {"detail": str(exc)})
    host = selectors.host_figures()
    return {
        **info.__dict__,
        "uptime_seconds": host.uptime_seconds,
        "interfaces": [iface.__dict__ for iface in interfaces],
    }


@api.get("/resources", response=ResourcesOut, tags=["home"])
def resources(request: HttpRequest) -> dict[str, object]:
    """Home > Resources: the upgrade disks against the 50% rule, memory, CPU, load."""
    host = selectors.host_figures()
    disks = selectors.upgrade_disks()
    return {
        "required_free_percent": selectors.UPGRADE_FREE_PERCENT,
        "disks": [
            {
                **disk.__dict__,
                "free_percent": round(disk.free_percent, 2),
                "meets_upgrade_requirement": disk.meets_upgrade_requirement,
            }
            for disk in disks
        ],
        "memory_total": host.memory_total,
        "memory_used": host.memory_used,
        "memory_percent": host.memory_percent,
        "cpu_count": host.cpu_count,
        "cpu_percent": host.cpu_percent,
        "load": [host.load_1, host.load_5, host.load_15],
    }


class EventQuery(Schema):
    """The same filters as System > Events (and the same validation)."""

    severity: str = ""
    category: str = ""
    period: str = ""
    since: str = ""
    until: str = ""
    q: str = ""
    after: str = ""
    before: str = ""
    limit: int = 50


@api.get("/events", response={200: EventPageOut, 400: Problem}, tags=["system"])
def events(request: HttpRequest, query: Query[EventQuery]):
    """System > Events, newest first, one keyset page at a time (follow ``older``)."""
    form = EventQueryForm({k: v for k, v in query.dict().items() if v not in ("", None)})
    if not form.is_valid():
        problems = [str(e) for errors in form.errors.values() for e in errors]
        raise HttpError(400, " ".join(problems))
    page = event_page(
        form.event_filter(),
        after=form.cleaned_data["after"],
        before=form.cleaned_data["before"],
        limit=form.cleaned_data["limit"],
    )
    return {
        "events": [
            EventOut(
                id=e.id,
                created_at=e.created_at,
                severity=SEVERITY_TOKENS.get(e.severity, str(e.severity)),
                category=e.category,
                node=e.node,
                username=e.username,
                message=e.message,
                details=e.details,
            )
            for e in page.events
        ],
        "older": page.older.encode() if page.older else None,
        "newer": page.newer.encode() if page.newer else None,
    }
