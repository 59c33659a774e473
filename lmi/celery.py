"""The one Celery application: configured from Django settings (CELERY_* names).

Queues: a standalone console uses one queue (CELERY_TASK_DEFAULT_QUEUE, "lmi"). In a cluster
every node's worker consumes its own queue on the shared Redis, ``node_queue(NODE_NAME)``, which
is also its default queue (lmi/settings.py), so a node's own work stays on the node; work for
another node is sent there explicitly with ``apply_async(queue=node_queue(name))``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")

NODE_QUEUE_PREFIX = "lmi.node."

app = Celery("lmi")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def node_queue(node: str) -> str:
    """The queue a cluster node's worker consumes."""
    return f"{NODE_QUEUE_PREFIX}{node}"


def enqueue(task: str, *args: Any, countdown: float | None = None) -> None:
    """Hand work to the worker by its task's registered name.

    Services never import their ``tasks`` module (tasks import services, never the other
    way), so the layers stay a line, not a circle. Raises what the broker raises when it cannot
    take the message; the caller decides what a lost hand-off means for its work.
    """
    app.send_task(task, args=list(args), countdown=countdown)
