"""`manage.py adduser NAME --role admin|read-only [--password-stdin]`: add a console user.

The password is asked twice at a prompt, or read from the first line of stdin for scripts; it
never appears in the command line (where `ps` and shell history would keep it).
"""

from __future__ import annotations

import getpass
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.roles import ADMINISTRATOR, READ_ONLY
from accounts.services import UserRefused, user_create

ROLE_ARGUMENTS = {"admin": ADMINISTRATOR, "read-only": READ_ONLY}


def _operator() -> str:
    """Who added the user, for the event: the system account running the command."""
    try:
        return f"{getpass.getuser()} (manage.py adduser)"
    except (KeyError, OSError):  # no login name in a bare container
        return "manage.py adduser"


class Command(BaseCommand):
    help = "Add a console user with a role; the password comes from a prompt or stdin."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the user name to log in with")
        parser.add_argument(
            "--role",
            required=True,
            choices=sorted(ROLE_ARGUMENTS),
            help="admin changes everything; read-only sees every page and changes nothing",
        )
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of stdin instead of prompting",
        )

    def _password(self, from_stdin: bool) -> str:
        if from_stdin:
            line = sys.stdin.readline()
            if not line:
                raise CommandError("No password on stdin.")
            return line.rstrip("\r\n")
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password again: "):
            raise CommandError("The two passwords differ: no user added.")
        return first

    def handle(self, *args: Any, **options: Any) -> None:
        role = ROLE_ARGUMENTS[options["role"]]
        password = self._password(options["password_stdin"])
        try:
            user = user_create(
                options["name"],
                password,
                administrator=role == ADMINISTRATOR,
                created_by=_operator(),
            )
        except UserRefused as exc:
            raise CommandError(f"No user added: {exc}") from exc
        self.stdout.write(f"Added user {user.get_username()} ({role}).")
