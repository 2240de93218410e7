"""Where the JuiceFS backend keeps its pages on a mount, and whether that mount is still there.
Directory layout and volume health: ``docs/juicefs-backend.md``."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Callable, Optional, Tuple

from .page_file import FORMAT_VERSION

logger = logging.getLogger(__name__)

NAMESPACE_MARKER = "namespace.json"
# Seconds between probes of a mount point that changed device (a remount in progress).
REPROBE_INTERVAL = 5.0
# Seconds between probes of a volume that stopped answering.
PROBE_INTERVAL = 1.0
# Errors that mean the volume (its metadata engine or FUSE daemon) is not answering, as opposed
# to one page being absent or damaged.
VOLUME_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)

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


def namespace_fields(cfg, pool, is_mla: bool, page_size: int, page_bytes: int) -> dict:
    """What the namespace must tell apart, spelled out (written to ``namespace.json``)."""
    tag_fn = getattr(pool, "kvtuner_namespace_tag", None)
    kv_format = str(tag_fn()) if callable(tag_fn) else str(pool.dtype).replace("torch.", "")
    return {
        "format": FORMAT_VERSION,
        "model": cfg.model_name or "",
        # MLA KV is replicated over TP ranks: one copy serves all of them.
        "tp": None if is_mla else [cfg.tp_rank, cfg.tp_size],
        # Fields older releases' configs lack (pp_* before 0.5.8, attn_cp_* before 0.5.11)
        # read as one stage and one rank.
        "pp": [getattr(cfg, "pp_rank", 0), getattr(cfg, "pp_size", 1)],
        "cp": [getattr(cfg, "attn_cp_rank", 0), getattr(cfg, "attn_cp_size", 1)],
        "dp": getattr(cfg, "dp_rank", 0),
        "dcp": [
            getattr(cfg, "dcp_rank", 0),
            getattr(cfg, "dcp_size", 1),
            getattr(cfg, "logical_page_size", None),
        ],
        "page_size": page_size,
        "layout": str(pool.layout),
        "kv_format": kv_format,
        "page_bytes": page_bytes,
    }


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


# What tells two host pools of one name apart, where the pool has it (spelled out in the pool's
# namespace.json and hashed into its name): a pool of another shape or dtype never reads them.
POOL_GEOMETRY = (
    "dtype",
    "layout",
    "page_size",
    "size_per_token",
    "layer_num",
    "head_num",
    "head_dim",
    "v_head_dim",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "index_head_dim",
    "num_mamba_layers",
    "temporal_dtype",
    "conv_dtype",
    "temporal_state_shape",
    "conv_state_shapes",
)


def pool_namespace_fields(cfg, kv_namespace: str, name: str, pool, shape, sharded: bool) -> dict:
    """What a non-KV pool's namespace must tell apart (written to its ``namespace.json``)."""
    geometry = {a: str(getattr(pool, a)) for a in POOL_GEOMETRY if hasattr(pool, a)}
    return {
        "format": FORMAT_VERSION,
        # Its state is only ever restored together with this KV namespace's pages.
        "kv_namespace": kv_namespace,
        "pool": name,
        "class": type(pool).__name__,
        "tp": [cfg.tp_rank, cfg.tp_size] if sharded else None,
        "page_bytes": shape.page_bytes,
        "flat_bytes": shape.flat_bytes,
        "regions": shape.meta_regions,
        "geometry": geometry,
    }


# How a pool namespace's directory name (inside the KV namespace) begins.
POOL_DIR_PREFIX = "pool-"


def pool_namespace_name(f: dict) -> str:
    """Directory name (inside the KV namespace) spelling a pool's namespace fields, ending in a
    hash of all of them."""
    ranks = "tp-shared" if f["tp"] is None else f"tp{f['tp'][0]}of{f['tp'][1]}"
    parts = [
        POOL_DIR_PREFIX + _part(f["pool"], 48),
        ranks,
        f"{f['page_bytes']}B",
        "h" + blake(json.dumps(f, sort_keys=True), 6).hex(),
    ]
    return "__".join(parts)


def page_relpath(key: str, suffix: str) -> str:
    """``<shard>/<file>`` of a key inside its namespace: 256 shards by the key's hash."""
    name = key if _SAFE_KEY.match(key) else "h-" + blake(key, 20).hex()
    return os.path.join("%02x" % blake(key, 1)[0], name + suffix)


def wipe_shard(directory: str) -> bool:
    """Delete every file in a shard ``directory``; False if one could not be deleted."""
    good = True
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
        except OSError:
            good = False
    return good


def key_tag(namespace: str, order: str, key: str) -> int:
    """What binds a page file to its namespace, payload order and key."""
    return int.from_bytes(blake(f"{namespace}\0{order}\0{key}", 8), "little")


class MountWatch:
    """Whether the mount point still holds the volume the backend started on.

    After an unmount (or a dead FUSE daemon) every check fails, so nothing lands on the local
    disk under the bare mount point. A new mount of the same file system type that holds the
    namespace marker is adopted (probed at most every ``REPROBE_INTERVAL`` seconds) and
    ``on_remount`` runs.

    A volume that stops answering (metadata engine down: JuiceFS fails each operation with EIO
    after 10-45 s of retries) is reported by ``failed``: from then on every check fails at once,
    and a background probe reopens the marker every ``PROBE_INTERVAL`` seconds until it answers
    (then ``on_remount`` runs too)."""

    def __init__(self, mount_point: str, fstype: str, on_remount: Callable[[], None]):
        self.mount_point = mount_point
        self.fstype = fstype
        self.dev = os.stat(mount_point).st_dev
        self.last_reprobe = 0.0
        self.unanswering = False
        self.outages = 0
        self._on_remount = on_remount
        self._lost_logged = False
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def holds(self, marker: str) -> bool:
        """True while the volume is mounted; ``marker`` is a file the volume must hold."""
        if self.unanswering:
            return False
        try:
            dev = os.stat(self.mount_point).st_dev
        except OSError as e:  # ENOTCONN after the FUSE daemon died, ENOENT, ...
            self.failed(e, marker)
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

    def failed(self, error: Optional[OSError], marker: str) -> None:
        """An I/O error on the volume: when it says the volume is not answering, miss at once
        from now on instead of waiting out JuiceFS's retries per operation."""
        if error is None or error.errno not in VOLUME_ERRNOS:
            return
        with self._lock:
            if self.unanswering or self._stopped.is_set():
                return
            self.unanswering = True
            self.outages += 1
        logger.error(
            "juicefs backend: volume at %s is not answering (%s); every lookup misses "
            "and every write is refused until it answers again",
            self.mount_point,
            error,
        )
        threading.Thread(
            target=self._probe, args=(marker,), name="juicefs-hicache-probe", daemon=True
        ).start()

    def _probe(self, marker: str) -> None:
        while not self._stopped.is_set():
            try:
                # open() reaches the file system (the kernel caches lookups, not opens).
                with open(marker, "rb") as f:
                    f.read(1)
                break
            except OSError:
                self._stopped.wait(PROBE_INTERVAL)
        if self._stopped.is_set():
            return
        self._on_remount()
        self.unanswering = False
        logger.warning("juicefs backend: volume at %s answers again; resuming", self.mount_point)

    def stop(self) -> None:
        """No more probes (the backend is closing)."""
        self._stopped.set()

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
