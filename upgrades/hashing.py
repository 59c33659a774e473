"""SHA-256 of a download computed beside it, so hashing overlaps the waits for the network."""

from __future__ import annotations

import hashlib
import queue
import threading

# Blocks in flight between the reader and the hashing thread (1 MiB each at most): enough to
# ride out a slow moment of either side, small enough to bound the memory.
QUEUE_BLOCKS = 16


class StreamHasher:
    """Feed it blocks in order with ``update``; ``hexdigest`` waits for the last one.

    hashlib releases the GIL on large blocks, so the hashing thread runs while the download
    thread waits in recv() or write(). After ``hexdigest`` or ``close`` it takes no more blocks.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._thread = threading.Thread(target=self._run, name="download-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            self._digest.update(block)

    def update(self, block: bytes) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the hasher is closed")
        self._queue.put(block)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()
