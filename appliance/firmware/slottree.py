"""A system image's tree and its manifest, and the errors of the firmware slots.

A tree manifest lists every entry of an image (path, type, mode, size and SHA-256 per file,
target per symbolic link); the slots record one when an image is installed or sealed and read
the whole tree back against it before they trust it. The bytes read and written on the way go
through a :class:`Meter`, which paces them so the mail service keeps its throughput, reports
progress and honours a request to stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.firmware.signing import canonical_json
from appliance.system.errors import ApplianceError

CHUNK = 1024 * 1024

# Report progress at most this often (plus at the start and the end of each stage).
_PROGRESS_STEP = 1024 * 1024
# Longest single sleep of the throttle, so should_stop is honoured promptly.
_MAX_SLEEP = 0.1
Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


class FirmwareError(ApplianceError):
    """A firmware slot cannot be installed, verified or switched; the message says why."""


class SlotCorrupt(FirmwareError):
    """A slot's files differ from the manifest recorded when it was written."""


class SlotNotBootable(FirmwareError):
    """The slot was never completely written and read back (or has no manifest)."""


class InstallAborted(FirmwareError):
    """``should_stop`` asked the install to stop; the partial slot was removed."""


def tree_sha256(entries: list[dict[str, Any]]) -> str:
    """The digest of a whole tree manifest, as the slot's state records it."""
    return hashlib.sha256(canonical_json(entries)).hexdigest()


def remove_tree(path: Path) -> int:
    """Remove a file, link or directory tree (links never followed); return the bytes freed."""
    freed = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return st.st_size
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o700)  # a read-only directory of the image must still be emptied
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            with contextlib.suppress(FileNotFoundError):
                freed += os.lstat(os.path.join(dirpath, name)).st_size
    shutil.rmtree(path)
    return freed


class Meter:
    """Throttles and reports the bytes of one install; checks should_stop between chunks."""

    def __init__(
        self,
        total: int,
        rate_limit: int | None,
        progress: Progress | None,
        should_stop: ShouldStop | None,
    ) -> None:
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be a positive number of bytes per second")
        self.total = total
        self.done = 0
        self._rate = rate_limit
        self._progress = progress
        self._should_stop = should_stop
        self._throttled = 0
        self._started = time.monotonic()
        self._reported = -_PROGRESS_STEP

    @property
    def chunk(self) -> int:
        """Chunks small enough that a throttled install still reacts within a fraction of 1 s."""
        if self._rate is None:
            return CHUNK
        return max(64 * 1024, min(CHUNK, self._rate // 10))

    def check_stop(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise InstallAborted("The firmware installation was stopped; nothing was changed.")

    def advance(self, count: int, *, throttle: bool = True) -> None:
        self.done += count
        if throttle and self._rate is not None:
            self._throttled += count
            while True:
                self.check_stop()
                ahead = self._throttled / self._rate - (time.monotonic() - self._started)
                if ahead <= 0:
                    break
                time.sleep(min(ahead, _MAX_SLEEP))
        self.check_stop()
        self.report()

    def report(self, force: bool = False) -> None:
        if self._progress is None:
            return
        if force or self.done - self._reported >= _PROGRESS_STEP:
            self._reported = self.done
            self._progress(min(self.done, self.total), self.total)


def _hash_file(path: Path, meter: Meter | None, *, throttle: bool = True) -> tuple[int, str]:
    """Size and SHA-256 of a regular file opened without following a symlink."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(OSError, AttributeError):
            # The read-back must come from the disk, not from what is still in the page cache.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunk = meter.chunk if meter else CHUNK
        while data := os.read(fd, chunk):
            digest.update(data)
            size += len(data)
            if meter is not None:
                meter.advance(len(data), throttle=throttle)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def _scan(top: Path) -> dict[str, os.stat_result]:
    """Every entry under ``top`` by relative POSIX path, via lstat (links never followed)."""
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            found[path.relative_to(top).as_posix()] = os.lstat(path)
    return found


def record_tree(top: Path, meter: Meter | None = None) -> list[dict[str, Any]]:
    """The manifest of an existing tree (used to seal a slot that was not installed by us)."""
    entries = []
    for rel, st in sorted(_scan(top).items()):
        path = top / rel
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            entries.append({"path": rel, "type": "dir", "mode": mode})
        elif stat.S_ISLNK(st.st_mode):
            entries.append({"path": rel, "type": "symlink", "target": os.readlink(path)})
        elif stat.S_ISREG(st.st_mode):
            size, sha = _hash_file(path, meter, throttle=False)
            entries.append({"path": rel, "type": "file", "mode": mode, "size": size, "sha256": sha})
        else:
            raise FirmwareError(f'"{rel}" in {top.name} is neither a file, a directory nor a link.')
    return entries


def verify_tree(top: Path, entries: list[dict[str, Any]], meter: Meter | None) -> None:
    """Read the whole tree back and compare it with the manifest; raise SlotCorrupt if not equal."""
    if top.is_symlink() or not top.is_dir():
        raise SlotCorrupt(f"The firmware slot {top.name} is missing.")
    actual = _scan(top)
    expected = {entry["path"]: entry for entry in entries}
    problems = [f'"{path}" is missing' for path in sorted(expected.keys() - actual.keys())]
    problems += [f'"{path}" is not in the image' for path in sorted(actual.keys() - expected)]
    for path, entry in sorted(expected.items()):
        st = actual.get(path)
        if st is None:
            continue
        kind = entry["type"]
        if kind == "dir":
            if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != entry["mode"]:
                problems.append(f'"{path}" is not the directory it should be')
        elif kind == "symlink":
            if not stat.S_ISLNK(st.st_mode) or os.readlink(top / path) != entry["target"]:
                problems.append(f'"{path}" is not the symbolic link it should be')
        elif not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
            problems.append(f'"{path}" has the wrong type or size')
        elif stat.S_IMODE(st.st_mode) != entry["mode"]:
            problems.append(f'"{path}" has the wrong permissions')
        else:
            size, sha = _hash_file(top / path, meter)
            if size != entry["size"] or not hmac.compare_digest(sha, entry["sha256"]):
                problems.append(f'"{path}" has different content (SHA-256 mismatch)')
        if len(problems) >= 10:
            break
    if problems:
        raise SlotCorrupt(
            f"The firmware slot {top.name} does not match its manifest: " + "; ".join(problems)
        )
