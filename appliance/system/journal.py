"""Recovering an all-or-nothing change of many files from its journal.

A configuration restore and a system restore each write a journal before they change the first
file, and mark it at their commit point; after a crash, :func:`journal_recover` reads it and
either finishes the change (it had passed its commit point) or undoes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.system.errors import ApplianceError, MalformedApplianceFile
from appliance.system.safejson import read_json

Journal = dict[str, Any]


def journal_recover(
    path: Path,
    *,
    committed: str,
    finish: Callable[[Journal], None],
    undo: Callable[[Journal], None],
    damaged: type[ApplianceError],
) -> bool:
    """Finish or undo the change ``path`` journals; True when it was finished.

    ``committed`` is the journal's state once the change passed its commit point; before it,
    nothing had been replaced yet and ``undo`` cleans up. No journal: nothing to do (False). A
    journal that is not JSON raises ``damaged``.
    """
    try:
        journal = read_json(path)
    except MalformedApplianceFile as exc:
        raise damaged(f"The interrupted restore's journal {path} is damaged.") from exc
    if journal is None:
        return False
    if journal.get("state") == committed:
        finish(journal)
        return True
    undo(journal)
    return False
