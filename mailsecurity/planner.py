"""The reclaim planner's arithmetic: which retentions bring a disk to the upgrade's free rule.

The rule is settings.UPGRADE_MIN_FREE_PERCENT (the guide's 50% unless a lab host lowers it);
callers pass it as ``target_percent``. Pure: it takes the age distribution of the data and the
disk's figures and returns a plan, so it is tested with made-up numbers. Reading the real
figures is mailsecurity.selectors' and home.selectors' job.

Besides the plan, :func:`disk_advice` adds up every lever a disk has (each retention at the
floor, the free pages inside the store, old configuration backups, firmware logs) against what
the rule needs, so the pages can say plainly when all of it together is not enough.

The rules:

- A retention of r days keeps rows younger than r days; rows aged r days or more go, so a
  source's bytes freed at r are ``sum(bytes_by_age[r:])``. What is already past the current
  retention goes with the next purge whatever the plan says, and counts as freed.
- A purge returns what it frees to the disk (the store uses incremental vacuum), as it does
  the pages already free inside the file, so the projected free space is the free space now,
  plus the free pages, plus everything the plan deletes.
- Greedy: the source with the most reclaimable bytes (between the floor and its current
  retention) is shortened first, one day at a time, only as far as needed; then the next
  largest. No retention goes below the floor, and none is lengthened.
- If even every retention at the floor cannot reach the target, the plan says so, with the
  figures, instead of proposing to delete everything for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.mail import retention

# The guide's figure; the pages pass settings.UPGRADE_MIN_FREE_PERCENT instead.
TARGET_FREE_PERCENT = 50.0
FLOOR_DAYS = 1


SMTP_LOG = "smtp_log"
TRACKING_LOG = "tracking_log"
LOG_LABELS = {SMTP_LOG: "SMTP log", TRACKING_LOG: "Message tracking log"}


def store_key(store_id: int) -> str:
    return f"store:{store_id}"


@dataclass(frozen=True)
class RetentionSource:
    """Something with a retention: a message store, the SMTP log or the tracking log."""

    key: str  # "store:<id>", "smtp_log", "tracking_log"
    label: str
    retention_days: int
    bytes_by_age: tuple[int, ...]  # index: whole days of age

    def freed_at(self, days: int) -> int:
        """Bytes deleted by a retention of ``days``."""
        return sum(self.bytes_by_age[days:])

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_age)


@dataclass(frozen=True)
class DiskFigures:
    """The message store's disk, and the part of the store that is already free pages."""

    total: int
    free: int
    store_free_pages: int = 0  # free pages inside the store's file: returned by any purge


@dataclass(frozen=True)
class PlanStep:
    """One source in the plan: its retention now, the proposed one, and what that frees."""

    key: str
    label: str
    current_days: int
    proposed_days: int
    bytes_freed: int  # including what is already past the current retention
    already_expired: int

    @property
    def changes(self) -> bool:
        return self.proposed_days != self.current_days


@dataclass(frozen=True)
class ReclaimPlan:
    """The proposed retentions and the disk they leave behind."""

    steps: tuple[PlanStep, ...]
    disk_total: int
    free_now: int
    free_pages: int
    target_percent: float
    floor_days: int
    free_after: int  # projected, with the proposed retentions
    free_at_floor: int  # projected, with every retention at the floor
    reachable: bool

    @property
    def free_percent_now(self) -> float:
        return _percent(self.free_now, self.disk_total)

    @property
    def free_percent_after(self) -> float:
        return _percent(self.free_after, self.disk_total)

    @property
    def free_percent_at_floor(self) -> float:
        return _percent(self.free_at_floor, self.disk_total)

    @property
    def target_free(self) -> int:
        return _target(self.disk_total, self.target_percent)

    @property
    def meets_target_now(self) -> bool:
        return self.free_now >= self.target_free

    @property
    def bytes_freed(self) -> int:
        return sum(step.bytes_freed for step in self.steps)

    @property
    def shortfall(self) -> int:
        """Bytes that would still have to go from outside the message store to reach the target."""
        return max(0, self.target_free - self.free_at_floor)

    @property
    def changes(self) -> tuple[PlanStep, ...]:
        return tuple(step for step in self.steps if step.changes)


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _target(total: int, percent: float) -> int:
    return math.ceil(total * percent / 100.0)


def plan_reclaim(
    sources: Sequence[RetentionSource],
    disk: DiskFigures,
    *,
    target_percent: float = TARGET_FREE_PERCENT,
    floor_days: int = FLOOR_DAYS,
) -> ReclaimPlan:
    """The least shortening, largest data first, that brings the disk to target_percent free."""
    if floor_days < 1:
        raise ValueError("the floor must be at least one day")
    expired = {s.key: s.freed_at(s.retention_days) for s in sources}
    base_free = disk.free + disk.store_free_pages + sum(expired.values())
    free_at_floor = base_free + sum(
        s.freed_at(min(floor_days, s.retention_days)) - expired[s.key] for s in sources
    )
    needed = _target(disk.total, target_percent) - base_free
    proposed = {s.key: s.retention_days for s in sources}
    freed = dict(expired)

    def reclaimable(source: RetentionSource) -> int:
        return source.freed_at(min(floor_days, source.retention_days)) - expired[source.key]

    # Largest reclaimable first; the key breaks ties so the plan never depends on input order.
    for source in sorted(sources, key=lambda s: (-reclaimable(s), s.key)):
        if needed <= 0:
            break
        days = source.retention_days
        while days > floor_days and needed > 0:
            days -= 1
            gain = source.bytes_by_age[days] if days < len(source.bytes_by_age) else 0
            needed -= gain
            freed[source.key] += gain
        proposed[source.key] = days

    steps = tuple(
        PlanStep(
            key=s.key,
            label=s.label,
            current_days=s.retention_days,
            proposed_days=proposed[s.key],
            bytes_freed=freed[s.key],
            already_expired=expired[s.key],
        )
        for s in sources
    )
    return ReclaimPlan(
        steps=steps,
        disk_total=disk.total,
        free_now=disk.free,
        free_pages=disk.store_free_pages,
        target_percent=target_percent,
        floor_days=floor_days,
        free_after=base_free + sum(freed.values()) - sum(expired.values()),
        free_at_floor=free_at_floor,
        reachable=needed <= 0,
    )


