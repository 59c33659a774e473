"""Mail Security pages: Policy Objects, Message Stores, Message Tracking / Reporting, and the
reclaim planner with the live status of the retention purge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from accounts.roles import is_administrator
from appliance.config.store import read_smtp_settings
from appliance.mail import tracking
from appliance.mail.quarantine import QuarantinedCopy
from appliance.mail.retention import StoreRetention
from appliance.system.errors import ApplianceError
from mailsecurity import selectors, services
from mailsecurity.forms import (
    MAX_MESSAGE_ID,
    TRACKING_FILTER_PARAMS,
    LogRetentionForm,
    QuarantineActionForm,
    ReclaimApplyForm,
    StoreRetentionForm,
    TrackingQueryForm,
)
from mailsecurity.models import PurgeTrigger

READ_ONLY_MESSAGE = "Your account is read-only: ask an administrator to make this change."


def refuse_read_only(request: HttpRequest) -> HttpResponse | None:
    """The middleware refuses read-only POSTs already; views check too (defence in depth)."""
    if request.method == "POST" and not is_administrator(request.user):
        return HttpResponseForbidden(READ_ONLY_MESSAGE)
    return None


def disk_context() -> dict[str, object]:
    """The message store's disk against the 50% rule, for the notice on the retention pages."""
    disk = selectors.msgstore_disk()
    return {"store_disk": disk, "required_percent": selectors.UPGRADE_FREE_PERCENT}


def purge_context(loaded_at: str | None = None) -> dict[str, object]:
    """The purge panel; loaded_at is when the page around it was rendered, so that a purge
    finishing after that offers to reload the page's own figures."""
    now = timezone.now()
    try:
        loaded = datetime.fromisoformat(loaded_at) if loaded_at else now
    except ValueError:
        loaded = now
    if timezone.is_naive(loaded):
        loaded = now
    purge = selectors.purge_latest()
    trigger = purge.trigger if purge else ""
    return {
        "purge": purge,
        "purge_trigger": PurgeTrigger(trigger).label if trigger in PurgeTrigger else trigger,
        "loaded_at": loaded,
        "loaded_at_iso": loaded.isoformat(),
    }


def retention_saved(request: HttpRequest, result: services.RetentionResult) -> None:
    """Tell the administrator what was saved and what the purge does about it."""
    if not result.changes:
        messages.info(request, "Nothing changed.")
        return
    for change in result.changes:
        messages.success(
            request,
            f"{change.label}: retention changed from {services.days_text(change.old_days)} to "
            f"{services.days_text(change.new_days)}.",
        )
    if result.purge is not None and result.purge_created:
        messages.success(
            request, "A retention purge has started; its progress is shown on this page."
        )
    elif result.purge is not None:
        messages.info(
            request,
            "A retention purge is already running; it will purge again with the new retention "
            "before it finishes.",
        )


@require_GET
def policy_objects(request: HttpRequest) -> HttpResponse:
    """Mail Security > Policy Objects: every object, and the files $(FILE) macros read."""
    context: dict[str, object] = {"breadcrumb": "Mail Security > Policy Objects"}
    try:
        rows = selectors.policy_object_rows()
        context.update(
            {
                "objects": rows,
                "macro_objects": [row for row in rows if row.file_path is not None],
            }
        )
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
    return render(request, "mailsecurity/policy_objects.html", context)


@require_http_methods(["GET", "POST"])
def message_stores(request: HttpRequest) -> HttpResponse:
    """Mail Security > Policy Objects > Message Stores: size, count, oldest, retention."""
    if refused := refuse_read_only(request):
        return refused
    context: dict[str, object] = {
        "breadcrumb": "Mail Security > Policy Objects > Message Stores",
        **disk_context(),
        **purge_context(),
    }
    try:
        stores = selectors.message_stores()
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
        return render(request, "mailsecurity/message_stores.html", context)
    retentions = [StoreRetention(s.id, s.name, s.retention_days) for s in stores]
    status = 200
    if request.method == "POST":
        form = StoreRetentionForm(retentions, request.POST)
        if form.is_valid():
            result = services.retention_apply(form.values(), user=request.user)
            retention_saved(request, result)
            return redirect("mailsecurity:message_stores")
        status = 400
    else:
        form = StoreRetentionForm(retentions)
    context["rows"] = [
        {"store": store, "field": form[services.store_key(store.id)]} for store in stores
    ]
    context["form"] = form
    return render(request, "mailsecurity/message_stores.html", context, status=status)


