"""Reads for the Mail Security pages, the SMTP maintenance page and the reclaim planner."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.parser import BytesParser

from django.template.defaultfilters import filesizeformat

from appliance.config import policy, store
from appliance.config.store import read_smtp_settings
from appliance.mail import msgstore, quarantine, retention, tracking
from appliance.system.errors import ApplianceError
from appliance.system.paths import layout
from home.selectors import UPGRADE_FREE_PERCENT, DiskUsage, disk_usage  # noqa: F401 - views
from jobs.models import ACTIVE_STATES, Job
from mailsecurity.models import PURGE
from mailsecurity.planner import (
    LOG_LABELS,
    SMTP_LOG,
    DiskFigures,
    ReclaimPlan,
    RetentionSource,
    plan_reclaim,
    retention_sources,
)
from smtp.engine import compile_policy, envelope_address, evaluate

TYPE_LABELS = {
    "emailaddresslist": "Email address list",
    "domainlist": "Domain list",
    "keywordlist": "Keyword list",
    "sizelimit": "Size limit",
    "messagestore": "Message store",
}
SUMMARY_ENTRIES = 3


@dataclass(frozen=True)
class PolicyObjectRow:
    """A policy object as the list shows it; file_* describe the file a macro reads."""

    id: str
    name: str
    type: str
    type_label: str
    summary: str
    file_path: str | None
    file_exists: bool = False
    file_size: int | None = None
    file_entries: int | None = None
    file_problem: str = ""


def _summary(obj: policy.PolicyObject) -> str:
    if obj.type == "sizelimit" and obj.value.strip().isdigit():
        return filesizeformat(int(obj.value.strip()))
    if obj.type == "messagestore":
        return obj.value.strip()
    entries = policy.read_object_lines(obj)
    shown = ", ".join(entries[:SUMMARY_ENTRIES])
    more = len(entries) - SUMMARY_ENTRIES
    if more > 0:
        shown += f" and {more} more"
    return (
        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}" if entries else "empty"
    )


def _file_facts(obj: policy.PolicyObject) -> dict[str, object]:
    """Whether the file a macro reads exists, its size and entries, or what is wrong with it."""
    try:
        path = policy.object_file(obj)
    except ValueError as exc:  # a path outside the appliance root, or with ".."
        return {"file_problem": str(exc)}
    if not path.is_file():
        return {"file_problem": "The file does not exist."}
    return {
        "file_exists": True,
        "file_size": path.stat().st_size,
        "file_entries": len(policy.read_object_lines(obj)),
    }


def policy_object_rows() -> list[PolicyObjectRow]:
    """Every policy object in file order; macro objects with the facts of their file."""
    rows = []
    for obj in store.list_policy_objects():
        macro = obj.file_path is not None
        rows.append(
            PolicyObjectRow(
                id=obj.id,
                name=obj.name,
                type=obj.type,
                type_label=TYPE_LABELS.get(obj.type, obj.type),
                summary=obj.value if macro else _summary(obj),
                file_path=obj.file_path,
                **(_file_facts(obj) if macro else {}),  # type: ignore[arg-type]
            )
        )
    return rows


def message_stores() -> list[retention.StoreUsage]:
    return retention.store_usage()


@dataclass(frozen=True)
class LogRetention:
    """One log's retention and its oldest entry."""

    key: str
    label: str
    retention_days: int
    oldest: datetime | None


def log_retention(key: str) -> LogRetention:
    """The SMTP log's or the tracking log's retention (SMTP settings) and oldest entry."""
    smtp = read_smtp_settings()
    days = smtp.smtp_log_retention_days if key == SMTP_LOG else smtp.tracking_log_retention_days
    return LogRetention(key, LOG_LABELS[key], days, retention.log_oldest()[key])


def purge_latest() -> Job | None:
    """The queued or running purge, else the latest finished one."""
    purges = Job.objects.filter(kind=PURGE)
    return purges.filter(state__in=ACTIVE_STATES).first() or purges.first()


def msgstore_disk() -> DiskUsage:
    """The disk of the message store, against the upgrade's 50% rule."""
    return disk_usage("Message store", layout().msgstore_dir)


def tracking_page(
    search: tracking.TrackingFilter,
    *,
    after: tracking.Position | None = None,
    before: tracking.Position | None = None,
    limit: int = tracking.PAGE_SIZE,
) -> tracking.TrackingPage:
    return tracking.tracking_page(search, after=after, before=before, limit=limit)


