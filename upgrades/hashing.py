"""Digests of a download computed beside it, so hashing overlaps the waits for the network."""

from __future__ import annotations

import queue
import threading
from typing import Protocol

# Blocks in flight between the reader and each hashing thread (1 MiB each at most): enough to
# ride out a slow moment of either side, small enough to bound the memory.
QUEUE_BLOCKS = 16


class Digest(Protocol):
    def update(self, block: bytes, /) -> None: ...


class StreamHasher:
    """Feed it blocks in order with ``update``; ``close`` waits until every digest has them all.

    One thread per digest: the whole file's SHA-256 (checked against the feed) and the signed
    payload's (``appliance.firmware.bundle.PayloadDigest``) run side by side on two cores while
    the download thread waits in recv() or write(); hashlib releases the GIL on large blocks.
    The blocks are shared, not copied. After ``close`` it takes no more blocks.
    """

    def __init__(self, *digests: Digest) -> None:
        self.digests = digests
        self._lanes: list[tuple[queue.Queue[bytes | None], threading.Thread]] = []
        for number, digest in enumerate(digests):
            lane: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_BLOCKS)
            thread = threading.Thread(
                target=self._run, args=(lane, digest), name=f"download-hash-{number}", daemon=True
            )
            thread.start()
            self._lanes.append((lane, thread))

    @staticmethod
    def _run(lane: queue.Queue[bytes | None], digest: Digest) -> None:
        while (block := lane.get()) is not None:
            digest.update(block)

    def update(self, block: bytes) -> None:
        for lane, thread in self._lanes:
            if not thread.is_alive():
                raise RuntimeError("the hasher is closed")
            lane.put(block)

    def close(self) -> None:
        for lane, thread in self._lanes:
            if thread.is_alive():
                lane.put(None)
        for _lane, thread in self._lanes:
            thread.join()
