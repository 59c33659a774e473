"""`manage.py smtp_service [--host H] [--port P]`: run the mail processing service.

Listens on LMI_SMTP_HOST:LMI_SMTP_PORT (loopback, 2525) unless told otherwise, and runs until
SIGTERM or SIGINT, then stops gracefully: no new connections, transactions in flight finish.
`make run` starts it next to the web server, the worker and beat.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from appliance.mail import msgstore
from appliance.system.errors import ApplianceError
from smtp.server import serve
from smtp.spool import SpoolLocked


class Command(BaseCommand):
    help = "Run the mail processing service (SMTP) until SIGTERM or SIGINT."
    # The launcher's setup runs Django's checks once for every process it starts; here they
    # would import every URL, view and the API the mail service never uses (0.27 s a start).
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host", default=settings.SMTP_HOST, help="address to listen on (LMI_SMTP_HOST)"
        )
        parser.add_argument(
            "--port", type=int, default=settings.SMTP_PORT, help="port to listen on (LMI_SMTP_PORT)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host: str = options["host"]
        port: int = options["port"]
        if not 0 <= port <= 65535:
            raise CommandError("--port must be between 0 and 65535")
        try:
            msgstore.format_version()  # the store must exist: the service never creates it
        except ApplianceError as exc:
            raise CommandError(f"{exc} (run manage.py init_appliance first)") from exc

        def ready(bound_host: str, bound_port: int) -> None:
            self.stdout.write(f"SMTP service listening on {bound_host}:{bound_port}")
            self.stdout.flush()

        try:
            serve(host, port, on_ready=ready)
        except SpoolLocked as exc:
            raise CommandError(str(exc)) from exc
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.stdout.write("SMTP service stopped")
