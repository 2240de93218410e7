"""``JuiceFSStorage``: SGLang's ``HiCacheStorage`` interface over write-once page files on a
JuiceFS (FUSE) mount, built from the helpers beside it (page I/O, capacity, presence, the v2
pools). Design and options: ``docs/juicefs-backend.md``."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Sequence

import torch

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)
from sglang.srt.observability.metrics_collector import StorageMetrics

from .capacity import Capacity, Maintenance
from .eviction import NamespaceEvictor, PassResult
from .options import JuiceFSOptions
from .page_file import (
    HEADER_SIZE,
    Publisher,
    default_algo,
    flat_views,
    meta_views,
    page_shape,
    tensor_bytes,
)
from .page_io import PageRead, publish_once, publish_page, read_page
from .pools import PageSpace, PoolSet, indices_match
from .presence import PresenceCache
from .volume import (
    NAMESPACE_MARKER,
    MountWatch,
    mount_fstype,
    namespace_fields,
    namespace_name,
    wipe_shard,
)

logger = logging.getLogger(__name__)

BACKEND_NAME = "juicefs"
# What ``counters`` counts, over every pool's pages (docs/juicefs-backend.md).
COUNTERS = (
    "get_hits get_misses corrupt io_errors set_pages set_existing set_refused set_errors "
    "volume_outages eviction_passes evicted_pages evicted_bytes usage_bytes"
).split()


class JuiceFSStorage(HiCacheStorage):
    """Write-once page files on a JuiceFS (FUSE) mount, batch I/O on a thread pool."""

    def __init__(self, storage_config: HiCacheStorageConfig, mem_pool_host: Any = None, **_: Any):
        # Built-in chain: cls(storage_config, mem_pool_host); SGLang's ``dynamic`` path:
        # cls(storage_config, {}) with the host pool arriving via register_mem_pool_host.
        if storage_config is None:
            raise ValueError("juicefs backend: storage_config is required")
        if getattr(storage_config, "should_split_heads", False):
            raise ValueError(
                "juicefs backend: heterogeneous TP (tp_lcm_size head splitting) is not supported"
            )
        self.storage_config = storage_config
        self.options = JuiceFSOptions.from_extra_config(storage_config.extra_config)
        self.mount_point = self.options.mount_point
        mount_root, self.fstype = mount_fstype(self.mount_point)
        if self.fstype != "fuse.juicefs":
            message = (
                f"juicefs backend: mount_point {self.mount_point!r} is on {self.fstype} "
                f"(mounted at {mount_root}), not a JuiceFS mount"
            )
            if self.options.require_juicefs:
                raise ValueError(message)
            logger.warning("%s; using it as a plain directory", message)
        self.root = os.path.join(self.mount_point, self.options.root_dir)
        os.makedirs(self.root, exist_ok=True)

        self.is_mla = bool(storage_config.is_mla_model)
        # MLA ranks share one copy: only the designated writer rank publishes it.
        self.is_writer = bool(
            getattr(
                storage_config, "is_storage_writer", not self.is_mla or storage_config.tp_rank == 0
            )
        )
        self.algo = default_algo()
        self._executor = ThreadPoolExecutor(
            max_workers=self.options.threads, thread_name_prefix="juicefs-hicache"
        )
        self._lock = threading.Lock()  # the counters a round adds to, and the metrics
        self.presence = PresenceCache(self.options.exists_cache_ttl)
        self._publisher = Publisher(fsync=self.options.fsync)
        self.mount = MountWatch(self.mount_point, self.fstype, on_remount=self.presence.reset)
        self._unregistered_logged = False
        self._foreign_sizes = set()  # legacy page sizes refused so far (logged once each)
        self._closed = False
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.capacity = Capacity(self.options.capacity_bytes)
        # Capacity fleet-wide: the LRU (eviction.py), run by a maintenance thread.
        self.maintenance = Maintenance(
            self.options, self.capacity, self._volume_ok, self._io_failed
        )
        self._metrics = StorageMetrics()
        self.mem_pool_host = None
        self.namespace: Optional[str] = None
        self.ns_dir: Optional[str] = None
        self.kv: Optional[PageSpace] = None  # the KV pool's page files
        self.pools = PoolSet(self)  # the other host pools (v2 interface)
        if mem_pool_host is not None and not isinstance(mem_pool_host, dict):
            self.register_mem_pool_host(mem_pool_host)

    # ---------------------------------------------------------------- registration

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Size pages after the host pool and open (or create) this pool's namespace."""
        if mem_pool_host is self.mem_pool_host:
            return
        super().register_mem_pool_host(mem_pool_host)
        self._learn_page_shape(mem_pool_host)
        self._open_namespace(mem_pool_host)

    def _learn_page_shape(self, pool) -> None:
        """Page bytes and payload byte orders, from the pool's meta regions and flat pages."""
        shape = page_shape(pool)
        self.page_size, self.page_bytes = shape.page_size, shape.page_bytes
        self.flat_bytes, self._flat_template = shape.flat_bytes, shape.flat_template
        self._meta_regions = shape.meta_regions
        self.v1_order, self.flat_order = shape.v1_order, shape.flat_order

    def _open_namespace(self, pool) -> None:
        """Create this pool's namespace directory and marker; start the capacity maintenance."""
        fields = namespace_fields(
            self.storage_config, pool, self.is_mla, self.page_size, self.page_bytes
        )
        self.namespace_fields = fields
        self.namespace = namespace_name(fields)
        self.ns_dir = os.path.join(self.root, self.namespace)
        os.makedirs(self.ns_dir, exist_ok=True)
        sizes = {HEADER_SIZE + self.page_bytes, HEADER_SIZE + (self.flat_bytes or 0)}
        self.kv = PageSpace(self.ns_dir, self.namespace, sizes, self.is_writer, self.maintenance)
        self.presence.reset()
        marker = json.dumps(fields, sort_keys=True, indent=1).encode()
        publish_once(self._publisher, os.path.join(self.ns_dir, NAMESPACE_MARKER), marker)
        logger.info(
            "juicefs backend: namespace %s (page %d bytes, v1 order %s, writer=%s)",
            self.ns_dir,
            self.page_bytes,
            self.v1_order,
            self.is_writer,
        )
        if self.is_writer and self.capacity.limit is not None:
            page_file_bytes = HEADER_SIZE + self.page_bytes
            self.maintenance.start(self.ns_dir, page_file_bytes, self._executor, self.maintain)
        else:
            self.maintenance.skip()

    # ---------------------------------------------------------------- paths and health

    def _path(self, key: str) -> str:
        """The KV page file of ``key``."""
        return self.kv.path(key)

    def _volume_ok(self) -> bool:
        """The mount still holds the volume we started on (an unmounted volume reads as misses)."""
        if self._closed or self.ns_dir is None:
            return False
        return self.mount.holds(os.path.join(self.ns_dir, NAMESPACE_MARKER))

    def _io_failed(self, error: Optional[OSError]) -> None:
        """Tell the volume watch about an I/O error (a volume that stopped answering)."""
        if self.ns_dir is not None:
            self.mount.failed(error, os.path.join(self.ns_dir, NAMESPACE_MARKER))
            self.counters["volume_outages"] = self.mount.outages

    def _ready(self) -> bool:
        """Whether a host pool is registered and the volume is mounted."""
        if self.mem_pool_host is None:
            if not self._unregistered_logged:
                self._unregistered_logged = True
                logger.warning("juicefs backend: used before register_mem_pool_host; missing")
            return False
        return self._volume_ok()

    # ---------------------------------------------------------------- page files

    def _read_page(
        self, key: str, views: Sequence[memoryview], order: str, space: Optional[PageSpace] = None
    ) -> bool:
        """Read one page of ``space`` (default KV) into ``views`` and verify it; False: a miss."""
        space = space or self.kv
        path = space.path(key)
        read = read_page(path, views, space.tag(key, order))
        if read.missing:
            self.presence.forget(path)
            self.counters["get_misses"] += 1
            return False
        if read.error is not None:
            self._io_failed(read.error)
        if read.why is not None:
            return self._read_failed(key, path, read, space.writer)
        self.presence.remember(path)
        space.note(key)
        self.counters["get_hits"] += 1
        return True

    def _read_failed(self, key: str, path: str, read: PageRead, writer: bool) -> bool:
        """Count and log a miss; a writer drops a file that contradicts its header."""
        self.presence.doubt(path)
        self.counters["corrupt" if read.corrupt else "io_errors"] += 1
        self.counters["get_misses"] += 1
        logger.warning("juicefs backend: page %s is a miss: %s", key, read.why)
        if read.corrupt and writer:
            # Pages are write-once, so a damaged file stays damaged: drop it so a later backup
            # can publish the key again (at worst this drops a good page a racing writer just
            # published, which is a miss, never bad data).
            try:
                os.unlink(path)
            except OSError:
                pass
        return False

    def _present(self, key: str, space: PageSpace) -> bool:
        """Write-once: a key whose file exists is not written again."""
        path = space.path(key)
        if self.presence.present(path):
            return True
        try:
            if os.path.exists(path):
                self.presence.remember(path)
                return True
        except OSError:
            pass
        return False

    def _write_batch(
        self,
        keys: Sequence[str],
        pages: Sequence[Optional[Sequence[memoryview]]],
        order: str,
        space: Optional[PageSpace] = None,
    ) -> List[bool]:
        """Publish pages of ``space`` (default KV); per key, True when it holds a page after."""
        # Capacity is granted in key order and stops at the first page that does not fit: SGLang
        # only ever uses a prefix of a sequence's pages, so pages behind a refused one would waste
        # space.
        space = space or self.kv
        present = list(self._executor.map(lambda k: self._present(k, space), keys))
        results = list(present)
        admitted, full = [], False
        for i, (ok, views) in enumerate(zip(present, pages)):
            if ok:
                self.counters["set_existing"] += 1
                space.note(keys[i])  # backed up again: the prefix is in use
            elif views is not None and not full:
                need = HEADER_SIZE + sum(v.nbytes for v in views)
                if not space.counted or self.capacity.reserve(need, self.namespace):
                    admitted.append(i)
                else:
                    self.counters["set_refused"] += 1  # the first refused page of a batch
                    full = True
            elif full:
                self.counters["set_refused"] += 1
        done = self._executor.map(
            lambda i: self._publish_page(keys[i], pages[i], order, space), admitted
        )
        for i, ok in zip(admitted, done):
            results[i] = ok
        return results

    def _publish_page(
        self, key: str, views: Sequence[memoryview], order: str, space: PageSpace
    ) -> bool:
        """Write one page whose capacity is already reserved (released unless it is new)."""
        size = sum(v.nbytes for v in views)
        path = space.path(key)
        try:
            if self.mount.unanswering:  # found out during this batch: skip another long wait
                raise OSError(errno.EIO, "volume not answering")
            outcome = publish_page(self._publisher, path, views, self.algo, space.tag(key, order))
        except OSError as e:
            outcome = None
            self._io_failed(e)
            logger.warning("juicefs backend: writing page %s failed: %s", path, e)
        if outcome != "new" and space.counted:
            self.capacity.release(HEADER_SIZE + size)
        if outcome is None:
            self.counters["set_errors"] += 1
            return False
        self.counters["set_pages" if outcome == "new" else "set_existing"] += 1
        self.presence.remember(path)
        space.note(key)
        return True

    # ---------------------------------------------------------------- v1 (zero-copy)

    def batch_get_v1(
        self,
        keys: List[str],
        host_indices: torch.Tensor,
        extra_info: Optional[HiCacheStorageExtraInfo] = None,
    ) -> List[bool]:
        if not keys:
            return []
        if not self._ready() or not indices_match(
            "batch_get_v1", keys, host_indices, self.page_size
        ):
            return [False] * len(keys)
        start = time.perf_counter()
        try:
            if self._meta_regions:
                pages = meta_views(
                    self.mem_pool_host, host_indices.cpu(), len(keys), self.page_bytes
                )
                results = list(
                    self._executor.map(
                        lambda kv: self._read_page(kv[0], kv[1], self.v1_order), zip(keys, pages)
                    )
                )
            else:
                results = list(
                    self._executor.map(
                        lambda i: self._get_flat_into_pool(
                            keys[i], int(host_indices[i * self.page_size])
                        ),
                        range(len(keys)),
                    )
                )
            check = getattr(self.mem_pool_host, "kvtuner_check_pages", None)
            if callable(check) and any(results):
                # The quantizing pool's own page header: a second, format-level check.
                results = [ok and good for ok, good in zip(results, check(host_indices))]
        except Exception as e:  # never raise into the prefetch thread
            logger.error("juicefs backend: batch_get_v1 failed: %s", e)
            return [False] * len(keys)
        self._record("prefetch", sum(results), start)
        return results

    def batch_set_v1(
        self,
        keys: List[str],
        host_indices: torch.Tensor,
        extra_info: Optional[HiCacheStorageExtraInfo] = None,
    ) -> List[bool]:
        if not keys:
            return []
        if not self.is_writer:  # MLA: another rank writes the shared copy
            return [True] * len(keys)
        if not self._ready() or not indices_match(
            "batch_set_v1", keys, host_indices, self.page_size
        ):
            return [False] * len(keys)
        start = time.perf_counter()
        try:
            if self._meta_regions:
                pages = meta_views(
                    self.mem_pool_host, host_indices.cpu(), len(keys), self.page_bytes
                )
            else:
                pages = [
                    flat_views(
                        k,
                        self.mem_pool_host.get_data_page(
                            int(host_indices[i * self.page_size]), flat=True
                        ),
                        self.flat_bytes,
                    )
                    for i, k in enumerate(keys)
                ]
            results = self._write_batch(keys, pages, self.v1_order)
        except Exception as e:
            logger.error("juicefs backend: batch_set_v1 failed: %s", e)
            return [False] * len(keys)
        self._record("backup", sum(results), start)
        return results

    def _get_flat_into_pool(self, key: str, index: int) -> bool:
        """Read one page through a flat scratch page into the host pool."""
        dtype, numel = self._flat_template
        scratch = torch.empty(numel, dtype=dtype)
        if not self._read_page(key, [tensor_bytes(scratch)], self.v1_order):
            return False
        self.mem_pool_host.set_from_flat_data_page(index, scratch)
        return True

    # ---------------------------------------------------------------- legacy interface

    def _legacy_page_fits(self, key: str, nbytes: int) -> bool:
        """Whether a legacy-interface page of ``nbytes`` is this namespace's flat page; other
        sizes are refused, logged once per size (0.5.13 - 0.5.18 send an MTP draft pool's pages
        this way, as ``<key>.draft``: docs/juicefs-backend.md)."""
        if nbytes == self.flat_bytes:
            return True
        with self._lock:
            first = nbytes not in self._foreign_sizes
            self._foreign_sizes.add(nbytes)
        if first:
            logger.warning(
                "juicefs backend: legacy page %s has %d bytes, not this namespace's %s; pages "
                "of that size are refused and read as misses",
                key,
                nbytes,
                self.flat_bytes,
            )
        return False

    def get(
        self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None
    ) -> torch.Tensor | None:
        if not self._ready() or self.flat_bytes is None:
            return None
        try:
            if target_location is None:
                dtype, numel = self._flat_template
                target_location = torch.empty(numel, dtype=dtype)
            out = target_location
            direct = out.device.type == "cpu" and out.is_contiguous()
            buf = out if direct else torch.empty(out.numel(), dtype=out.dtype)
            if not self._legacy_page_fits(key, buf.numel() * buf.element_size()):
                return None
            if not self._read_page(key, [tensor_bytes(buf.reshape(-1))], self.flat_order):
                return None
            if not direct:
                out.copy_(buf.view(out.shape))
            return out
        except Exception as e:
            logger.error("juicefs backend: get(%s) failed: %s", key, e)
            return None

    def batch_get(
        self,
        keys: List[str],
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> List[torch.Tensor | None]:
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        if not keys or not self._ready():
            return [None] * len(keys)
        start = time.perf_counter()
        results = list(self._executor.map(lambda kt: self.get(kt[0], kt[1]), zip(keys, targets)))
        self._record("prefetch", sum(r is not None for r in results), start)
        return results

    def set(
        self,
        key: str,
        value: Optional[Any] = None,
        target_location: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        if not self.is_writer:
            return True
        if value is None or not self._ready() or self.flat_bytes is None:
            return False
        if not self._legacy_page_fits(key, getattr(value, "nbytes", -1)):
            return False
        page = flat_views(key, value, self.flat_bytes)
        return self._write_batch([key], [page], self.flat_order)[0]

    def batch_set(
        self,
        keys: List[str],
        values: Optional[Any] = None,
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            return False
        if not self.is_writer:
            return True
        if not self._ready() or self.flat_bytes is None:
            return False
        start = time.perf_counter()
        pages = [
            flat_views(k, v, self.flat_bytes)
            if self._legacy_page_fits(k, getattr(v, "nbytes", -1))
            else None
            for k, v in zip(keys, values)
        ]
        results = self._write_batch(keys, pages, self.flat_order)
        self._record("backup", sum(results), start)
        return all(results)

    # ---------------------------------------------------------------- lookups

    def _exists_one(self, key: str, space: Optional[PageSpace] = None) -> bool:
        """Whether ``key``'s page file in ``space`` (default KV) exists with a size that verifies."""
        path = (space or self.kv).path(key)
        if self.presence.gone(path):
            return False
        if self.presence.present(path):
            return True
        try:
            st = os.stat(path)
        except OSError as e:
            self._io_failed(e)
            self.presence.doubt(path)
            return False
        # A file of the wrong size can never verify: report it absent right away.
        if st.st_size not in (space or self.kv).sizes:
            return False
        self.presence.remember(path)
        return True

    def exists(self, key: str) -> bool:
        return self._ready() and self._exists_one(key)

    def batch_exists(
        self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None
    ) -> int:
        """Number of consecutive present pages from the start of ``keys``."""
        if not keys or not self._ready():
            return 0
        try:
            found = self._executor.map(self._exists_one, keys)
            return next((i for i, ok in enumerate(found) if not ok), len(keys))
        except Exception as e:
            logger.error("juicefs backend: batch_exists failed: %s", e)
            return 0

    # ---------------------------------------------------------------- v2 (every host pool)

    def register_mem_host_pool_v2(self, host_pool, host_pool_name):
        """Give one more host pool (hybrid state, sidecars) its own namespace of page files."""
        self.pools.register(host_pool, host_pool_name)

    def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
        """The longest KV prefix, narrowed to the lengths every pool can restore."""
        return self.pools.exists(keys, pool_transfers or [])

    def batch_get_v2(self, transfers, extra_info=None):
        return self.pools.transfer("batch_get_v2", transfers)

    def batch_set_v2(self, transfers, extra_info=None):
        return self.pools.transfer("batch_set_v2", transfers)

    # ---------------------------------------------------------------- maintenance

    def clear(self) -> bool:
        """Delete every page (and temporary) of this backend's namespaces; others stay."""
        if self.ns_dir is None or not self._volume_ok():
            return False
        try:
            shards = [
                os.path.join(d, s)
                for d in (self.ns_dir, *self.pools.dirs())
                for s in os.listdir(d)
                if len(s) == 2
            ]
        except OSError as e:
            logger.error("juicefs backend: clear failed: %s", e)
            return False
        ok = all(self._executor.map(wipe_shard, shards))
        self.capacity.reset()
        self.presence.doubt_all()
        logger.info("juicefs backend: cleared namespace %s", self.ns_dir)
        return ok

    @property
    def evictor(self) -> Optional[NamespaceEvictor]:
        """The namespace's evictor (None on a reader rank or without a capacity)."""
        return self.maintenance.evictor

    def maintain(self) -> Optional[PassResult]:
        """One maintenance round: flush the access log, then as the lease holder run an
        eviction pass, else adopt the usage the holder published. None when not the holder."""
        result = self.maintenance.run_round()
        self.counters["usage_bytes"] = self.capacity.counted_bytes
        if result is None:
            return None
        if result.evicted_pages:
            self.presence.doubt_all()  # never answer "present" from memory for an evicted page
        with self._lock:
            self.counters["eviction_passes"] += 1
            self.counters["evicted_pages"] += result.evicted_pages
            self.counters["evicted_bytes"] += result.evicted_bytes
        return result

    def flush_access_log(self) -> bool:
        """Append this server's pending page uses to its access log now."""
        return self.maintenance.flush()

    def wait_for_maintenance(self, timeout: Optional[float] = None) -> bool:
        """Wait for the first maintenance round (it learns the namespace's usage)."""
        return self.maintenance.wait(timeout)

    def _record(self, kind: str, n: int, start: float) -> None:
        """Add a batch to SGLang's storage metrics (when it collects them)."""
        # Only when SGLang collects them: nobody would drain the lists otherwise.
        if not getattr(self.storage_config, "enable_storage_metrics", False) or n == 0:
            return
        elapsed = max(time.perf_counter() - start, 1e-9)
        with self._lock:
            getattr(self._metrics, f"{kind}_pgs").append(n)
            # GB/s, the unit of SGLang's bandwidth histograms.
            getattr(self._metrics, f"{kind}_bandwidth").append(n * self.page_bytes / elapsed / 1e9)

    def get_stats(self) -> StorageMetrics:
        with self._lock:
            metrics, self._metrics = self._metrics, StorageMetrics()
        return metrics

    def close(self) -> None:
        if self._closed:
            return
        self.maintenance.stop()
        self.mount.stop()
        self._closed = True
        self._executor.shutdown(wait=True)


__all__ = ["JuiceFSStorage", "BACKEND_NAME"]
