"""The one Celery application: configured from Django settings (CELERY_* names).

Queues: a standalone console uses one queue (CELERY_TASK_DEFAULT_QUEUE, "lmi"). In a cluster
every node's worker consumes its own queue on the shared Redis, ``node_queue(NODE_NAME)``, which
is also its default queue (lmi/settings.py), so a node's own work stays on the node; work for
another node is sent there explicitly with ``apply_async(queue=node_queue(name))``.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lmi.settings")

NODE_QUEUE_PREFIX = "lmi.node."

app = Celery("lmi")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def node_queue(node: str) -> str:
    """The queue a cluster node's worker consumes."""
    return f"{NODE_QUEUE_PREFIX}{node}"
