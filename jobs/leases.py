"""Who holds a job (any job of the engine, a download, an install run), and whether it still runs.

Both the download and the install are claimed by a conditional update of ``lease_owner`` and
kept with a heartbeat. A holder that stops heartbeating is gone once its lease lapses; a holder
on this host whose process no longer exists is gone at once, so a worker restarted after a kill
takes its work back in a second instead of waiting out the lease.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from django.utils import timezone


def executor_name(kind: str = "worker") -> str:
    """A name unique to one execution: kind, host, process id and a random tag."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[-1].split()
        return not fields or fields[0] not in (b"Z", b"X")
    except OSError:
        return True


def holder_dead(lease_owner: str) -> bool:
    """True when the holder ran on this host and its process is gone (decided without waiting)."""
    parts = lease_owner.split(":")
    same_host = len(parts) >= 4 and parts[1] == socket.gethostname() and parts[2].isdigit()
    return same_host and not pid_alive(int(parts[2]))


def holder_alive(lease_owner: str, heartbeat_at: datetime | None, lease_seconds: float) -> bool:
    """Is the lease's holder still working? Same host: by its pid; else by the heartbeat."""
    if not lease_owner or holder_dead(lease_owner) or heartbeat_at is None:
        return False
    return heartbeat_at >= timezone.now() - timedelta(seconds=lease_seconds)
