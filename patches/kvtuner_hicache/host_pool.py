"""``KVTunerMHATokenToKVPoolHost``: SGLang's dense MHA host pool (HiCache L2) storing every page
quantized by ``kvtuner_quant``, one ``uint8`` row per host page, for SGLang 0.5.3 - 0.5.23.
Design (transfers, sizing, layouts, storage, residual window, releases): ``docs/host-pool.md``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .compat import (
    MHATokenToKVPoolHost,
    init_host_kv_cache,
    is_buffer_info,
    visible_model_layer_num,
)
from .config import (
    SUPPORTED_LAYOUTS,
    KVTunerHiCacheConfig,
    current_server_config,
    resolve_layer_plan,
)
from .page_format import KV_ITEMSIZE
from .quantized_rows import QuantizedRowsMixin, dtype_name, pin_for


def _stock_bytes_per_token(head_num: int, head_dim: int, layers: int, dtype: torch.dtype) -> int:
    """What the stock pool stores per token: K and V (same head_dim, checked), fp16/bf16/fp32."""
    return 2 * head_dim * head_num * layers * dtype.itemsize


class KVTunerMHATokenToKVPoolHost(QuantizedRowsMixin, MHATokenToKVPoolHost):
    """Dense MHA host pool whose pages are stored quantized (``docs/host-pool.md``)."""

    def __init__(self, source, *args, **kwargs):
        # An MHABufferInfo (0.5.23) or the device pool (0.5.3 - 0.5.22): see compat.py.
        if is_buffer_info(source):
            self._kvt_init_from_buffer_info(source, *args, **kwargs)
        else:
            self._kvt_init_from_device_pool(source, *args, **kwargs)
        why = self._kvt_select_codec((self.device_k_buffers, self.device_v_buffers))
        self._kvt_log_startup(why)

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
        pin_memory = pin_for(buffer_info.buffers.k[0].device, pin_memory)
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
        pin_memory = pin_for(device_pool.device, pin_memory)
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
        cfg = kvtuner_config if kvtuner_config is not None else current_server_config()
        plan = resolve_layer_plan(
            cfg,
            start_layer=int(start_layer or 0),
            target_layer_num=target_layer_num,
            draft_layer_num=draft_layer_num,
            head_num=head_num,
            head_dim=head_dim,
            page_size=page_size,
            dtype_name=dtype_name(dtype),
            model_layer_num=(
                model_layer_num
                if model_layer_num is not None
                else visible_model_layer_num(int(start_layer or 0) + target_layer_num)
            ),
        )
        self._kvt_bind(
            cfg,
            plan,
            stock_bytes_per_token=_stock_bytes_per_token(
                head_num, head_dim, target_layer_num + draft_layer_num, dtype
            ),
            fixed_capacity=fixed_capacity,
        )

    def init_kv_buffer(self):
        """The host rows: one uint8 row of ``row_nbytes`` per page."""
        # Kept for code that reads them; they describe the device rows.
        self.token_stride_size = self.head_num * self.head_dim * self.dtype.itemsize
        self.layout_dim = self.token_stride_size * self.layer_num
        return self._kvt_alloc_rows()

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
    if dtype is None or dtype_name(dtype) not in KV_ITEMSIZE:
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
