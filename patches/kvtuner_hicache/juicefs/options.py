"""Options of the JuiceFS backend, read from ``--hicache-storage-backend-extra-config``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _parse_size(name: str, value: Any) -> Optional[int]:
    """A positive byte count from a number or a size like ``"64GiB"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"juicefs backend: {name} must be a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(
                f"juicefs backend: {name} must be bytes or a size like '64GiB', got {value!r}"
            )
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"juicefs backend: {name} must be positive, got {value!r}")
    return n


def _parse_bool(name: str, value: Any, default: bool) -> bool:
    """A JSON or string boolean; ``default`` when absent."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"juicefs backend: {name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class JuiceFSOptions:
    """Options read from ``--hicache-storage-backend-extra-config``."""

    mount_point: str
    # Directory under the mount point holding all namespaces.
    root_dir: str = "sglang-hicache"
    # Worker threads for batch I/O (FUSE requests overlap; the GIL is released in syscalls).
    threads: int = 8
    # Bytes this backend may publish into its namespace; a full namespace refuses new pages
    # (set returns False, SGLang stops that backup) while existing pages keep serving reads.
    capacity_bytes: Optional[int] = None
    # Refuse a mount point that is not a JuiceFS mount instead of warning.
    require_juicefs: bool = False
    # fsync each page before publishing (JuiceFS already uploads on close; off by default).
    fsync: bool = False
    # Seconds a confirmed page is remembered as present without asking the file system.
    exists_cache_ttl: float = 60.0
    # Temporaries older than this (seconds; left by killed writers) are removed by the
    # startup scan that a capacity triggers; clear() removes all of them.
    stale_tmp_age: float = 3600.0

    @classmethod
    def from_extra_config(cls, extra: Optional[dict]) -> "JuiceFSOptions":
        """Validated options from the backend's extra config dict."""
        extra = dict(extra or {})
        mount = extra.get("mount_point")
        if not mount or not isinstance(mount, str):
            raise ValueError(
                "juicefs backend: 'mount_point' is required in "
                '--hicache-storage-backend-extra-config, e.g. \'{"mount_point": "/mnt/jfs"}\''
            )
        if not os.path.exists(mount):
            raise ValueError(f"juicefs backend: mount_point {mount!r} does not exist")
        if not os.path.isdir(mount):
            raise ValueError(f"juicefs backend: mount_point {mount!r} is not a directory")
        root_dir = extra.get("root_dir", cls.root_dir)
        if (
            not isinstance(root_dir, str)
            or not root_dir
            or os.path.isabs(root_dir)
            or ".." in root_dir.split("/")
        ):
            raise ValueError(
                "juicefs backend: root_dir must be a relative path inside the mount, "
                f"got {root_dir!r}"
            )
        threads = extra.get("threads", cls.threads)
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
            raise ValueError(
                f"juicefs backend: threads must be an integer in 1..256, got {threads!r}"
            )
        floats = {}
        for name in ("exists_cache_ttl", "stale_tmp_age"):
            value = extra.get(name, getattr(cls, name))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"juicefs backend: {name} must be a number >= 0, got {value!r}")
            floats[name] = float(value)
        return cls(
            mount_point=os.path.realpath(mount),
            root_dir=root_dir.strip("/"),
            threads=threads,
            capacity_bytes=_parse_size("capacity_bytes", extra.get("capacity_bytes")),
            require_juicefs=_parse_bool("require_juicefs", extra.get("require_juicefs"), False),
            fsync=_parse_bool("fsync", extra.get("fsync"), False),
            **floats,
        )
