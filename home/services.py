"""Writes of the Home app: sampling this machine's resources for the graphs."""

from __future__ import annotations

import time

import psutil
from django.db import transaction
from django.db.models import F

from home import selectors
from home.models import ResourceHour, ResourceSample

# Keep a little over the longest graph range (30 days).
RESOURCE_SAMPLE_RETENTION_SECONDS = 31 * 86400


FIELDS = ("cpu", "memory", "console_disk", "store_disk")
# The first sample of a process has no previous one to measure from: it measures this long.
FIRST_CPU_INTERVAL = 0.2
_cpu_measured_before = False


def _cpu_percent() -> float:
    """CPU use since this process's previous sample: over the whole minute when beat samples
    every minute, which stands for the minute better than any blocking one-second window, and
    costs no wait. The process's first sample measures FIRST_CPU_INTERVAL instead of saying 0.
    """
    global _cpu_measured_before
    if not _cpu_measured_before:
        _cpu_measured_before = True
        return psutil.cpu_percent(interval=FIRST_CPU_INTERVAL)
    return psutil.cpu_percent(interval=None)


@transaction.atomic
def resources_sample(now: float | None = None) -> ResourceSample:
    """Measure CPU, memory and the two upgrade disks now, store them, drop expired samples.

    The hour's roll-up changes in the same transaction, by the difference to any sample this
    minute already had, so minutes and hours always agree.
    """
    now = time.time() if now is None else now
    minute = int(now) // 60 * 60
    disks = selectors.upgrade_disks()
    measured = {
        "cpu": _cpu_percent(),
        "memory": psutil.virtual_memory().percent,
        "console_disk": disks[0].used_percent,
        "store_disk": disks[1].used_percent,
    }
    old = ResourceSample.objects.select_for_update().filter(minute=minute).first()
    previous = {name: getattr(old, f"{name}_percent") if old else 0.0 for name in FIELDS}
    sample, _ = ResourceSample.objects.update_or_create(
        minute=minute, defaults={f"{name}_percent": measured[name] for name in FIELDS}
    )
    hour, _ = ResourceHour.objects.get_or_create(hour=minute // 3600 * 3600)
    ResourceHour.objects.filter(pk=hour.pk).update(
        samples=F("samples") + (0 if old else 1),
        **{f"{name}_sum": F(f"{name}_sum") + measured[name] - previous[name] for name in FIELDS},
    )
    cutoff = minute - RESOURCE_SAMPLE_RETENTION_SECONDS
    ResourceSample.objects.filter(minute__lt=cutoff).delete()
    ResourceHour.objects.filter(hour__lt=cutoff // 3600 * 3600).delete()
    return sample
