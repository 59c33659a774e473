"""manage.py cluster_join TOKEN: a member asks Cluster Central to accept it."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cluster import member_services, plumbing


class Command(BaseCommand):
    help = (
        "Join Cluster Central (LMI_CLUSTER_CENTRAL) with a join token created on its Cluster "
        "page. This node must run with LMI_CLUSTER_ROLE=member; the worker must be running to "
        "send the request and receive the answer."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("token")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            link = member_services.cluster_join_request(token=options["token"], user="cluster_join")
        except plumbing.ClusterError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Asked Cluster Central {link.central} to accept this node; the Cluster page shows "
            "its answer."
        )
