"""`manage.py init_appliance [--messages N] [--force]`: build the demo appliance if there is none.

`make run` runs this on every start, so with an appliance in place it only says so and exits
successfully, touching nothing. The demo firmware updates (vendor key, feed, license; see
appliance/firmware/demo_feed.py) come with a new appliance, and are added to an existing demo
appliance that lacks them, so older development setups get them too; a real appliance (another
serial) never gets the demo vendor's key.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from appliance.demo import init_demo
from appliance.firmware.demo_feed import demo_updates_missing, init_demo_updates, is_demo_appliance
from appliance.system.errors import ApplianceError, ApplianceExists
from appliance.system.facts import appliance_exists
from appliance.system.paths import appliance_root
from events.models import Category, Severity
from events.services import event_write


class Command(BaseCommand):
    help = "Create the demo appliance (firmware 2.8.0.0) under APPLIANCE_ROOT if there is none."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--messages",
            type=int,
            default=3000,
            help="messages to put in the message store (default 3000)",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="replace an existing appliance (everything under the root is deleted)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        messages: int = options["messages"]
        force: bool = options["force"]
        if messages < 0:
            raise CommandError("--messages must not be negative")
        root = appliance_root()
        if appliance_exists(root) and not force:
            self._exists(root)
            return
        started = time.monotonic()
        try:
            summary = init_demo(root, messages=messages, force=force)
        except ApplianceExists:
            self._exists(root)  # another process built it since we looked
            return
        updates = self._demo_updates(root)
        seconds = time.monotonic() - started
        self.stdout.write(
            self.style.SUCCESS(
                f"Created the demo appliance at {root}: firmware {summary.firmware_version}, "
                f"{summary.messages} messages, {summary.policy_objects} policy objects "
                f"({summary.file_macro_objects} using $(FILE)), in {seconds:.1f} s."
            )
        )
        event_write(
            category=Category.SYSTEM,
            message=(
                f"Demo appliance {'re' if force else ''}created "
                f"(firmware {summary.firmware_version}, {summary.messages} messages)"
            ),
            details={
                "command": "init_appliance",
                "root": str(root),
                "firmware_version": summary.firmware_version,
                "messages": summary.messages,
                "policy_objects": summary.policy_objects,
                "file_macro_objects": summary.file_macro_objects,
                "forced": force,
                "demo_updates": updates,
                "seconds": round(seconds, 2),
            },
        )

    def _exists(self, root: Path) -> None:
        # Only a demo appliance gets the demo vendor's key and license, never a real one.
        missing = (
            demo_updates_missing(Path(settings.VAR_DIR), root) if is_demo_appliance(root) else []
        )
        if not missing:
            self.stdout.write(
                f"An appliance already exists at {root}; nothing to do (--force replaces it)."
            )
            return
        self.stdout.write(f"An appliance already exists at {root}; adding the demo updates.")
        outcome = self._demo_updates(root)
        failed = outcome != "ready"
        event_write(
            category=Category.UPDATE,
            severity=Severity.WARNING if failed else Severity.INFO,
            message=(
                "Demo firmware updates could not be added"
                if failed
                else f"Demo firmware updates added ({', '.join(missing)})"
            ),
            details={
                "command": "init_appliance",
                "root": str(root),
                "missing": missing,
                "demo_updates": outcome,
            },
        )

    def _demo_updates(self, root: Path) -> str:
        """Add the demo vendor key, feed and license; a failure is reported, not fatal."""
        var_dir = Path(settings.VAR_DIR)
        try:
            init_demo_updates(var_dir, root, out=self.stdout)
        except (ApplianceError, OSError) as exc:
            self.stderr.write(f"The demo firmware updates could not be set up: {exc}")
            return f"failed: {exc}"
        self.stdout.write(
            f"Demo firmware updates ready: feed {settings.UPDATE_FEED_URL} (2.8.1.0 and "
            f"2.8.0.0), vendor key in {var_dir / 'demo-vendor'}, license for this appliance."
        )
        return "ready"
