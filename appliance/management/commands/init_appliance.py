"""`manage.py init_appliance [--messages N] [--force]`: build the demo appliance if there is none.

`make run` runs this on every start, so with an appliance in place it only says so and exits
successfully, touching nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from appliance.demo import init_demo
from appliance.errors import ApplianceExists
from appliance.paths import appliance_root
from appliance.system import appliance_exists
from events.models import Category
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
                "seconds": round(seconds, 2),
            },
        )

    def _exists(self, root: Path) -> None:
        self.stdout.write(
            f"An appliance already exists at {root}; nothing to do (--force replaces it)."
        )
