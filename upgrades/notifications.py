"""The notices Updates & Licensing puts on Home (and on its own page).

One notice tells the update story (upgrades.story): "Firmware X is available", the download's
progress, "ready to install", the install's phase, then its outcome. The story has one stage at
a time, so a notice is replaced when the state moves on, never stacked on the one before. Two
warnings may stand beside it: a failed feed check, and a failed download nothing replaced.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.urls import reverse
from django.utils import timezone

from lmi.notices import Notice
from upgrades import selectors
from upgrades.models import DownloadState
from upgrades.story import Stage, UpdateStory, update_story

NOTES_SHOWN = 160
# How long Home announces an install's outcome; the Install page keeps telling it.
OUTCOME_SHOWN = timedelta(days=1)


def _summary(notes: str) -> str:
    """The release notes' first line, shortened for a one-line notice."""
    first = next((line.strip() for line in notes.splitlines() if line.strip()), "")
    return first if len(first) <= NOTES_SHOWN else first[: NOTES_SHOWN - 1].rstrip() + "…"


def _run_link(story: UpdateStory) -> str:
    if story.run_id is None:
        return reverse("upgrades:install")
    return reverse("upgrades:install_run", args=[story.run_id])


def story_notice(story: UpdateStory) -> Notice | None:
    """The story as one notice, or None when there is nothing to announce."""
    page = reverse("upgrades:index")
    text = story.headline + (f" {story.reason}" if story.reason else "")
    if story.stage in (Stage.INSTALLING, Stage.ROLLING_BACK):
        return Notice(story.level, text, "Install progress", _run_link(story))
    if story.stage == Stage.DOWNLOADING:
        return Notice("info", text, "Updates & Licensing", page)
    if story.stage == Stage.DOWNLOADED:
        return Notice("info", text, "Install", reverse("upgrades:install"))
    if story.stage == Stage.AVAILABLE:
        return _available_notice(story, page)
    if story.stage == Stage.FAILED:
        return Notice("error", text, "Details", _run_link(story))
    if story.stage in (Stage.INSTALLED, Stage.ROLLED_BACK, Stage.RETURNED):
        if story.at is None or story.at < timezone.now() - OUTCOME_SHOWN:
            return None
        if story.stage == Stage.INSTALLED:
            text = f"Upgrade complete: firmware {story.version}."
        return Notice(story.level, text, "Details", _run_link(story))
    return None


def _available_notice(story: UpdateStory, page: str) -> Notice:
    newest = selectors.newest_downloadable(story.installed)
    notes = _summary(newest.offer.release_notes) if newest is not None else ""
    text = story.headline + (f" {notes}" if notes else "")
    lic = selectors.license_view()
    if lic.entitled:
        return Notice("info", text, "Release notes and Download", page)
    return Notice(
        "warning",
        f"{text} Downloading it needs a valid license: {lic.reason}",
        "Licensing",
        page + "#licensing",
    )


def update_notices(*, with_story: bool = True) -> list[Notice]:
    """The story's notice, then what went wrong beside it.

    ``with_story=False`` leaves the story's own notice out, for a page that leads with the story
    itself (Updates & Licensing): the same news twice, one of them stale, is what this replaces.
    """
    story = update_story()
    page = reverse("upgrades:index")
    notice = story_notice(story) if with_story else None
    notices = [notice] if notice is not None else []
    from upgrades.validation import validation_notice  # issue 18: one, for the last install

    if (proof := validation_notice()) is not None:
        notices.append(proof)
    from upgrades.schedule import schedule_notices  # issue 18: the scheduled install

    notices = schedule_notices(notices, story_stage=str(story.stage))

    notices = _return_notices(notices, story)  # issue 18: the way back
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
        story.stage != Stage.DOWNLOADING
        and latest is not None
        and latest.state == DownloadState.FAILED
        and story.ready_version != latest.version
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


def _return_notices(
    notices: list[Notice], story: UpdateStory, now: datetime | None = None
) -> list[Notice]:
    """Home's notices with the way back's, one after the other rather than stacked: the
    upgrade's own "Upgrade complete" while it shows (its first day; the Install page says until
    when a return is possible), then "Return to ... possible until", then in the last day
    before the release a warning."""
    from upgrades.returning import RELEASE_WARNING, return_available

    if story.stage in (Stage.INSTALLING, Stage.ROLLING_BACK):
        return notices
    now = now or timezone.now()
    way = return_available(now)
    if not way.available or way.until is None:
        return notices
    link = reverse("upgrades:install") + "#return"
    if now >= way.until - RELEASE_WARNING:
        return [
            *notices,
            Notice(
                "warning",
                f"The way back to firmware {way.target} is released on {way.until_text}: the "
                "previous system and configuration are then removed and their disk space "
                f"returned. Return to firmware {way.target} before then if the upgrade proved "
                "wrong.",
                f"Return to {way.target}",
                link,
            ),
        ]
    own = story_notice(story) if story.run_id == way.upgrade.pk else None  # type: ignore[union-attr]
    if own is not None and own in notices:
        return notices
    text = f"Return to firmware {way.target} possible until {way.until_text}."
    return [*notices, Notice("info", text, f"Return to {way.target}", link)]
