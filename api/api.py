"""The API object and the routes of the foundation: who am I, system, resources, events.

Later features add routers here (``api.add_router``) so that /api/v1/openapi.json always
describes the whole API.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.log import log_response
from ninja import NinjaAPI, Query, Schema, Status
from ninja.errors import HttpError, ValidationError
from ninja.openapi.schema import OpenAPISchema

from accounts.roles import role_name
from api.auth import AUTH, docs_access
from api.schemas import EventOut, EventPageOut, MeOut, Problem, ResourcesOut, SystemInfoOut
from appliance.system import network
from appliance.system.errors import ApplianceError
from appliance.system.facts import system_info
from events.forms import EventQueryForm
from events.models import Severity
from events.selectors import event_page
from home import selectors

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
UNEXPECTED_ERROR = "The console could not complete this request; the reason is in its log."


def shared_errors(method: str, operation: dict[str, Any]) -> dict[int, str]:
    """The errors the API's machinery can give one operation, whatever the operation itself
    documents: what each status means for a client."""
    errors: dict[int, str] = {}
    if "parameters" in operation or "requestBody" in operation:
        errors[400] = "A parameter or the body is not what the operation takes; detail says which."
    if operation.get("security"):
        errors[401] = "Neither a console session nor a valid API token came with the request."
    if method != "get":
        # Every change checks the role (api.auth.require_administrator) and a session's CSRF.
        errors[403] = "A read-only account asked for a change, or a session's change had no CSRF."
    return errors


class ConsoleAPI(NinjaAPI):
    """The API whose description lists, on every operation, the errors all operations share.

    Operations document the refusals of their own (404, 409, ...) in ``response=``; the ones
    that come from the API's machinery would otherwise be missing from every one of them.
    """

    def get_openapi_schema(
        self, *, path_prefix: str | None = None, path_params: dict[str, Any] | None = None
    ) -> OpenAPISchema:
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", Problem.model_json_schema())
        for operations in schema["paths"].values():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                for status, description in shared_errors(method, operation).items():
                    if status not in responses:
                        responses[status] = {
                            "description": description,
                            "content": {"application/json": {"schema": PROBLEM_REF}},
                        }
        return schema


api = ConsoleAPI(
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


@api.exception_handler(ValidationError)
def unreadable_request(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    """A parameter or body that does not fit the operation: 400 and one sentence per field.

    Ninja's own answer is 422 with pydantic's list; every other error of this API is a
    ``Problem`` (a ``detail`` sentence), and a malformed request is a 400 on the pages too.
    """
    problems = []
    for error in exc.errors:
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        problems.append(f"{where}: {error.get('msg', 'is not valid')}.")
    return api.create_response(request, {"detail": " ".join(problems)}, status=400)


@api.exception_handler(Exception)
def unexpected_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    """A bug or an outage: JSON 500, never Django's HTML error page, and the traceback logged.

    Ninja re-raises unhandled exceptions to Django, whose answer is an HTML page an API client
    cannot read. Logged as Django logs its own 500s (marking the response as logged, so it is
    not logged twice).
    """
    response = api.create_response(request, {"detail": UNEXPECTED_ERROR}, status=500)
    log_response(
        "Internal Server Error: %s", request.path, response=response, request=request, exception=exc
    )
    return response


@api.get("/me", response=MeOut, tags=["console"])
def me(request: HttpRequest) -> dict[str, str]:
    """The user the call runs as, and their role."""
    return {"username": request.auth.get_username(), "role": role_name(request.auth)}


@api.get("/system", response={200: SystemInfoOut, 503: Problem}, tags=["home"])
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
    """System > Events, newest first, one keyset page at a time (follow ``older``).

    A filter the page would refuse (a time outside the years 0001-01-02 to 9999-12-30, a
    damaged cursor, a page size out of range) is a 400 with the page's message.
    """
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
