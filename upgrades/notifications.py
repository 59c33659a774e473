"""The notices Updates & Licensing puts on Home (and on its own page).

As the guide says: "Firmware X is available" once the feed lists it, the download's progress
while it runs, then "Firmware X is ready to install". A failed check or download is a warning
until something newer replaces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.urls import NoReverseMatch, reverse

from upgrades import selectors
from upgrades.models import DownloadState

if TYPE_CHECKING:
    from home.notifications import Notice

NOTES_SHOWN = 160


def _summary(notes: str) -> str:
    """The release notes' first line, shortened for a one-line notice."""
    first = next((line.strip() for line in notes.splitlines() if line.strip()), "")
    return first if len(first) <= NOTES_SHOWN else first[: NOTES_SHOWN - 1].rstrip() + "…"


def update_notices() -> list[Notice]:
    """Available, downloading, ready, and what went wrong (in that order of importance)."""
    from home.notifications import Notice

    page = reverse("upgrades:index")
    notices: list[Notice] = install_notices()
    installed = selectors.installed_version()
    active = selectors.active_download()
    ready = selectors.ready_download(installed)
    if active is not None:
        if active.state == DownloadState.QUEUED:
            text = f"Firmware {active.version} is queued for download."
        elif active.state == DownloadState.VERIFYING:
            text = f"Verifying firmware {active.version}: {active.verify_percent:.0f}%"
        else:
            text = f"Downloading firmware {active.version}: {active.percent:.0f}%"
        notices.append(Notice("info", text, "Updates & Licensing", page))
    if ready is not None:
        notices.append(
            Notice(
                "info",
                f"Firmware {ready.version} is ready to install.",
                "Updates & Licensing",
                page,
            )
        )
    newest = selectors.newest_downloadable(installed)
    if (
        newest is not None
        and (active is None or active.version != newest.offer.version)
        and (ready is None or ready.version != newest.offer.version)
    ):
        offer = newest.offer
        notes = _summary(offer.release_notes)
        text = f"Firmware {offer.version} is available." + (f" {notes}" if notes else "")
        lic = selectors.license_view()
        if lic.entitled:
            notices.append(Notice("info", text, "Release notes and Download", page))
        else:
            notices.append(
                Notice(
                    "warning",
                    f"{text} Downloading it needs a valid license: {lic.reason}",
                    "Licensing",
                    page + "#licensing",
                )
            )
    check = selectors.last_check()
    if check is not None and not check.ok:
        notices.append(
            Notice(
                "warning",
                f"Checking for firmware updates failed: {check.error}",
                "Updates & Licensing",
                page,
            )
        )
    latest = selectors.latest_download()
    if (
        active is None
        and latest is not None
        and latest.state == DownloadState.FAILED
        and (ready is None or ready.version != latest.version)
    ):
        notices.append(
            Notice(
                "warning",
                f"The download of firmware {latest.version} failed: {latest.error}",
                "Updates & Licensing",
                page,
            )
        )
    return notices


def install_notices() -> list[Notice]:
    """The firmware install: running (with its phase), complete, or rolled back and why.

    A finished run is announced for a day; a later run replaces it.
    """
    from datetime import timedelta

    from django.utils import timezone

    from home.notifications import Notice
    from upgrades.install_selectors import latest_install
    from upgrades.models import PHASE_COUNT, PHASE_NAMES, InstallState

    run = latest_install()
    if run is None:
        return []
    try:
        link = reverse("upgrades:install_run", args=[run.pk])
    except NoReverseMatch:  # the page may not be wired up yet
        link = reverse("upgrades:index")
    if run.state in (InstallState.QUEUED, InstallState.RUNNING):
        text = (
            f"Installing firmware {run.version}: phase {run.phase} of {PHASE_COUNT} "
            f"({PHASE_NAMES.get(run.phase, '')})."
        )
        return [Notice("info", text, "Install progress", link)]
    if run.state == InstallState.ROLLING_BACK:
        text = f"The install of firmware {run.version} failed and is rolling back: {run.error}"
        return [Notice("warning", text, "Install progress", link)]
    if run.finished_at is None or run.finished_at < timezone.now() - timedelta(days=1):
        return []
    if run.state == InstallState.SUCCEEDED:
        return [Notice("info", f"Upgrade complete: firmware {run.version}.", "Details", link)]
    if run.state == InstallState.ROLLED_BACK:
        text = (
            f"The install of firmware {run.version} was rolled back; firmware "
            f"{run.from_version} runs as before. {run.error}"
        )
        return [Notice("warning", text, "Details", link)]
    if run.state == InstallState.FAILED:
        text = f"The install of firmware {run.version} needs attention: {run.error}"
        return [Notice("error", text, "Details", link)]
    return []
