"""Where this appliance is in its update life, told once for every surface.

Home's notices, Updates & Licensing, the Install page, ``update-control -s`` (and ``--json``)
and the API all read :func:`update_story`, so they cannot disagree: up to date, an update
available, downloading, downloaded (ready to install), installing (phase k of 10), rolling back,
installed (when and by whom), rolled back or failed (and why). Only the most important state is
the story; a notice is replaced when the state moves on, never stacked on an older one.

The story is worked out from the records each time it is read (the installed firmware level,
the downloads, the install runs, the feed's offers), never stored, so there is nothing to keep
in step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from upgrades import install_selectors, selectors
from upgrades.models import (
    PHASE_COUNT,
    PHASE_NAMES,
    RETURN_PHASE_NAMES,
    Download,
    DownloadState,
    InstallRun,
    InstallState,
)


class Stage(StrEnum):
    UNKNOWN = "unknown"
    UP_TO_DATE = "up_to_date"
    AVAILABLE = "available"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    INSTALLING = "installing"
    ROLLING_BACK = "rolling_back"
    INSTALLED = "installed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    RETURNED = "returned"  # issue 18: back on the previous firmware, the newer one installable


# The stages a person should act on or look at (a warning or an error on Home).
LEVELS = {Stage.ROLLED_BACK: "warning", Stage.ROLLING_BACK: "warning", Stage.FAILED: "error"}


@dataclass(frozen=True)
class UpdateStory:
    """One sentence and its facts; ``headline`` is what every surface shows first."""

    stage: Stage
    installed: str | None
    version: str | None  # the firmware the story is about (offered, downloading, installed)
    headline: str
    percent: float | None = None
    phase: int | None = None
    at: datetime | None = None  # when the stage was reached (install finished, download ready)
    by: str = ""
    reason: str = ""
    run_id: int | None = None
    download_id: int | None = None
    # The verified bundle an install would use now, whatever the stage (after a rollback the
    # same bundle can be tried again); None: nothing to install.
    ready_version: str | None = None

    @property
    def level(self) -> str:
        return LEVELS.get(self.stage, "info")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage"] = str(self.stage)
        data["at"] = self.at.isoformat() if self.at else None
        data["level"] = self.level
        return data


def update_status() -> dict[str, Any]:
    """The story first, then every fact behind it: the API's GET /updates and
    ``update-control -s --json`` (so the two cannot disagree)."""
    from upgrades.install_status import install_summary
    from upgrades.schedule import schedule_dict, schedule_pending  # issue 18

    return {
        "story": update_story().as_dict(),
        **selectors.update_facts(),
        "install": install_summary(),
        "schedule": schedule_dict(schedule_pending()),
    }


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "an unknown date"


def _from_run(run: InstallRun, installed: str | None) -> UpdateStory | None:
    """The story of the latest install run, when it is the latest news; a return to the
    previous firmware (issue 18) tells the same stages in its own words."""
    back = run.is_return
    what = f"{'return to' if back else 'install of'} firmware {run.version}"
    names = RETURN_PHASE_NAMES if back else PHASE_NAMES
    common = {"installed": installed, "version": run.version, "run_id": run.pk}
    if run.state in (InstallState.QUEUED, InstallState.RUNNING):
        return UpdateStory(
            Stage.INSTALLING,
            headline=(
                f"{'Returning to' if back else 'Installing'} firmware {run.version}: phase "
                f"{run.phase} of {PHASE_COUNT} ({names.get(run.phase, '')})."
            ),
            phase=run.phase,
            percent=round(100 * (run.phase - 1) / PHASE_COUNT, 1),
            by=run.requested_by,
            **common,
        )
    if run.state == InstallState.ROLLING_BACK:
        stuck = run.details.get("rollback_error")
        return UpdateStory(
            Stage.ROLLING_BACK,
            headline=(
                f"The {what} failed and is rolling back"
                + (f"; the rollback keeps failing and is retried: {stuck}" if stuck else ".")
            ),
            reason=run.error,
            phase=run.phase,
            by=run.requested_by,
            **common,
        )
    if run.state == InstallState.SUCCEEDED and installed == run.version:
        by = f" by {run.requested_by}." if run.requested_by else "."
        if back:
            ready = selectors.ready_download(installed)
            again = f" Firmware {ready.version} can be installed again." if ready else ""
            stage, headline = (
                Stage.RETURNED,
                f"Firmware {run.version} installed: returned from {run.from_version} on "
                f"{when(run.finished_at)}{by}{again}",
            )
        else:
            stage = Stage.INSTALLED
            headline = (
                f"Up to date: firmware {run.version} installed on {when(run.finished_at)}{by}"
            )
        return UpdateStory(
            stage, headline=headline, at=run.finished_at, by=run.requested_by, **common
        )
    if run.state == InstallState.ROLLED_BACK:
        return UpdateStory(
            Stage.ROLLED_BACK,
            headline=(
                f"The {what} was rolled back on {when(run.finished_at)}; firmware "
                f"{run.from_version or installed} runs as before."
            ),
            reason=run.error,
            at=run.finished_at,
            by=run.requested_by,
            **common,
        )
    if run.state == InstallState.FAILED:
        return UpdateStory(
            Stage.FAILED,
            headline=f"The {what} needs attention.",
            reason=run.error,
            at=run.finished_at,
            by=run.requested_by,
            **common,
        )
    return None  # aborted, or succeeded on a level the appliance no longer runs


def _later(moment: datetime, than: datetime | None) -> bool:
    return than is None or moment > than


def update_story() -> UpdateStory:
    """Where the appliance is now; the most pressing stage wins.

    An install in progress, then a download in progress, then a bundle ready to install, then
    the outcome of the latest install (rolled back or failed stays the story until something
    newer happens), then an offer, then "installed" or plain "up to date".
    """
    installed = selectors.installed_version()
    ready = selectors.ready_download(installed)
    story = _story(installed, ready)
    return replace(story, ready_version=ready.version if ready is not None else None)


def _story(installed: str | None, ready: Download | None) -> UpdateStory:
    run = install_selectors.latest_install()
    run_story = _from_run(run, installed) if run is not None else None
    if run_story is not None and run_story.stage in (Stage.INSTALLING, Stage.ROLLING_BACK):
        return run_story
    active = selectors.active_download()
    if active is not None:
        percent = (
            active.verify_percent if active.state == DownloadState.VERIFYING else active.percent
        )
        headline = {
            DownloadState.QUEUED: f"Firmware {active.version} is queued for download.",
            DownloadState.VERIFYING: f"Verifying firmware {active.version}: {percent:.0f}%",
        }.get(DownloadState(active.state), f"Downloading firmware {active.version}: {percent:.0f}%")
        return UpdateStory(
            Stage.DOWNLOADING,
            installed=installed,
            version=active.version,
            headline=headline,
            percent=round(percent, 1),
            by=active.requested_by,
            download_id=active.pk,
        )
    if ready is not None and (
        run_story is None
        or run_story.stage == Stage.INSTALLED
        or _later(ready.finished_at or ready.created_at, run_story.at)
    ):
        return UpdateStory(
            Stage.DOWNLOADED,
            installed=installed,
            version=ready.version,
            headline=f"Firmware {ready.version} is ready to install.",
            at=ready.finished_at,
            by=ready.requested_by,
            download_id=ready.pk,
        )
    if run_story is not None and run_story.stage in (
        Stage.ROLLED_BACK,
        Stage.FAILED,
        Stage.RETURNED,
    ):
        return run_story
    newest = selectors.newest_downloadable(installed)
    if newest is not None:
        return UpdateStory(
            Stage.AVAILABLE,
            installed=installed,
            version=newest.offer.version,
            headline=f"Firmware {newest.offer.version} is available.",
        )
    if run_story is not None:
        return run_story
    if installed is None:
        return UpdateStory(
            Stage.UNKNOWN,
            installed=None,
            version=None,
            headline="The installed firmware level is unknown.",
        )
    return UpdateStory(
        Stage.UP_TO_DATE,
        installed=installed,
        version=installed,
        headline=f"Up to date: firmware {installed}.",
    )
