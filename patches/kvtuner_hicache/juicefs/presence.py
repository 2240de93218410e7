"""What a ``JuiceFSStorage`` remembers about which page files exist (keyed by path, so one cache
serves the KV pool and every v2 pool): a cache in front of the file system, which stays the
truth."""

from __future__ import annotations

import time
from typing import Dict

# How long a key whose file a read found gone is reported absent whatever a stat says: longer
# than the entry and attribute caches of a mount (JuiceFS's default is 1 s; docs/juicefs-fleet.md).
GONE_TTL = 5.0
# Entries kept at most in each map before it is emptied: bounds memory on a long-lived server.
MAX_ENTRIES = 1_000_000


class PresenceCache:
    """Pages confirmed present and pages found gone, each by the monotonic time it was seen."""

    def __init__(self, ttl: float):
        self.ttl = ttl  # how long a confirmed page is trusted (``exists_cache_ttl``); 0: never
        self._known: Dict[str, float] = {}
        # A read found the file gone: another server's mount deleted it, and this mount's
        # kernel may still return its cached entry and attributes to a stat.
        self._gone: Dict[str, float] = {}

    def present(self, key: str) -> bool:
        """Whether ``key`` was confirmed present within the TTL."""
        seen = self._known.get(key)
        return seen is not None and time.monotonic() - seen <= self.ttl

    def gone(self, key: str) -> bool:
        """Whether a read found ``key``'s file gone within the mount's cache window."""
        seen = self._gone.get(key)
        if seen is None:
            return False
        if time.monotonic() - seen <= GONE_TTL:
            return True
        self._gone.pop(key, None)
        return False

    def remember(self, key: str) -> None:
        """Note ``key`` as present now."""
        self._gone.pop(key, None)
        if self.ttl > 0:
            if len(self._known) > MAX_ENTRIES:  # the file system stays the truth
                self._known.clear()
            self._known[key] = time.monotonic()

    def forget(self, key: str) -> None:
        """Note ``key`` as gone now (a read found no file)."""
        self._known.pop(key, None)
        if len(self._gone) > MAX_ENTRIES:
            self._gone.clear()
        self._gone[key] = time.monotonic()

    def doubt(self, key: str) -> None:
        """Stop answering "present" for ``key`` from memory (a read or stat of it failed)."""
        self._known.pop(key, None)

    def doubt_all(self) -> None:
        """Stop answering "present" from memory for any key (pages were evicted or cleared)."""
        self._known.clear()

    def reset(self) -> None:
        """Drop all that is believed about which pages exist (a remount, a namespace)."""
        self._known.clear()
        self._gone.clear()