def _tracking_params(
    request: HttpRequest, limit: int = tracking.PAGE_SIZE
) -> list[tuple[str, str]]:
    params = [(name, request.GET[name]) for name in TRACKING_FILTER_PARAMS if request.GET.get(name)]
    if limit != tracking.PAGE_SIZE:
        params.append(("limit", str(limit)))
    return params


def _tracking_url(params: list[tuple[str, str]], **extra: tracking.Position) -> str:
    pairs = params + [(name, position.encode()) for name, position in extra.items()]
    return reverse("mailsecurity:message_tracking") + ("?" + urlencode(pairs) if pairs else "")


def _local_input(value: object) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%dT%H:%M:%S") if value else ""  # type: ignore[arg-type]


@require_http_methods(["GET", "POST"])
def message_tracking(request: HttpRequest) -> HttpResponse:
    """Mail Security > Policy > Message Tracking / Reporting: the log's retention and a search
    of it, filters in the URL, one keyset page at a time."""
    if refused := refuse_read_only(request):
        return refused
    context: dict[str, object] = {
        "breadcrumb": "Mail Security > Policy > Message Tracking / Reporting",
        **disk_context(),
        **purge_context(),
    }
    status = 200
    try:
        log = selectors.log_retention(services.TRACKING_LOG)
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
        return render(request, "mailsecurity/message_tracking.html", context)
    if request.method == "POST":
        retention_form = LogRetentionForm(request.POST)
        if retention_form.is_valid():
            days = retention_form.cleaned_data["retention_days"]
            result = services.retention_apply({services.TRACKING_LOG: days}, user=request.user)
            retention_saved(request, result)
            return redirect(request.get_full_path())
        status = 400
    else:
        retention_form = LogRetentionForm(initial={"retention_days": log.retention_days})
    query = TrackingQueryForm(request.GET)
    context.update(
        {
            "log": log,
            "retention_form": retention_form,
            "query": query,
            "since_value": request.GET.get("since", ""),
            "until_value": request.GET.get("until", ""),
            "clear_url": reverse("mailsecurity:message_tracking"),
        }
    )
    if not query.is_valid():
        context["newest_url"] = _tracking_url(_tracking_params(request))
        return render(request, "mailsecurity/message_tracking.html", context, status=400)
    limit = query.cleaned_data["limit"]
    params = _tracking_params(request, limit)
    page = selectors.tracking_page(
        query.tracking_filter(),
        after=query.cleaned_data["after"],
        before=query.cleaned_data["before"],
        limit=limit,
    )
    context.update(
        {
            "page": page,
            "since_value": _local_input(query.cleaned_data["since"]),
            "until_value": _local_input(query.cleaned_data["until"]),
            "time_zone": timezone.get_current_timezone_name(),
            "newest_url": _tracking_url(params),
            "older_url": page.older and _tracking_url(params, after=page.older),
            "searched_to_at": page.searched_to
            and datetime.fromtimestamp(page.searched_to.logged_at, tz=UTC),
            "newer_url": page.newer and _tracking_url(params, before=page.newer),
            "this_url": request.get_full_path(),
            "selectable": any(entry.stored for entry in page.entries),
        }
    )
    return render(request, "mailsecurity/message_tracking.html", context, status=status)


# --- Quarantine: a stored message, its release and deletion ----------------------------------

MESSAGE_BREADCRUMB = "Mail Security > Policy > Message Tracking / Reporting > Message"


