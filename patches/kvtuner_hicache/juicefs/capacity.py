"""The capacity of a ``JuiceFSStorage`` namespace: reservations per write, and the
maintenance thread that runs the fleet-wide LRU (``eviction.py``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from .eviction import NamespaceEvictor, PassResult
from .page_file import HEADER_SIZE, PAGE_SUFFIX
from .volume import page_relpath

logger = logging.getLogger(__name__)


class CapacityMixin:
    """Reserve bytes before a write; a writer rank keeps the namespace under its capacity."""

    def _reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` of the capacity; False (logged once) when it does not fit."""
        cap = self.options.capacity_bytes
        with self._lock:
            if cap is not None and self.used_bytes + nbytes > cap:
                self.counters["set_refused"] += 1  # the first refused page of a batch
                if not self._capacity_logged:
                    self._capacity_logged = True
                    logger.warning(
                        "juicefs backend: namespace %s is full (capacity %d bytes); "
                        "refusing new pages",
                        self.namespace,
                        cap,
                    )
                return False
            self.used_bytes += nbytes
            self._reserved += nbytes
            return True

    def _release(self, nbytes: int) -> None:
        """Give back capacity a write did not use."""
        with self._lock:
            self.used_bytes -= nbytes
            self._reserved -= nbytes

    def _set_usage(self, nbytes: int, mark: int) -> None:
        """Adopt a namespace-wide count taken after ``mark`` (a ``_reserved`` reading): this
        server's reservations since then may be missing from it, so they are added."""
        with self._lock:
            self.used_bytes = nbytes + self._reserved - mark
            self.counters["usage_bytes"] = nbytes
            cap = self.options.capacity_bytes
            if self._capacity_logged and cap is not None and nbytes < cap:
                self._capacity_logged = False

    # ---------------------------------------------------------------- eviction

    def _used(self, key: str) -> None:
        """Note a page use for the fleet-wide LRU (memory only; flushed in batches)."""
        if self.evictor is not None:
            self.evictor.note(page_relpath(key, PAGE_SUFFIX))

    def _start_maintenance(self) -> None:
        """With a capacity, writer ranks keep the namespace under it (see eviction.py)."""
        cap = self.options.capacity_bytes
        if not self.is_writer or cap is None:
            self._first_round.set()
            return
        o = self.options
        # A new pool may mean a new namespace: the running thread picks up the new evictor.
        self.evictor = NamespaceEvictor(
            self.ns_dir,
            HEADER_SIZE + self.page_bytes,
            cap,
            o.high_watermark,
            o.low_watermark,
            self._executor,
            resolution=o.recency_resolution,
            lease_seconds=max(30.0, 3 * o.evict_interval),
            stale_tmp_age=o.stale_tmp_age,
        )
        if self._maintenance is None:
            self._maintenance = threading.Thread(
                target=self._maintenance_loop, name="juicefs-hicache-evict", daemon=True
            )
            self._maintenance.start()

    def _maintenance_loop(self) -> None:
        o = self.options
        next_flush = next_round = time.monotonic()  # first round at once: learn the usage
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_round:
                    next_round = now + o.evict_interval
                    self.maintain()
                    self._first_round.set()
                elif now >= next_flush and self._volume_ok():
                    self._flush_access_log()
            except Exception as e:  # never let the thread die: the next round retries
                logger.error("juicefs backend: maintenance round failed: %s", e)
            if now >= next_flush:
                next_flush = now + o.access_flush_interval
            self._stop.wait(max(0.0, min(next_flush, next_round) - time.monotonic()))

    def maintain(self) -> Optional[PassResult]:
        """One maintenance round: flush the access log, then as the lease holder run an
        eviction pass, else adopt the usage the holder published. None when not the holder."""
        evictor = self.evictor
        if evictor is None or not self._volume_ok():
            return None
        with self._maintenance_lock:
            try:
                self._flush_access_log()
                if not evictor.hold_lease():
                    published = evictor.read_usage()
                    if published and isinstance(published.get("bytes"), int):
                        # Counted at some point since the last round: add what we wrote since.
                        self._set_usage(published["bytes"], self._round_mark)
                    self._round_mark = self._reserved
                    return None
                mark = self._reserved
                result = evictor.run_pass()
                self._round_mark = self._reserved
            except OSError as e:
                self._io_failed(e)
                logger.warning("juicefs backend: eviction pass failed: %s", e)
                return None
        self._set_usage(result.usage_after, mark)
        if result.evicted_pages:
            self._known.clear()  # never answer "present" from memory for an evicted page
        with self._lock:
            self.counters["eviction_passes"] += 1
            self.counters["evicted_pages"] += result.evicted_pages
            self.counters["evicted_bytes"] += result.evicted_bytes
        return result

    def flush_access_log(self) -> bool:
        """Append this server's pending page uses to its access log now."""
        return self.evictor is None or self._flush_access_log()

    def _flush_access_log(self) -> bool:
        if self.evictor.flush():
            return True
        self._io_failed(self.evictor.last_error)
        return False

    def wait_for_maintenance(self, timeout: Optional[float] = None) -> bool:
        """Wait for the first maintenance round (it learns the namespace's usage)."""
        return self._first_round.wait(timeout)
