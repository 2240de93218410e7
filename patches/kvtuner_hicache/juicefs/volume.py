"""Where the JuiceFS backend keeps its pages on a mount, and whether that mount is still there.
Directory layout and volume health: ``docs/juicefs-backend.md``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Callable, Tuple

logger = logging.getLogger(__name__)

NAMESPACE_MARKER = "namespace.json"
# Seconds between probes of a mount point that changed device (a remount in progress).
REPROBE_INTERVAL = 5.0

_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}\Z")
_SAFE_PART = re.compile(r"[^A-Za-z0-9._+=-]")


def mount_fstype(path: str) -> Tuple[str, str]:
    """(mount root, file system type) of the mount holding ``path``, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    best = ("/", "unknown")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                # Mount points escape spaces as \040.
                point = fields[4].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, right.split()[0])
    except OSError:
        pass
    return best


def blake(data: str, size: int) -> bytes:
    """BLAKE2b of ``data`` in ``size`` bytes."""
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=size).digest()


def _part(text: str, limit: int) -> str:
    """A readable file-name fragment; long ones are cut and keep a hash of the whole."""
    safe = _SAFE_PART.sub("-", text).strip(".") or "none"
    if len(safe) > limit:
        safe = f"{safe[: limit - 9]}~{blake(text, 4).hex()}"
    return safe


def namespace_name(f: dict) -> str:
    """Directory name spelling the namespace fields, ending in a hash of all of them."""
    ranks = "mla" if f["tp"] is None else f"tp{f['tp'][0]}of{f['tp'][1]}"
    ranks += f"-pp{f['pp'][0]}of{f['pp'][1]}-cp{f['cp'][0]}of{f['cp'][1]}-dp{f['dp']}"
    if f["dcp"][1] > 1:
        ranks += f"-dcp{f['dcp'][0]}of{f['dcp'][1]}-lp{f['dcp'][2]}"
    parts = [
        _part(f["model"] or "unnamed", 80),
        ranks,
        f"ps{f['page_size']}-{_part(f['layout'], 24)}",
        _part(f["kv_format"], 48),
        f"{f['page_bytes']}B",
        # The readable parts are lossy (sanitized, cut); the hash keeps namespaces apart.
        "h" + blake(json.dumps(f, sort_keys=True), 6).hex(),
    ]
    return "__".join(parts)


def page_relpath(key: str, suffix: str) -> str:
    """``<shard>/<file>`` of a key inside its namespace: 256 shards by the key's hash."""
    name = key if _SAFE_KEY.match(key) else "h-" + blake(key, 20).hex()
    return os.path.join("%02x" % blake(key, 1)[0], name + suffix)


def key_tag(namespace: str, order: str, key: str) -> int:
    """What binds a page file to its namespace, payload order and key."""
    return int.from_bytes(blake(f"{namespace}\0{order}\0{key}", 8), "little")


class MountWatch:
    """Whether the mount point still holds the volume the backend started on.

    After an unmount (or a dead FUSE daemon) every check fails, so nothing lands on the local
    disk under the bare mount point. A new mount of the same file system type that holds the
    namespace marker is adopted (probed at most every ``REPROBE_INTERVAL`` seconds) and
    ``on_remount`` runs."""

    def __init__(self, mount_point: str, fstype: str, on_remount: Callable[[], None]):
        self.mount_point = mount_point
        self.fstype = fstype
        self.dev = os.stat(mount_point).st_dev
        self.last_reprobe = 0.0
        self._on_remount = on_remount
        self._lost_logged = False

    def holds(self, marker: str) -> bool:
        """True while the volume is mounted; ``marker`` is a file the volume must hold."""
        try:
            dev = os.stat(self.mount_point).st_dev
        except OSError as e:  # ENOTCONN after the FUSE daemon died, ENOENT, ...
            return self._lost(f"stat failed: {e}")
        if dev == self.dev:
            return True
        # Remounted? Adopt the new mount only when it is the same kind of file system and
        # already holds our namespace; probe at most every few seconds.
        now = time.monotonic()
        if now - self.last_reprobe < REPROBE_INTERVAL:
            return False
        self.last_reprobe = now
        if mount_fstype(self.mount_point)[1] == self.fstype and os.path.isfile(marker):
            logger.warning("juicefs backend: %s was remounted; resuming", self.mount_point)
            self.dev, self._lost_logged = dev, False
            self._on_remount()
            return True
        return self._lost("a different file system is mounted there now")

    def _lost(self, why: str) -> bool:
        """Log the first loss of the volume; always False."""
        if not self._lost_logged:
            self._lost_logged = True
            logger.error(
                "juicefs backend: volume at %s unavailable (%s); all lookups miss",
                self.mount_point,
                why,
            )
        return False