def _not_stored(request: HttpRequest, message_id: int) -> HttpResponse:
    return render(
        request,
        "mailsecurity/message_gone.html",
        {"breadcrumb": MESSAGE_BREADCRUMB, "message_number": message_id},
        status=404,
    )


@require_GET
def message_detail(request: HttpRequest, message_id: int) -> HttpResponse:
    """One quarantined message: headers, verdicts, store, dates, and (administrators) its
    Release and Delete buttons; a message purged or deleted meanwhile is a 404 that says so."""
    if message_id > MAX_MESSAGE_ID:
        return _not_stored(request, message_id)
    try:
        detail = selectors.message_detail(message_id)
    except ApplianceError as exc:
        return render(
            request,
            "mailsecurity/message_detail.html",
            {"breadcrumb": MESSAGE_BREADCRUMB, "appliance_error": str(exc)},
        )
    if detail is None:
        return _not_stored(request, message_id)
    here = reverse("mailsecurity:message_detail", args=[message_id])
    back = reverse("mailsecurity:message_tracking")
    return render(
        request,
        "mailsecurity/message_detail.html",
        {
            "breadcrumb": MESSAGE_BREADCRUMB,
            "detail": detail,
            "copy": detail.copy,
            "release_url": _confirm_url("release", [message_id], here),
            "delete_url": _confirm_url("delete", [message_id], back),
            "tracking_url": back,
        },
    )


@require_GET
@never_cache
def message_download(request: HttpRequest, message_id: int) -> HttpResponse:
    """The stored message exactly as received, as a file to save (never shown inline: it is
    mail someone chose to quarantine)."""
    if message_id > MAX_MESSAGE_ID:
        return _not_stored(request, message_id)
    try:
        raw = selectors.message_raw(message_id)
    except ApplianceError as exc:
        return HttpResponse(str(exc), status=503, content_type="text/plain; charset=utf-8")
    if raw is None:
        return _not_stored(request, message_id)
    response = HttpResponse(raw, content_type="message/rfc822")
    # Only digits go into the name: nothing of the message can reach the header.
    response["Content-Disposition"] = f'attachment; filename="quarantined-message-{message_id}.eml"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _confirm_url(action: str, ids: list[int], next_url: str) -> str:
    pairs = [("action", action), *(("id", str(i)) for i in ids), ("next", next_url)]
    return reverse("mailsecurity:quarantine_confirm") + "?" + urlencode(pairs)


def _next_url(request: HttpRequest, candidate: str) -> str:
    """Where to go after the action: the page it was asked from, if it is one of ours."""
    if candidate and url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return reverse("mailsecurity:message_tracking")


def _delivery_target() -> str:
    try:
        hop = read_smtp_settings().next_hop.strip()
    except ApplianceError:
        return "the configured next hop"
    return f"the next hop {hop}" if hop else "the local mail sink (no next hop is configured)"


@require_http_methods(["GET", "POST"])
def quarantine_confirm(request: HttpRequest) -> HttpResponse:
    """Release or delete quarantined messages: GET lists what will happen to each, POST does it.

    Anyone signed in may read the confirmation; only an administrator sees the button, and a
    POST from anyone else is 403.
    """
    if refused := refuse_read_only(request):
        return refused
    form = QuarantineActionForm(request.POST if request.method == "POST" else request.GET)
    context: dict[str, object] = {"breadcrumb": MESSAGE_BREADCRUMB, "form": form}
    if not form.is_valid():
        return render(request, "mailsecurity/quarantine_confirm.html", context, status=400)
    action, ids = form.cleaned_data["action"], form.cleaned_data["id"]
    next_url = _next_url(request, form.cleaned_data["next"])
    if request.method == "POST":
        try:
            if action == "release":
                released = services.quarantine_release(ids, user=request.user)
                summary, failed = released.summary(), bool(released.failed)
            else:
                summary, failed = (
                    services.quarantine_delete(ids, user=request.user).summary(),
                    False,
                )
        except (services.QuarantineRefused, ApplianceError) as exc:
            messages.error(request, str(exc))
            return redirect(next_url)
        (messages.warning if failed else messages.success)(request, summary)
        return redirect(next_url)
    try:
        copies = selectors.quarantined_copies(ids)
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
        return render(request, "mailsecurity/quarantine_confirm.html", context)
    rows = [_confirm_row(action, message_id, copies.get(message_id)) for message_id in ids]
    context.update(
        {
            "action": action,
            "rows": rows,
            "actionable": sum(1 for row in rows if row.acts),
            # Releasing a virus delivers it: said before the button, not after.
            "viruses": sum(
                1
                for row in rows
                if action == "release" and row.acts and row.copy and row.copy.verdict == "virus"
            ),
            "target": _delivery_target() if action == "release" else "",
            "next_url": next_url,
        }
    )
    return render(request, "mailsecurity/quarantine_confirm.html", context)


