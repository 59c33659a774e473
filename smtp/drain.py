"""The mail service's side of the upgrade's drain: saying when maintenance left nothing open.

Phase 3 turns maintenance on; from then on the service answers 421 to anything new, and
transactions already past MAIL FROM finish their DATA. The phase used to wait a fixed second
for them, downtime paid on every install whether mail was in flight or not. Instead the service
watches: as soon as maintenance is on and none of its connections is inside a transaction, it
writes :func:`appliance.system.maintenance.maintenance_drained_mark` for that maintenance, and
phase 3 goes on (a few milliseconds when idle). A 250 is only sent once the message is on disk,
so "no transaction open" means nothing more will be written for mail accepted before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from appliance.system.errors import ApplianceError
from appliance.system.maintenance import MaintenanceState, maintenance_drained_mark

log = logging.getLogger(__name__)

# How often the service looks: one stat of the maintenance file while there is none, so about
# 0.3% of a core; phase 3 waits this long at most beyond the end of the last transaction.
INTERVAL_S = 0.01


class DrainWatch:
    """Marks each maintenance drained once no transaction is open (runs on the event loop)."""

    def __init__(
        self,
        root: Path,
        maintenance: Callable[[], MaintenanceState | None],
        in_flight: Callable[[], int],
    ) -> None:
        self.root = root
        self.maintenance = maintenance
        self.in_flight = in_flight
        self.marked: datetime | None = None  # the ``since`` of the maintenance marked last

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                state = self.maintenance()
            except (ApplianceError, OSError):
                state = None  # a damaged file: still maintenance, but nothing to name it by
            if state is None:
                self.marked = None
            elif state.since != self.marked and self.in_flight() == 0:
                try:
                    await loop.run_in_executor(None, maintenance_drained_mark, state, self.root)
                except OSError:
                    log.warning("could not mark the maintenance drained", exc_info=True)
                else:
                    self.marked = state.since
            await asyncio.sleep(INTERVAL_S)
