"""What every quantizing host pool shares, whatever its device rows: one ``uint8`` row per
host page laid out by a ``PageLayout``, packed and read by a page codec (``codec.py``), the
residual overlay carved from the pool's bytes, and the storage methods backends call. The pool
kinds (``host_pool.py``: dense MHA; ``mla_pool.py``: MLA) say how their rows map to the device
buffers and build from their release's base class (``docs/host-pool.md``)."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import List, Optional, Sequence, Tuple

import torch

from .codec import CodecParts, PageCodec, StampCounter, host_pages, import_quant
from .compat import alloc_host, host_budget_bytes
from .config import SUPPORTED_IO_BACKENDS, KVTunerHiCacheConfig, LayerPlan
from .device_transfer import build_codec
from .overlay import ResidualOverlay, carve_slots, window_pages
from .page_format import KV_ITEMSIZE, PAGE_HEADER_NBYTES, STAMP_NBYTES, STAMP_OFFSET, PageLayout

logger = logging.getLogger(__name__)

# Recycled scratch pages for the generic (non zero-copy) storage read path: at most
# one storage batch (STORAGE_BATCH_SIZE pages) and at most this many bytes.
_DUMMY_CACHE_MAX_PAGES = 128
_DUMMY_CACHE_MAX_BYTES = 256 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def pin_for(device_kv, pin_memory: bool) -> bool:
    """Whether to pin the host rows: only for device KV on an accelerator."""
    # SGLang asks for pinned rows by default, but with the device KV on the CPU (its CPU
    # engine) a copy gains nothing from them, and pinning needs a GPU driver that is not there.
    return pin_memory and torch.device(device_kv).type != "cpu"


class QuantizedRowsMixin:
    """The quantized rows, codec, overlay and storage methods of a quantizing host pool.

    A pool kind calls :meth:`_kvt_bind` before its base sizes the pool, hands its device
    buffers to :meth:`_kvt_select_codec` once the rows exist, and maps controller layer ids
    to host layers in :meth:`_kvt_host_layer`.
    """

    def _kvt_bind(
        self,
        cfg: KVTunerHiCacheConfig,
        plan: LayerPlan,
        *,
        stock_bytes_per_token: int,
        fixed_capacity: bool,
    ) -> None:
        """Set what get_size_per_token() and init_kv_buffer() need before the base runs."""
        self.kvtuner_plan = plan
        self.kvtuner_layout = PageLayout(plan, import_quant().blob_layout)
        self.storage_format_tag = self.kvtuner_layout.tag
        self._kvt_stock_bytes = stock_bytes_per_token
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

    def _kvt_select_codec(self, sources: Sequence[Sequence[torch.Tensor]]) -> str:
        """Pick who packs the pages (``--kvtuner-hicache-codec``) once the rows exist, for
        the device buffers ``sources[part][host layer]``; returns why, for the startup line."""
        parts = CodecParts(
            layout=self.kvtuner_layout,
            rows=self.kv_buffer,
            sources=sources,
            stamps=StampCounter(),
            backup_lock=threading.Lock(),
            overlay=self.kvtuner_overlay,
        )
        self._kvt_codec, why = build_codec(self._kvt_cfg.codec, parts)
        self.kvtuner_codec = self._kvt_codec.name
        return why

    def _kvt_log_startup(self, why: str, kind: str = "") -> None:
        """The one startup line of the pool: format, bytes per token, pages, overlay, codec
        (``kind``: "" for dense MHA, whose line operators already know, "MLA ")."""
        logger.info(
            "KVTuner HiCache %shost pool: %s, %d B/token (stock %d B/token), %d pages, "
            "residual overlay %d pages, %s codec (%s)",
            kind,
            self.storage_format_tag,
            self.size_per_token,
            self.stock_size_per_token(),
            self.page_num,
            self._kvt_overlay_slots,
            self.kvtuner_codec,
            why,
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

    def _exact_page_shape(self) -> Tuple[int, ...]:
        """One overlay slot: every layer of a page's quantized parts at full precision."""
        layout = self.kvtuner_layout
        spec = layout.parts[0][0].spec
        return (layout.quantized_parts, self.layer_num, self.page_size, spec.heads, spec.head_dim)

    def _exact_page_nbytes(self) -> int:
        n = KV_ITEMSIZE[self.kvtuner_plan.dtype_name]
        for dim in self._exact_page_shape():
            n *= dim
        return n

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
        self.kvtuner_overlay = ResidualOverlay(
            alloc_host(self, (slots, *self._exact_page_shape()), self.dtype, None),
            page_num=self.page_num,
            window_pages=self._window_pages(),
        )

    def _kvt_alloc_rows(self) -> torch.Tensor:
        """The host rows: one uint8 row of ``row_nbytes`` per page (and the overlay ring)."""
        # Bases before 0.5.22 call init_kv_buffer() right after sizing the pool.
        self._kvt_carve_overlay()
        row = self.kvtuner_layout.row_nbytes
        rows = alloc_host(self, (self.page_num, row), torch.uint8, row)
        # No codec writes the alignment gaps and the tail pad of a row, and the allocator may
        # hand back used memory: zero them once, so stored pages never carry stale bytes.
        for off, nbytes in self.kvtuner_layout.gaps:
            rows[:, off : off + nbytes].zero_()
        self._kvt_alloc_overlay()
        return rows

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
        """Refuse an io backend whose copy kernels would need full-precision host rows."""
        if io_backend not in SUPPORTED_IO_BACKENDS:
            raise ValueError(
                f"KVTuner host pool: unsupported --hicache-io-backend {io_backend!r} "
                f"(supported: {', '.join(SUPPORTED_IO_BACKENDS)})"
            )

    def _kvt_host_layer(self, layer_id: int, is_draft: bool) -> Optional[int]:
        """The host layer a controller layer id loads into, or None for a layer this pool
        does not hold."""
        if not is_draft and not 0 <= layer_id < self.target_layer_num:
            return None
        return layer_id

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
        layer = self._kvt_host_layer(layer_id, is_draft)
        if layer is None:
            return
        self._check_io_backend(io_backend)
        self._kvt_codec.load(host_indices, device_indices, layer)

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
