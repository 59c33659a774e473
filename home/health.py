"""Health of the console's parts: database, Redis, Celery worker."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import connection

from lmi.celery import app as celery_app

TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class HealthReport:
    """up/down per part; ok only when all are up."""

    database: bool
    redis: bool
    worker: bool

    @property
    def ok(self) -> bool:
        return self.database and self.redis and self.worker

    def as_dict(self) -> dict[str, object]:
        def word(up: bool) -> str:
            return "up" if up else "down"

        return {
            "status": "ok" if self.ok else "degraded",
            "database": word(self.database),
            "redis": word(self.redis),
            "worker": word(self.worker),
        }


def database_up() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)
    except Exception:
        return False


def redis_up() -> bool:
    try:
        client = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
        )
        return bool(client.ping())
    except Exception:
        return False


def worker_up() -> bool:
    """At least one Celery worker answers a broadcast ping."""
    try:
        # limit=1: the first reply settles it, instead of waiting out the timeout every time.
        replies = celery_app.control.ping(timeout=TIMEOUT_SECONDS, limit=1)
    except Exception:
        return False
    return bool(replies)


def check_all() -> HealthReport:
    db = database_up()
    rd = redis_up()
    return HealthReport(database=db, redis=rd, worker=worker_up() if rd else False)
