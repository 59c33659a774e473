"""A file tree as a comparable value, for tests that prove a step left a tree untouched."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_snapshot(top: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``top``: kind, permission bits and content hash (or link target)."""
    snapshot: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = os.lstat(path)
            rel = str(path.relative_to(top))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                snapshot[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                snapshot[rel] = ("dir", mode, "")
            elif stat.S_ISREG(st.st_mode):
                with path.open("rb") as handle:  # in blocks: a store can be gigabytes
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
                snapshot[rel] = ("file", mode, digest)
            else:
                # A FIFO or device: reading it could block forever, and its kind is what counts.
                snapshot[rel] = ("special", mode, "")
    return snapshot
