"""`manage.py ensure_admin`: create the first administrator when the console has no user."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand

from accounts.services import first_admin_ensure


class Command(BaseCommand):
    help = "Create the first administrator 'admin' (password from LMI_ADMIN_PASSWORD) if none."

    def handle(self, *args: Any, **options: Any) -> None:
        created, generated = first_admin_ensure(os.environ.get("LMI_ADMIN_PASSWORD"))
        if not created:
            self.stdout.write("Users exist already; no administrator created.")
        elif generated:
            self.stdout.write(
                self.style.WARNING(
                    "Created the administrator 'admin' with the generated password: "
                    f"{generated}\n  (shown once; set LMI_ADMIN_PASSWORD to choose it)"
                )
            )
        else:
            self.stdout.write(
                "Created the administrator 'admin' (password from LMI_ADMIN_PASSWORD)."
            )
