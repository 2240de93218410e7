"""The capacity of a ``JuiceFSStorage`` namespace: the bytes this server counts as used
(reserved before each write), and the maintenance that keeps the namespace under its capacity
fleet-wide (``eviction.py``'s LRU, run in rounds on a thread)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor
from typing import Callable, Optional

from .eviction import NamespaceEvictor, PassResult
from .options import JuiceFSOptions
from .page_file import PAGE_SUFFIX
from .volume import page_relpath

logger = logging.getLogger(__name__)


class Capacity:
    """Bytes of the namespace in use as this server counts them, against an optional limit."""

    def __init__(self, limit: Optional[int]):
        self.limit = limit
        self.used_bytes = 0
        # Bytes this server ever reserved (and kept): a reading marks where a count began.
        self.reserved = 0
        self.counted_bytes = 0  # the last namespace-wide count adopted
        self._full_logged = False
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, namespace: Optional[str]) -> bool:
        """Take ``nbytes``; False when they do not fit (logged once, naming ``namespace``)."""
        with self._lock:
            if self.limit is not None and self.used_bytes + nbytes > self.limit:
                if not self._full_logged:
                    self._full_logged = True
                    logger.warning(
                        "juicefs backend: namespace %s is full (capacity %d bytes); "
                        "refusing new pages",
                        namespace,
                        self.limit,
                    )
                return False
            self.used_bytes += nbytes
            self.reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back capacity a write did not use."""
        with self._lock:
            self.used_bytes -= nbytes
            self.reserved -= nbytes

    def adopt(self, nbytes: int, mark: int) -> None:
        """Adopt a namespace-wide count taken after ``mark`` (a ``reserved`` reading): this
        server's reservations since then may be missing from it, so they are added."""
        with self._lock:
            self.used_bytes = nbytes + self.reserved - mark
            self.counted_bytes = nbytes
            if self._full_logged and self.limit is not None and nbytes < self.limit:
                self._full_logged = False

    def reset(self) -> None:
        """Count the namespace as empty (its pages were deleted)."""
        with self._lock:
            self.used_bytes = 0
            self._full_logged = False


class Maintenance:
    """A writer rank's upkeep of its namespace: the evictor, and the thread running its rounds."""

    def __init__(
        self,
        options: JuiceFSOptions,
        capacity: Capacity,
        volume_ok: Callable[[], bool],
        io_failed: Callable[[Optional[OSError]], None],
    ):
        self.options = options
        self.capacity = capacity
        # The backend's volume watch: a round needs the volume, and reports its I/O errors.
        self._volume_ok = volume_ok
        self._io_failed = io_failed
        self.evictor: Optional[NamespaceEvictor] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # one round at a time: the thread's and a caller's
        self._stop = threading.Event()
        self._first_round = threading.Event()
        self._round_mark = 0  # capacity.reserved at the end of the last round

    def start(
        self, ns_dir: str, page_file_bytes: int, executor: Executor, rounds: Callable[[], object]
    ) -> None:
        """Keep ``ns_dir`` under the capacity; the first call starts a thread calling ``rounds``."""
        o = self.options
        # A new pool may mean a new namespace: the running thread picks up the new evictor.
        self.evictor = NamespaceEvictor(
            ns_dir,
            page_file_bytes,
            self.capacity.limit,
            o.high_watermark,
            o.low_watermark,
            executor,
            resolution=o.recency_resolution,
            lease_seconds=max(30.0, 3 * o.evict_interval),
            stale_tmp_age=o.stale_tmp_age,
        )
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, args=(rounds,), name="juicefs-hicache-evict", daemon=True
            )
            self._thread.start()

    def skip(self) -> None:
        """No upkeep here (a reader rank, or no capacity): nobody waits for a first round."""
        self._first_round.set()

    def _loop(self, rounds: Callable[[], object]) -> None:
        o = self.options
        next_flush = next_round = time.monotonic()  # first round at once: learn the usage
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_round:
                    next_round = now + o.evict_interval
                    rounds()
                    self._first_round.set()
                elif now >= next_flush and self._volume_ok():
                    self.flush()
            except Exception as e:  # never let the thread die: the next round retries
                logger.error("juicefs backend: maintenance round failed: %s", e)
            if now >= next_flush:
                next_flush = now + o.access_flush_interval
            self._stop.wait(max(0.0, min(next_flush, next_round) - time.monotonic()))

    def run_round(self) -> Optional[PassResult]:
        """Flush the access log, then as the lease holder run an eviction pass, else adopt the
        usage the holder published. None when not the holder."""
        evictor = self.evictor
        if evictor is None or not self._volume_ok():
            return None
        with self._lock:
            try:
                self.flush()
                if not evictor.hold_lease():
                    published = evictor.read_usage()
                    if published and isinstance(published.get("bytes"), int):
                        # Counted at some point since the last round: add what we wrote since.
                        self.capacity.adopt(published["bytes"], self._round_mark)
                    self._round_mark = self.capacity.reserved
                    return None
                mark = self.capacity.reserved
                result = evictor.run_pass()
                self._round_mark = self.capacity.reserved
            except OSError as e:
                self._io_failed(e)
                logger.warning("juicefs backend: eviction pass failed: %s", e)
                return None
        self.capacity.adopt(result.usage_after, mark)
        return result

    def note(self, key: str) -> None:
        """Note a page use for the fleet-wide LRU (memory only; flushed in batches)."""
        if self.evictor is not None:
            self.evictor.note(page_relpath(key, PAGE_SUFFIX))

    def flush(self) -> bool:
        """Append this server's pending page uses to its access log now."""
        if self.evictor is None or self.evictor.flush():
            return True
        self._io_failed(self.evictor.last_error)
        return False

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the first round (it learns the namespace's usage)."""
        return self._first_round.wait(timeout)

    def stop(self) -> None:
        """End the thread; leave this life's page uses and the lease to the fleet."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._volume_ok():
                self.flush()  # this life's page uses count after a restart
                self.evictor.release_lease()  # another server takes over without waiting