# --- What every lever on a disk frees, against what the rule needs (issue 16) -------------------


@dataclass(frozen=True)
class Lever:
    """One way to free space on a disk and the most it frees, measured from real sizes."""

    key: str
    label: str
    bytes: int
    how: str  # what the administrator does to pull it
    url: str | None = None


@dataclass(frozen=True)
class DiskAdvice:
    """A disk against the free-space rule, the levers on it and what they add up to.

    ``reserved`` is what the file system keeps for root (statvfs ``f_bfree - f_bavail``): it is
    neither used nor free to the appliance's services, which is why used + free is not the size.
    """

    total: int
    used: int
    free: int
    reserved: int
    required_percent: float
    levers: tuple[Lever, ...]
    holds_message_store: bool = False
    holds_console_database: bool = False

    @property
    def required_free(self) -> int:
        return _target(self.total, self.required_percent)

    @property
    def needed(self) -> int:
        """Bytes that must be freed to meet the rule (0 when it is met)."""
        return max(0, self.required_free - self.free)

    @property
    def levers_total(self) -> int:
        return sum(lever.bytes for lever in self.levers)

    @property
    def free_after(self) -> int:
        """Free space with every lever pulled."""
        return self.free + self.levers_total

    @property
    def free_percent_after(self) -> float:
        return _percent(self.free_after, self.total)

    @property
    def enough(self) -> bool:
        return self.levers_total >= self.needed

    @property
    def still_short(self) -> int:
        """Bytes still missing with every lever pulled: what has to come from elsewhere."""
        return max(0, self.needed - self.levers_total)

    @property
    def used_plus_free(self) -> int:
        return self.used + self.free

    @property
    def reserved_percent(self) -> float:
        return _percent(self.reserved, self.total)


def retention_levers(
    sources: Sequence[RetentionSource],
    *,
    free_pages: int = 0,
    floor_days: int = FLOOR_DAYS,
    urls: dict[str, str] | None = None,
) -> list[Lever]:
    """What each retention frees at the floor (what is already expired included), and the free
    pages inside the store that any purge returns to the disk."""
    urls = urls or {}
    levers = []
    for source in sources:
        days = min(floor_days, source.retention_days)
        kind = "store" if source.key.startswith("store:") else source.key
        levers.append(
            Lever(
                key=source.key,
                label=source.label,
                bytes=source.freed_at(days),
                how=(
                    f"retention from {source.retention_days} to {days} "
                    f"day{'s' if days != 1 else ''}, then purge"
                ),
                url=urls.get(kind),
            )
        )
    if free_pages:
        levers.append(
            Lever(
                key="free_pages",
                label="Free pages inside the message store's file",
                bytes=free_pages,
                how="returned to the disk by any purge",
                url=urls.get("free_pages"),
            )
        )
    return levers


def disk_advice(
    *,
    total: int,
    used: int,
    free: int,
    reserved: int,
    required_percent: float,
    levers: Sequence[Lever],
    holds_message_store: bool = False,
    holds_console_database: bool = False,
) -> DiskAdvice:
    """The disk's figures and its levers, largest lever first (the order to pull them in).

    What the disk holds decides what else to advise when the levers are not enough (moving
    the message store, or the console's database, off it).
    """
    ordered = tuple(sorted(levers, key=lambda lever: (-lever.bytes, lever.key)))
    return DiskAdvice(
        total,
        used,
        free,
        reserved,
        required_percent,
        ordered,
        holds_message_store=holds_message_store,
        holds_console_database=holds_console_database,
    )


def retention_sources(
    settings: retention.RetentionSettings, distribution: retention.AgeDistribution
) -> tuple[RetentionSource, ...]:
    """Each store and log with its retention and its bytes per day of age."""
    sources = [
        RetentionSource(
            key=store_key(store.id),
            label=f"Message store {store.name}",
            retention_days=store.retention_days,
            bytes_by_age=distribution.stores.get(store.id, ()),
        )
        for store in settings.stores
    ]
    sources.append(
        RetentionSource(
            SMTP_LOG, LOG_LABELS[SMTP_LOG], settings.smtp_log_days, distribution.smtp_log
        )
    )
    sources.append(
        RetentionSource(
            TRACKING_LOG,
            LOG_LABELS[TRACKING_LOG],
            settings.tracking_log_days,
            distribution.tracking_log,
        )
    )
    return tuple(sources)