@dataclass(frozen=True)
class ReclaimView:
    """The plan and what it was computed from, for the planner page."""

    plan: ReclaimPlan
    disk: DiskUsage
    distribution: retention.AgeDistribution
    sources: tuple[RetentionSource, ...]

    @property
    def other_bytes(self) -> int:
        """What the disk holds besides the message store: out of any retention's reach."""
        return max(0, self.disk.used - self.distribution.file_bytes)

    @property
    def unavailable_bytes(self) -> int:
        """Neither used nor free to us: reserved blocks, or a thin volume's limit."""
        return max(0, self.disk.total - self.disk.used - self.disk.free)


def reclaim_view() -> ReclaimView:
    """The reclaim plan from the store's real age distribution and its disk, measured now."""
    settings = retention.retention_settings()
    distribution = retention.age_distribution()
    disk = msgstore_disk()
    sources = retention_sources(settings, distribution)
    plan = plan_reclaim(
        sources,
        DiskFigures(
            total=disk.total, free=disk.free, store_free_pages=distribution.free_pages_bytes
        ),
        target_percent=disk.required_percent,
    )
    return ReclaimView(plan=plan, disk=disk, distribution=distribution, sources=sources)


# --- Quarantine: one stored message ----------------------------------------------------------

MAX_HEADERS = 200  # a message with more (a mail loop, a crafted one) shows the first ones
MAX_HEADER_CHARS = 2000


@dataclass(frozen=True)
class PolicyJudgement:
    """How the mail policy judges the stored message today.

    The mail service does not store the reasons for a verdict with the message, so the page
    shows what the current policy finds in it, labelled as such; error says why it cannot.
    """

    verdict: str = ""
    action: str = ""
    store: str | None = None
    reasons: tuple[str, ...] = ()
    score: float | None = None
    error: str = ""


@dataclass(frozen=True)
class MessageDetail:
    """Everything the detail page shows of one quarantined message."""

    copy: quarantine.QuarantinedCopy
    received_at: datetime
    released_at: datetime | None
    entries: list[tracking.TrackingEntry]
    headers: list[tuple[str, str]]
    headers_cut: bool
    judgement: PolicyJudgement


def _headers(raw: bytes) -> tuple[list[tuple[str, str]], bool]:
    """The header fields as (name, decoded value); a value that cannot be decoded is shown as
    it is written rather than failing the page."""
    message = BytesParser(policy=email_policy.default).parsebytes(raw, headersonly=True)
    fields: list[tuple[str, str]] = []
    for name, raw_value in message.raw_items():
        try:
            value = str(email_policy.default.header_fetch_parse(name, raw_value))
        except Exception:  # any malformed header is shown as written, never a 500
            value = str(raw_value)
        fields.append((name, value[:MAX_HEADER_CHARS]))
        if len(fields) >= MAX_HEADERS:
            return fields, True
    return fields, False


def _judgement(copy: quarantine.QuarantinedCopy, raw: bytes) -> PolicyJudgement:
    try:
        compiled, _ = compile_policy()
        verdict = evaluate(compiled, envelope_address(copy.sender), copy.recipients, raw)
    except (ApplianceError, ValueError) as exc:
        return PolicyJudgement(error=str(exc))
    return PolicyJudgement(
        verdict=verdict.verdict,
        action=verdict.action,
        store=verdict.store,
        reasons=verdict.reasons,
        score=verdict.score,
    )


def _moment(epoch: int | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


def message_detail(message_id: int) -> MessageDetail | None:
    """One stored message with its log rows, headers and today's judgement; None when it is
    no longer stored (deleted, or purged by retention)."""
    copy = quarantine.quarantined_copies([message_id]).get(message_id)
    if copy is None:
        return None
    raw = msgstore.message_raw(message_id)
    if raw is None:  # purged between the two reads
        return None
    headers, cut = _headers(raw)
    return MessageDetail(
        copy=copy,
        received_at=datetime.fromtimestamp(copy.received_at, tz=UTC),
        released_at=_moment(copy.released_at),
        entries=tracking.message_entries(copy),
        headers=headers,
        headers_cut=cut,
        judgement=_judgement(copy, raw),
    )


def message_raw(message_id: int) -> bytes | None:
    return msgstore.message_raw(message_id)


def quarantined_copies(message_ids: list[int]) -> dict[int, quarantine.QuarantinedCopy]:
    return quarantine.quarantined_copies(message_ids)
