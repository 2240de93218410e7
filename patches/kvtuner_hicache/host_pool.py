"""``KVTunerMHATokenToKVPoolHost``: SGLang's dense MHA host pool (HiCache L2) storing every page
quantized by ``kvtuner_quant``, one ``uint8`` row per host page, for SGLang 0.5.3 - 0.5.23.
Design (transfers, sizing, layouts, storage, residual window, releases): ``docs/host-pool.md``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import List, Optional, Sequence, Tuple

import torch

from .codec import CodecParts, PageCodec, StampCounter, host_pages, import_quant
from .compat import (
    MHATokenToKVPoolHost,
    alloc_host,
    host_budget_bytes,
    init_host_kv_cache,
    is_buffer_info,
    visible_model_layer_num,
)
from .config import (
    SUPPORTED_IO_BACKENDS,
    SUPPORTED_LAYOUTS,
    KVTunerHiCacheConfig,
    current_server_config,
    resolve_layer_plan,
)
from .device_transfer import build_codec
from .overlay import ResidualOverlay, carve_slots, window_pages
from .page_format import PAGE_HEADER_NBYTES, STAMP_NBYTES, STAMP_OFFSET, PageLayout

logger = logging.getLogger(__name__)

# Recycled scratch pages for the generic (non zero-copy) storage read path: at most
# one storage batch (STORAGE_BATCH_SIZE pages) and at most this many bytes.
_DUMMY_CACHE_MAX_PAGES = 128
_DUMMY_CACHE_MAX_BYTES = 256 << 20


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _stock_bytes_per_token(head_num: int, head_dim: int, layers: int, dtype: torch.dtype) -> int:
    """What the stock pool stores per token: K and V (same head_dim, checked), fp16/bf16/fp32."""
    return 2 * head_dim * head_num * layers * dtype.itemsize


def _pin_for(device_kv, pin_memory: bool) -> bool:
    """Whether to pin the host rows: only for device KV on an accelerator."""
    # SGLang asks for pinned rows by default, but with the device KV on the CPU (its CPU
    # engine) a copy gains nothing from them, and pinning needs a GPU driver that is not there.
    return pin_memory and torch.device(device_kv).type != "cpu"


class KVTunerMHATokenToKVPoolHost(MHATokenToKVPoolHost):
    """Dense MHA host pool whose pages are stored quantized (``docs/host-pool.md``)."""

    def __init__(self, source, *args, **kwargs):
        # An MHABufferInfo (0.5.23) or the device pool (0.5.3 - 0.5.22): see compat.py.
        if is_buffer_info(source):
            self._kvt_init_from_buffer_info(source, *args, **kwargs)
        else:
            self._kvt_init_from_device_pool(source, *args, **kwargs)
        why = self._kvt_select_codec()
        logger.info(
            "KVTuner HiCache host pool: %s, %d B/token (stock %d B/token), %d pages, "
            "residual overlay %d pages, %s codec (%s)",
            self.storage_format_tag,
            self.size_per_token,
            self.stock_size_per_token(),
            self.page_num,
            self._kvt_overlay_slots,
            self.kvtuner_codec,
            why,
        )

    def _kvt_select_codec(self) -> str:
        """Pick who packs the pages (``--kvtuner-hicache-codec``) once the rows exist;
        returns why, for the startup line."""
        parts = CodecParts(
            layout=self.kvtuner_layout,
            rows=self.kv_buffer,
            sources=(self.device_k_buffers, self.device_v_buffers),
            stamps=StampCounter(),
            backup_lock=threading.Lock(),
            overlay=self.kvtuner_overlay,
        )
        self._kvt_codec, why = build_codec(self._kvt_cfg.codec, parts)
        self.kvtuner_codec = self._kvt_codec.name
        return why

    def _kvt_init_from_buffer_info(
        self,
        buffer_info,
        host_to_device_ratio: float,
        host_size: int,
        page_size: int,
        layout: str,
        pin_memory: bool = True,
        device: str = "cpu",
        allocator_type: str = "default",
        *,
        device_capacity_tokens: int,
        start_layer: int,
        end_layer: int,
        draft_buffer_infos: Sequence = (),
        write_back_staging=None,
        pool_label: str = "kv",
        head_group_num: int = 1,
        host_token_capacity: Optional[int] = None,
        kvtuner_config: Optional[KVTunerHiCacheConfig] = None,
        model_layer_num: Optional[int] = None,
    ):
        """Build from an ``MHABufferInfo`` (0.5.23)."""
        _check_layout(layout)
        check_buffer_info(buffer_info)
        pin_memory = _pin_for(buffer_info.buffers.k[0].device, pin_memory)
        self._kvt_prepare(
            kvtuner_config,
            head_num=buffer_info.head_num,
            head_dim=buffer_info.head_dim,
            dtype=buffer_info.dtype,
            target_layer_num=len(buffer_info.buffers.k),
            draft_layer_num=len(draft_buffer_infos),
            page_size=page_size,
            start_layer=start_layer,
            model_layer_num=model_layer_num,
            fixed_capacity=host_token_capacity is not None,
        )
        if host_token_capacity is None:
            host_size = self._kvt_memory_ratio_as_size(
                host_size, host_to_device_ratio, device_capacity_tokens
            )
        super().__init__(
            buffer_info,
            host_to_device_ratio,
            host_size,
            page_size,
            layout,
            pin_memory,
            device,
            allocator_type,
            device_capacity_tokens=device_capacity_tokens,
            start_layer=start_layer,
            end_layer=end_layer,
            draft_buffer_infos=draft_buffer_infos,
            write_back_staging=write_back_staging,
            pool_label=pool_label,
            head_group_num=head_group_num,
            host_token_capacity=host_token_capacity,
        )

    def _kvt_init_from_device_pool(
        self,
        device_pool,
        host_to_device_ratio: float,
        host_size: int,
        page_size: int,
        layout: str,
        pin_memory: bool = True,
        device: str = "cpu",
        allocator_type: str = "default",
        *,
        mtp_draft_device_pools: Sequence = (),
        pool_label: str = "kv",
        kvtuner_config: Optional[KVTunerHiCacheConfig] = None,
        model_layer_num: Optional[int] = None,
    ):
        """Build from a device pool (0.5.3 - 0.5.22), MTP draft pools packed after it."""
        _check_layout(layout)
        check_device_pool(device_pool)
        drafts = tuple(mtp_draft_device_pools)
        for draft in drafts:
            check_device_pool(draft)
        pin_memory = _pin_for(device_pool.device, pin_memory)
        first = device_pool.k_buffer[0]
        head_dim = int(device_pool.head_dim)
        # Heads as the buffers hold them (rows of head_num x head_dim elements).
        head_num = first[0].numel() // head_dim if first.shape[0] else int(device_pool.head_num)
        self.device_pool = device_pool
        self.mtp_draft_device_pools = drafts
        self.target_layer_num = int(device_pool.layer_num)
        self.layer_num = self.target_layer_num + len(drafts)
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = head_dim
        self.dtype = device_pool.store_dtype
        self._transfer_device = torch.device(device_pool.device)
        pools = (device_pool, *drafts)
        self.device_k_buffers = tuple(b for pool in pools for b in pool.k_buffer)
        self.device_v_buffers = tuple(b for pool in pools for b in pool.v_buffer)
        self._kvt_prepare(
            kvtuner_config,
            head_num=head_num,
            head_dim=head_dim,
            dtype=self.dtype,
            target_layer_num=self.target_layer_num,
            draft_layer_num=len(drafts),
            page_size=page_size,
            start_layer=device_pool.start_layer,
            model_layer_num=model_layer_num,
            fixed_capacity=False,
        )
        capacity = getattr(device_pool, "host_capacity_tokens", None) or device_pool.size
        host_size = self._kvt_memory_ratio_as_size(host_size, host_to_device_ratio, capacity)
        init_host_kv_cache(
            self,
            device_pool,
            host_to_device_ratio=host_to_device_ratio,
            host_size=host_size,
            page_size=page_size,
            layout=layout,
            pin_memory=pin_memory,
            device=device,
            allocator_type=allocator_type,
            pool_label=pool_label,
            device_capacity_tokens=capacity,
        )
        self._initialize_transfer_views()

    def _kvt_prepare(
        self,
        kvtuner_config: Optional[KVTunerHiCacheConfig],
        *,
        head_num: int,
        head_dim: int,
        dtype: torch.dtype,
        target_layer_num: int,
        draft_layer_num: int,
        page_size: int,
        start_layer,
        model_layer_num: Optional[int],
        fixed_capacity: bool,
    ) -> None:
        """Set what get_size_per_token() and init_kv_buffer() need before the base runs."""
        kq = import_quant()
        cfg = kvtuner_config if kvtuner_config is not None else current_server_config()
        plan = resolve_layer_plan(
            cfg,
            start_layer=int(start_layer or 0),
            target_layer_num=target_layer_num,
            draft_layer_num=draft_layer_num,
            head_num=head_num,
            head_dim=head_dim,
            page_size=page_size,
            dtype_name=_dtype_name(dtype),
            model_layer_num=(
                model_layer_num
                if model_layer_num is not None
                else visible_model_layer_num(int(start_layer or 0) + target_layer_num)
            ),
        )
        self.kvtuner_plan = plan
        self.kvtuner_layout = PageLayout(plan, kq.blob_layout)
        self.storage_format_tag = self.kvtuner_layout.tag
        self._kvt_stock_bytes = _stock_bytes_per_token(
            head_num, head_dim, target_layer_num + draft_layer_num, dtype
        )
        self._kvt_cfg = cfg
        self._kvt_fixed_capacity = fixed_capacity
        self._kvt_header = torch.frombuffer(
            bytearray(self.kvtuner_layout.header), dtype=torch.uint8
        )
        self.kvtuner_overlay: Optional[ResidualOverlay] = None
        # Who packs the pages, built once the rows exist (see _kvt_select_codec).
        self._kvt_codec: Optional[PageCodec] = None
        self._kvt_carved = False
        self._kvt_overlay_slots = 0
        self._dummy_lock = threading.Lock()
        self._dummy_free: List[torch.Tensor] = []
        self._dummy_issued: "weakref.WeakValueDictionary[int, torch.Tensor]" = (
            weakref.WeakValueDictionary()
        )

    def _kvt_memory_ratio_as_size(self, host_size, ratio, device_tokens) -> float:
        """The host size in GB, with --hicache-ratio read as a ratio of memory, not tokens."""
        # HiCache auto-sizing picks the ratio from a byte budget and the device pool's fp16 bytes,
        # so the pool gets the bytes the stock pool would and holds stock/quantized times more
        # tokens. An explicit --hicache-size (GB) is kept.
        if (host_size and host_size > 0) or not ratio:
            return host_size
        return device_tokens * ratio * self._kvt_stock_bytes / 1e9

    # ------------------------------------------------------------ geometry ---

    def get_size_per_token(self):
        return self.kvtuner_layout.bytes_per_token

    def stock_size_per_token(self) -> int:
        """Bytes per token the stock pool would use for the same layers."""
        return self._kvt_stock_bytes

    @property
    def kvtuner_page_nbytes(self) -> int:
        return self.kvtuner_layout.row_nbytes

    def kvtuner_namespace_tag(self) -> str:
        """Short stable name of dtype and quantization config, for storage namespaces."""
        return self.kvtuner_layout.tag

    def _exact_page_nbytes(self) -> int:
        """Bytes of one page of every layer's K and V at full precision."""
        return (
            2
            * self.layer_num
            * self.page_size
            * self.head_num
            * self.head_dim
            * self.dtype.itemsize
        )

    def _window_pages(self) -> int:
        return window_pages(self._kvt_cfg.residual_length, self.page_size)

    def _allocate_host_buffer(self) -> None:
        # 0.5.22+: the base checks the budget and then calls init_kv_buffer().
        self._kvt_carve_overlay()
        super()._allocate_host_buffer()

    def _kvt_carve_overlay(self) -> None:
        """Take the overlay's bytes out of the sized pool, once, before the rows are allocated."""
        # Called from whichever of the base's hooks runs first (see compat.py).
        if self._kvt_carved:
            return
        self._kvt_carved = True
        window = self._window_pages()
        row = self.kvtuner_layout.row_nbytes
        exact = self._exact_page_nbytes()
        if window and self._kvt_fixed_capacity:
            logger.warning(
                "KVTuner HiCache: the host pool has a fixed token capacity, so the "
                "residual overlay is off (no byte budget to carve it from)."
            )
        elif window:
            slots, taken = carve_slots(
                self.page_num, row, exact, window, self._kvt_cfg.residual_length
            )
            self.page_num -= taken
            self.size = self.page_num * self.page_size
            self._kvt_overlay_slots = slots

    def _kvt_alloc_overlay(self) -> None:
        """Allocate the overlay ring carved out by ``_kvt_carve_overlay``."""
        slots = self._kvt_overlay_slots
        if not slots or self.kvtuner_overlay is not None:
            return
        nbytes = slots * self._exact_page_nbytes()
        available = host_budget_bytes(nbytes)
        if nbytes > available:
            raise ValueError(
                f"Not enough host memory for the KVTuner residual overlay: "
                f"{nbytes / 1e9:.2f} GB requested, {available / 1e9:.2f} GB free"
            )
        shape = (slots, 2, self.layer_num, self.page_size, self.head_num, self.head_dim)
        self.kvtuner_overlay = ResidualOverlay(
            alloc_host(self, shape, self.dtype, None),
            page_num=self.page_num,
            window_pages=self._window_pages(),
        )

    def init_kv_buffer(self):
        """The host rows: one uint8 row of ``row_nbytes`` per page."""
        # Bases before 0.5.22 call this right after sizing the pool.
        self._kvt_carve_overlay()
        # Kept for code that reads them; they describe the device rows.
        self.token_stride_size = self.head_num * self.head_dim * self.dtype.itemsize
        self.layout_dim = self.token_stride_size * self.layer_num
        row = self.kvtuner_layout.row_nbytes
        rows = alloc_host(self, (self.page_num, row), torch.uint8, row)
        self._kvt_alloc_overlay()
        return rows

    def _initialize_transfer_views(self, *_release_args) -> None:
        """Disable the release's fp16 copy kernels and their pointer tables."""
        # The release's copy kernels and their pointer tables address fp16 host
        # rows; none of them applies to quantized rows. (0.5.23 calls this with
        # (buffer_info, write_back_staging), 0.5.22 with nothing; earlier releases
        # never: the device-pool constructor calls it.)
        self.element_dim = self.head_num * self.head_dim
        if hasattr(self, "_init_device_row_stride"):  # 0.5.22+
            self._init_device_row_stride((*self.device_k_buffers, *self.device_v_buffers))
        self.can_use_jit = False
        self.can_use_write_back_jit = False
        self.k_data_refs = []
        self.v_data_refs = []
        self.k_data_ptrs = None
        self.v_data_ptrs = None
        self.host_kv_data_refs = []
        self.staging_page_capacity = 0
        self.staging_token_capacity = 0
        self.staging_k_buffer = None
        self.staging_v_buffer = None

    @property
    def k_buffer(self):
        raise AttributeError(
            "KVTuner host pool has no fp16 K buffer: pages are quantized rows in kv_buffer"
        )

    @property
    def v_buffer(self):
        raise AttributeError(
            "KVTuner host pool has no fp16 V buffer: pages are quantized rows in kv_buffer"
        )

    def get_hybrid_pool_buffer(self):
        return [self.kv_buffer]

    # ------------------------------------------------------------ overlay ---

    def _overlay_drop(self, pages: torch.Tensor) -> None:
        """Forget the exact copies of host pages (freed or refilled rows)."""
        self._kvt_codec.drop(pages)

    def kvtuner_overlay_pages(self) -> List[int]:
        """Host pages currently served exactly from the overlay (tests, metrics)."""
        if self.kvtuner_overlay is None:
            return []
        return self._kvt_codec.exact_pages()

    def free(self, indices: torch.Tensor) -> int:
        freed = super().free(indices)
        if self.kvtuner_overlay is not None and indices.numel():
            self._overlay_drop(torch.unique(indices.cpu() // self.page_size))
        return freed

    def clear(self):
        super().clear()
        # The base constructor may clear before the codec exists.
        if getattr(self, "_kvt_codec", None) is not None:
            self._kvt_codec.clear()

    # ----------------------------------------------------------- transfers ---

    def _host_pages(self, host_indices: torch.Tensor) -> torch.Tensor:
        """Page-aligned host token indices -> CPU int64 page ids."""
        return host_pages(host_indices, self.page_size)

    @staticmethod
    def _check_io_backend(io_backend: str) -> None:
        """Refuse an io backend whose copy kernels would need fp16 host rows."""
        if io_backend not in SUPPORTED_IO_BACKENDS:
            raise ValueError(
                f"KVTuner host pool: unsupported --hicache-io-backend {io_backend!r} "
                f"(supported: {', '.join(SUPPORTED_IO_BACKENDS)})"
            )

    def backup_from_device_all_layer(
        self, device_pool, host_indices, device_indices, io_backend
    ) -> None:
        """Quantize every layer of the device rows into the host pages."""
        self._check_io_backend(io_backend)
        self._kvt_codec.backup(host_indices, device_indices)

    def load_to_device_per_layer(
        self,
        device_pool,
        host_indices,
        device_indices,
        layer_id,
        io_backend,
        *,
        is_draft: bool = False,
    ) -> None:
        """Restore one layer of the host pages into the device rows."""
        if not is_draft and not 0 <= layer_id < self.target_layer_num:
            return
        self._check_io_backend(io_backend)
        self._kvt_codec.load(host_indices, device_indices, layer_id)

    # ------------------------------------------------------------- storage ---

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        page = int(index) // self.page_size
        return self.kv_buffer[page] if flat else self.kv_buffer[page : page + 1]

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        """A scratch page for one storage read."""
        # Not one shared buffer: the controller asks for one per key of a batch and
        # holds them all at once, so a single cached page would alias every read.
        # Pages handed back through set_from_flat_data_page are recycled instead.
        with self._dummy_lock:
            page = self._dummy_free.pop() if self._dummy_free else None
        if page is None:
            page = torch.empty(self.kvtuner_layout.row_nbytes, dtype=torch.uint8)
        self._dummy_issued[id(page)] = page
        return page

    def _recycle_dummy(self, data_page: torch.Tensor) -> None:
        """Keep a scratch page this pool handed out for the next storage read."""
        if self._dummy_issued.get(id(data_page)) is not data_page:
            return
        del self._dummy_issued[id(data_page)]
        cap = min(
            _DUMMY_CACHE_MAX_PAGES,
            max(1, _DUMMY_CACHE_MAX_BYTES // self.kvtuner_layout.row_nbytes),
        )
        with self._dummy_lock:
            if len(self._dummy_free) < cap:
                self._dummy_free.append(data_page)

    @staticmethod
    def _page_bytes(data_page: torch.Tensor) -> torch.Tensor:
        """A storage page as a flat CPU uint8 tensor."""
        t = data_page
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        return t

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        """Fill a host page from storage bytes, refusing another config's page."""
        page = int(index) // self.page_size
        src = self._page_bytes(data_page)
        row = self.kvtuner_layout.row_nbytes
        if src.numel() != row:
            raise ValueError(
                f"KVTuner host pool: storage page for host page {page} holds "
                f"{src.numel()} bytes, expected {row} ({self.storage_format_tag})"
            )
        problem = self.kvtuner_layout.header_mismatch(bytes(src[:PAGE_HEADER_NBYTES].numpy()))
        if problem is not None:
            raise ValueError(
                f"KVTuner host pool: refusing storage page for host page {page}: {problem}"
            )
        self.kv_buffer[page].copy_(src)
        self._overlay_drop(torch.tensor([page], dtype=torch.int64))
        self._recycle_dummy(data_page)

    def kvtuner_check_pages(self, host_indices: torch.Tensor) -> List[bool]:
        """Per page of ``host_indices``: does the host row carry this pool's page header?"""
        # Zero-copy backends call this after writing rows themselves and treat False as a
        # miss. No overlay bookkeeping is needed: a row is only filled from storage after
        # free(), which dropped its overlay entry.
        pages = self._host_pages(host_indices)
        if len(pages) == 0:
            return []
        heads = self.kv_buffer[pages, :PAGE_HEADER_NBYTES]
        same = heads == self._kvt_header
        same[:, STAMP_OFFSET : STAMP_OFFSET + STAMP_NBYTES] = True
        ok = same.all(dim=1)
        return [bool(v) for v in ok]

    def get_page_buffer_meta(self, indices):
        """Zero-copy spans: two per page, the row's contiguous halves."""
        # Two, not one: MHA backends zip a K and a V span with each key.
        assert len(indices) % self.page_size == 0
        row = self.kvtuner_layout.row_nbytes
        half = row // 2
        base = self.kv_buffer.data_ptr()
        ptrs: List[int] = []
        sizes: List[int] = []
        for page in self._host_pages(indices).tolist():
            start = base + page * row
            ptrs += [start, start + half]
            sizes += [half, row - half]
        return ptrs, sizes

    def kvtuner_page_spans(self, indices) -> Tuple[List[int], List[int]]:
        """One (pointer, row bytes) span per page, for backends storing one object per page."""
        row = self.kvtuner_layout.row_nbytes
        base = self.kv_buffer.data_ptr()
        pages = self._host_pages(indices).tolist()
        return [base + p * row for p in pages], [row] * len(pages)

    def get_split_heads_page_buffer_meta(self, indices, split_factor: int):
        raise NotImplementedError(
            "KVTuner host pool pages are quantized whole rows; split-head storage "
            "(page_head layout) is not supported"
        )

    def is_stride_page_aligned(self, page_size_bytes: int = 4096) -> bool:
        return (
            self.kv_buffer.data_ptr() % page_size_bytes == 0
            and self.kvtuner_layout.row_nbytes % page_size_bytes == 0
        )


def _check_layout(layout: str) -> None:
    """Refuse host layouts whose per-layer or per-head spans a quantized row lacks."""
    if layout not in SUPPORTED_LAYOUTS:
        raise ValueError(
            f"--enable-kvtuner-hicache stores page-major quantized rows; "
            f"--hicache-mem-layout {layout!r} is not supported (use one of "
            f"{', '.join(SUPPORTED_LAYOUTS)})"
        )


def check_pool_source(source) -> None:
    """Refuse a buffer info or device pool the quantizing pool cannot mirror, with the reason."""
    if is_buffer_info(source):
        check_buffer_info(source)
    else:
        check_device_pool(source)


def check_device_pool(device_pool) -> None:
    """0.5.3 - 0.5.22: refuse device pools the quantizing pool cannot mirror."""
    head_dim = getattr(device_pool, "head_dim", None)
    _check_same_head_dim(head_dim, getattr(device_pool, "v_head_dim", None) or head_dim)
    dtype = getattr(device_pool, "store_dtype", None)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            "--enable-kvtuner-hicache needs a plain fp16/bf16/fp32 device KV cache; "
            f"this one stores {dtype}"
        )
    if getattr(device_pool, "layer_shard_enabled", False):
        raise ValueError("--enable-kvtuner-hicache does not support layer-sharded device pools")


def check_buffer_info(buffer_info) -> None:
    """0.5.23: refuse device buffers the quantizing pool cannot mirror."""
    if buffer_info.scales is not None:
        raise ValueError(
            "--enable-kvtuner-hicache: the device KV cache carries scales "
            f"({buffer_info.scales.layout.value}); the quantizing host pool needs a "
            "plain fp16/bf16/fp32 KV cache"
        )
    _check_same_head_dim(buffer_info.head_dim, buffer_info.v_head_dim)
    if buffer_info.transfer_buffers is not None:
        raise ValueError(
            "--enable-kvtuner-hicache does not support relocatable device pools (transfer_buffers)"
        )


def _check_same_head_dim(head_dim, v_head_dim) -> None:
    """Refuse K and V of different head_dim: one row layout holds both."""
    if head_dim != v_head_dim:
        raise ValueError(
            "--enable-kvtuner-hicache supports K and V of the same head_dim; this "
            f"model has K {head_dim} and V {v_head_dim}"
        )
