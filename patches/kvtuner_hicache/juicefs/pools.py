"""SGLang's v2 storage interface (0.5.10 onward) for ``JuiceFSStorage``: every host pool (KV,
Mamba / SWA state, indexer sidecars, ...) keeps its pages in a namespace of its own, and a
lookup finds the longest KV prefix that every pool can restore. Design: ``docs/juicefs-backend.md``
("Hybrid models: the v2 interface")."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch

from .page_file import (
    HEADER_SIZE,
    PAGE_SUFFIX,
    PageShape,
    flat_views,
    meta_views,
    page_shape,
    tensor_bytes,
)
from .page_io import publish_once
from .volume import (
    NAMESPACE_MARKER,
    key_tag,
    page_relpath,
    pool_namespace_fields,
    pool_namespace_name,
)

try:
    from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransferResult
except ImportError:  # 0.5.3 - 0.5.9: v1 only, so nothing below is ever called
    PoolHitPolicy = PoolName = PoolTransferResult = None

logger = logging.getLogger(__name__)

KV = "kv"
# Pools every TP rank keeps its own shard of even when the model's MLA KV is replicated over
# TP ranks (SGLang backs these up on every rank).
RANK_SHARDED = frozenset({"mamba"})


def pool_name(name) -> str:
    """A pool's name as this backend spells it: a ``PoolName``'s value (0.5.10 - 0.5.11's enum has
    no ``__str__``, so ``str(PoolName.MAMBA)`` is ``"PoolName.MAMBA"`` there), else the string."""
    return str(getattr(name, "value", name))


def indices_match(op: str, keys: Sequence[str], host_indices, page_size: int) -> bool:
    """Whether ``host_indices`` hold exactly one page of tokens per key (logged if not)."""
    if host_indices is None or host_indices.numel() != len(keys) * page_size:
        logger.error(
            "juicefs backend: %s got %s host indices for %d pages of %d tokens",
            op,
            None if host_indices is None else host_indices.numel(),
            len(keys),
            page_size,
        )
        return False
    return True


class PageSpace:
    """One namespace's page files: where a key's file is, the tag it carries, the file sizes
    that can verify, whether this rank writes them, and the maintenance (capacity and LRU) they
    count in, if any (the KV namespace's, shared by its pools' namespaces)."""

    def __init__(self, ns_dir: str, namespace: str, sizes, writer: bool, maintenance=None):
        self.ns_dir = ns_dir
        self.namespace = namespace
        self.sizes = frozenset(sizes)
        self.writer = writer
        self.maintenance = maintenance

    @property
    def counted(self) -> bool:
        """Whether writes reserve capacity (and are released when not kept)."""
        return self.maintenance is not None

    def note(self, key: str) -> None:
        """A page use, for the fleet-wide LRU."""
        if self.maintenance is not None:
            self.maintenance.note(key)

    def path(self, key: str) -> str:
        """The page file of ``key``."""
        return os.path.join(self.ns_dir, page_relpath(key, PAGE_SUFFIX))

    def tag(self, key: str, order: str) -> int:
        """The tag a page file of ``key`` in ``order`` carries in its header."""
        return key_tag(self.namespace, order, key)


class HostPoolPages(NamedTuple):
    """A host pool registered through v2: the pool, its page as bytes, its namespace."""

    name: str
    pool: Any
    shape: PageShape
    space: PageSpace


def _result(kv_pages: int, hits: Dict[Any, int], restorable: List[int]):
    """A ``PoolTransferResult``; its ``restorable_prefix_pages`` exist from 0.5.19 on."""
    if "restorable_prefix_pages" in getattr(PoolTransferResult, "__dataclass_fields__", {}):
        return PoolTransferResult(kv_pages, hits, restorable)
    return PoolTransferResult(kv_pages, hits)


def restorable_lengths(present: Sequence[bool], policy, trailing: int) -> Optional[List[int]]:
    """Prefix lengths (in pages, from 1) a pool can restore given which of the KV prefix's
    pages it holds; None for a policy this backend does not serve."""
    if policy == PoolHitPolicy.ALL_PAGES:
        boundary = next((i for i, ok in enumerate(present) if not ok), len(present))
        return list(range(1, boundary + 1))
    if policy == PoolHitPolicy.TRAILING_PAGES:
        # A prefix of p pages needs the pool's pages p - trailing .. p - 1 (fewer near the start).
        lengths, run = [], 0
        for p, ok in enumerate(present, 1):
            run = run + 1 if ok else 0
            if run >= min(trailing, p):
                lengths.append(p)
        return lengths
    return None


class PoolSet:
    """The host pools a ``JuiceFSStorage`` holds besides its KV pool, and the v2 calls over
    all of them (the KV pool's pages go through the backend's own v1 path)."""

    def __init__(self, backend):
        self.backend = backend
        self.pools: Dict[str, HostPoolPages] = {}
        self._lock = threading.Lock()
        self._refused_logged = set()

    def dirs(self) -> List[str]:
        """The namespace directories of the registered pools."""
        with self._lock:
            return [p.space.ns_dir for p in self.pools.values()]

    def register(self, pool, name) -> None:
        """Open (or create) the namespace of pool ``name``; the KV pool already has one."""
        name, b = pool_name(name), self.backend
        if name == KV:
            if pool is not b.mem_pool_host:
                logger.info(
                    "juicefs backend: KV pool registered again through v2; keeping the first"
                )
            return
        if b.ns_dir is None:
            raise ValueError(
                f"juicefs backend: pool {name!r} registered before the KV pool "
                "(register_mem_pool_host)"
            )
        shape = page_shape(pool)  # ValueError for a pool with neither page form
        sharded = not b.is_mla or name in RANK_SHARDED
        fields = pool_namespace_fields(b.storage_config, b.namespace, name, pool, shape, sharded)
        namespace = pool_namespace_name(fields)
        ns_dir = os.path.join(b.ns_dir, namespace)
        try:
            # A sidecar can arrive at run time: never create it on the disk under a bare mount
            # point, and never raise into SGLang for a volume that is away.
            if not b._volume_ok():
                raise OSError("volume unavailable")
            os.makedirs(ns_dir, exist_ok=True)
        except OSError as e:
            self._refuse(name, f"its namespace {ns_dir} cannot be opened ({e})")
            return
        marker = json.dumps(fields, sort_keys=True, indent=1).encode()
        publish_once(b._publisher, os.path.join(ns_dir, NAMESPACE_MARKER), marker)
        sizes = {HEADER_SIZE + shape.page_bytes, HEADER_SIZE + (shape.flat_bytes or 0)}
        # MLA's replicated pools are written by the KV writer rank; sharded ones by every rank.
        # The writer rank keeps the KV namespace's capacity and its evictor lists every pool
        # namespace inside it, so pool pages count there; an MLA reader rank's own Mamba shard
        # is counted by those passes, not at its admission (it keeps no usage count).
        maintenance = b.maintenance if b.is_writer else None
        space = PageSpace(ns_dir, namespace, sizes, b.is_writer or sharded, maintenance)
        with self._lock:
            self.pools[name] = HostPoolPages(name, pool, shape, space)
        logger.info(
            "juicefs backend: pool %s in namespace %s (page %d bytes, order %s, writer=%s)",
            name,
            ns_dir,
            shape.page_bytes,
            shape.v1_order,
            space.writer,
        )

    def _refuse(self, name: str, why: str) -> None:
        """Log, once per pool and reason, why a pool's transfers are misses."""
        if (name, why) not in self._refused_logged:
            self._refused_logged.add((name, why))
            logger.error("juicefs backend: pool %s: %s; its pages are misses", name, why)

    # ---------------------------------------------------------------- lookups

    def _present(self, name: str, keys: Sequence[str]) -> List[bool]:
        """Which of ``keys`` pool ``name`` holds a page of (none for an unknown pool)."""
        b = self.backend
        if name == KV:  # a lookup naming the KV pool itself: its own pages
            space = b.kv
        elif name in self.pools:
            space = self.pools[name].space
        else:
            self._refuse(name, "not registered")
            return [False] * len(keys)
        return list(b._executor.map(lambda k: b._exists_one(k, space), keys))

    def exists(self, keys: List[str], transfers: Sequence[Any]):
        """``batch_exists_v2``: the longest KV prefix, then per pool the prefix lengths it can
        restore; the answer is the longest length every pool can restore."""
        b = self.backend
        if not keys or not b._ready():
            return _result(0, {}, [])
        try:
            kv_pages = b.batch_exists(keys)
            hits: Dict[Any, int] = {PoolName.KV: kv_pages} if kv_pages else {}
            restorable = list(range(1, kv_pages + 1))
            for t in transfers:
                if not restorable:
                    break
                name = pool_name(t.name)
                trailing = max(1, len(t.keys) if t.keys else 1)
                present = self._present(name, keys[:kv_pages])
                lengths = restorable_lengths(present, t.hit_policy, trailing)
                if lengths is None:
                    # Never a hit this backend cannot vouch for: the pool reports nothing.
                    self._refuse(name, f"hit policy {t.hit_policy} is not supported")
                    hits[t.name] = 0
                    continue
                if lengths:
                    hits[t.name] = lengths[-1]
                allowed = set(lengths)
                restorable = [p for p in restorable if p in allowed]
            return _result(restorable[-1] if restorable else 0, hits, restorable)
        except Exception as e:  # never raise into the prefetch thread
            logger.error("juicefs backend: batch_exists_v2 failed: %s", e)
            return _result(0, {}, [])

    # ---------------------------------------------------------------- transfers

    def transfer(self, op: str, transfers: Sequence[Any]) -> Dict[Any, List[bool]]:
        """``batch_get_v2`` / ``batch_set_v2``: per pool, one success flag per key."""
        results: Dict[Any, List[bool]] = {}
        for t in transfers:
            keys = list(t.keys or [])
            try:
                results[t.name] = self._transfer_one(op, t, keys) if keys else []
            except Exception as e:  # never raise into the prefetch or backup thread
                logger.error("juicefs backend: %s of pool %s failed: %s", op, t.name, e)
                results[t.name] = [False] * len(keys)
        return results

    def _transfer_one(self, op: str, t, keys: List[str]) -> List[bool]:
        """One pool's pages between its host memory and its namespace."""
        b, name, reading = self.backend, pool_name(t.name), op == "batch_get_v2"
        if t.hit_policy not in (PoolHitPolicy.ALL_PAGES, PoolHitPolicy.TRAILING_PAGES):
            self._refuse(name, f"hit policy {t.hit_policy} is not supported")
            return [False] * len(keys)
        if name == KV:  # the KV pool's own zero-copy path
            fn = b.batch_get_v1 if reading else b.batch_set_v1
            return fn(keys, t.host_indices)
        entry = self.pools.get(name)
        if entry is None:
            self._refuse(name, "not registered")
            return [False] * len(keys)
        if not reading and not entry.space.writer:  # MLA: the writer rank stores the copy
            return [True] * len(keys)
        shape = entry.shape
        if not b._ready() or not indices_match(op, keys, t.host_indices, shape.page_size):
            return [False] * len(keys)
        host_indices = t.host_indices.cpu()
        firsts = [int(host_indices[i * shape.page_size]) for i in range(len(keys))]
        if shape.meta_regions:
            pages = meta_views(entry.pool, host_indices, len(keys), shape.page_bytes)
        elif reading:
            pages = [None] * len(keys)  # read through a flat scratch page each
        else:
            pages = [
                flat_views(k, entry.pool.get_data_page(i, flat=True), shape.flat_bytes)
                for k, i in zip(keys, firsts)
            ]
        if not reading:
            return b._write_batch(keys, pages, shape.v1_order, entry.space)
        return list(
            b._executor.map(
                lambda i: self._read_one(entry, keys[i], pages[i], firsts[i]), range(len(keys))
            )
        )

    def _read_one(self, entry: HostPoolPages, key: str, views, index: int) -> bool:
        """Read one page into the pool: into its regions, or through a flat scratch page."""
        b, shape = self.backend, entry.shape
        if views is not None:
            return b._read_page(key, views, shape.v1_order, entry.space)
        dtype, numel = shape.flat_template
        scratch = torch.empty(numel, dtype=dtype)
        if not b._read_page(key, [tensor_bytes(scratch)], shape.v1_order, entry.space):
            return False
        entry.pool.set_from_flat_data_page(index, scratch)
        return True
