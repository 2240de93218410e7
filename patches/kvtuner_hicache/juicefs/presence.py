"""What a ``JuiceFSStorage`` remembers about which pages exist: a cache in front of the file
system, which stays the truth."""

from __future__ import annotations

import time

# How long a key whose file a read found gone is reported absent whatever a stat says: longer
# than the entry and attribute caches of a mount (JuiceFS's default is 1 s; docs/juicefs-fleet.md).
GONE_TTL = 5.0


class PresenceMixin:
    """Pages confirmed present (``_known``) and found gone (``_gone``), by monotonic time."""

    def _known_present(self, key: str) -> bool:
        """Whether ``key`` was confirmed present within ``exists_cache_ttl``."""
        seen = self._known.get(key)
        return seen is not None and time.monotonic() - seen <= self.options.exists_cache_ttl

    def _forget_all(self) -> None:
        """Drop what this server believes about which pages exist (a remount, a namespace)."""
        self._known.clear()
        self._gone.clear()

    def _recently_gone(self, key: str) -> bool:
        """Whether a read found ``key``'s file gone within the mount's cache window."""
        seen = self._gone.get(key)
        if seen is None:
            return False
        if time.monotonic() - seen <= GONE_TTL:
            return True
        self._gone.pop(key, None)
        return False

    def _forget(self, key: str) -> None:
        """Note ``key`` as gone now (a read found no file)."""
        self._known.pop(key, None)
        if len(self._gone) > 1_000_000:  # bound memory, as for _known
            self._gone.clear()
        self._gone[key] = time.monotonic()

    def _remember(self, key: str) -> None:
        """Note ``key`` as present now."""
        self._gone.pop(key, None)
        if self.options.exists_cache_ttl > 0:
            if len(self._known) > 1_000_000:  # bound memory; the file system stays the truth
                self._known.clear()
            self._known[key] = time.monotonic()