@dataclass(frozen=True)
class ConfirmRow:
    """One message on the confirmation page and what the action will do with it."""

    id: int
    copy: QuarantinedCopy | None
    outcome: str
    acts: bool


def _confirm_row(action: str, message_id: int, copy: QuarantinedCopy | None) -> ConfirmRow:
    if copy is None:
        return ConfirmRow(
            message_id, None, "No longer stored (deleted or purged by retention): skipped.", False
        )
    if action == "release":
        if not copy.held:
            return ConfirmRow(
                message_id, copy, "Delivered when it arrived (a kept copy): skipped.", False
            )
        if copy.release_state == "released":
            return ConfirmRow(message_id, copy, "Released already: skipped.", False)
        if copy.release_state:
            return ConfirmRow(message_id, copy, "A release is under way: skipped.", False)
        return ConfirmRow(
            message_id, copy, f"Delivered to {', '.join(copy.recipients)}; marked released.", True
        )
    if copy.release_state == "releasing":
        return ConfirmRow(message_id, copy, "A release is under way: not deleted.", False)
    return ConfirmRow(
        message_id,
        copy,
        "Deleted from the store; its tracking log entries stay (as no longer stored).",
        True,
    )


@require_http_methods(["GET", "POST"])
def reclaim(request: HttpRequest) -> HttpResponse:
    """The reclaim planner: which retentions bring the message store's disk to 50% free."""
    if refused := refuse_read_only(request):
        return refused
    context: dict[str, object] = {
        "breadcrumb": "Home > Resources > Reclaim disk space",
        "retention_pages": retention_pages(),
        **purge_context(),
    }
    try:
        view = selectors.reclaim_view()
    except ApplianceError as exc:
        context["appliance_error"] = str(exc)
        return render(request, "mailsecurity/reclaim.html", context)
    status = 200
    if request.method == "POST":
        form = ReclaimApplyForm([source.key for source in view.sources], request.POST)
        if form.is_valid():
            result = services.reclaim_plan_apply(form.values(), user=request.user)
            retention_saved(request, result)
            if not result.changes and result.purge is not None and result.purge_created:
                messages.success(request, "A retention purge has started for the expired data.")
            return redirect("mailsecurity:reclaim")
        messages.error(request, "The plan could not be applied: " + _errors(form))
        status = 400
    context.update({"view": view, "plan": view.plan})
    return render(request, "mailsecurity/reclaim.html", context, status=status)


def _errors(form: ReclaimApplyForm) -> str:
    return " ".join(f"{key}: {error}" for key, errors in form.errors.items() for error in errors)


def retention_pages() -> list[tuple[str, str]]:
    """The guide's three places to change retention by hand."""
    return [
        ("Mail Security > Policy Objects > Message Stores", reverse("mailsecurity:message_stores")),
        ("SMTP > Configuration > Maintenance", reverse("smtp:maintenance")),
        (
            "Mail Security > Policy > Message Tracking / Reporting",
            reverse("mailsecurity:message_tracking"),
        ),
    ]


@require_GET
def purge_status(request: HttpRequest) -> HttpResponse:
    """The purge panel alone: polled by htmx every two seconds while a purge is active."""
    return render(
        request, "mailsecurity/_purge_status.html", purge_context(request.GET.get("since"))
    )
