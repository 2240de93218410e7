"""What differs per SGLang release (0.5.3 - 0.5.23) for the quantizing host pool: where the
base classes live, how host memory is budgeted and allocated, and which form of
``HostKVCache.__init__`` a release has. Each difference is detected by what the release has,
never by its version number. Per-release notes: ``docs/host-pool.md``."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

try:  # 0.5.14+
    from sglang.srt.mem_cache.pool_host.base import HostKVCache
    from sglang.srt.mem_cache.pool_host.common import ALLOC_MEMORY_FUNCS
except ImportError:  # 0.5.3 - 0.5.13.post1: everything in memory_pool_host.py
    from sglang.srt.mem_cache.memory_pool_host import HostKVCache

    try:  # 0.5.6.post1+
        from sglang.srt.mem_cache.memory_pool_host import ALLOC_MEMORY_FUNCS
    except ImportError:  # the stock pool allocates with torch.empty(pin_memory=...)
        ALLOC_MEMORY_FUNCS = None
try:  # 0.5.16+
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
except ImportError:  # up to 0.5.15: in memory_pool_host.py
    from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost
try:  # 0.5.16+
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
except ImportError:  # up to 0.5.15: in memory_pool_host.py
    from sglang.srt.mem_cache.memory_pool_host import MLATokenToKVPoolHost
try:  # 0.5.19+ (takes the requested bytes from 0.5.21)
    from sglang.srt.mem_cache.pool_host.base import host_memory_budget_bytes
except ImportError:
    host_memory_budget_bytes = None

__all__ = [
    "HostKVCache",
    "MHATokenToKVPoolHost",
    "MLATokenToKVPoolHost",
    "alloc_host",
    "host_budget_bytes",
    "init_host_kv_cache",
    "is_buffer_info",
    "visible_model_layer_num",
]


def is_buffer_info(source: Any) -> bool:
    """Whether ``source`` is an ``MHABufferInfo`` (0.5.23) rather than a device pool."""
    return hasattr(source, "buffers") and not hasattr(source, "k_buffer")


def host_budget_bytes(requested: int) -> int:
    """Host RAM this rank may claim, asked the way the release asks it."""
    if host_memory_budget_bytes is None:  # up to 0.5.18
        import psutil

        return psutil.virtual_memory().available
    if inspect.signature(host_memory_budget_bytes).parameters:  # 0.5.21+
        return host_memory_budget_bytes(requested)
    return host_memory_budget_bytes()


def alloc_host(pool, shape, dtype, granularity: Optional[int]) -> torch.Tensor:
    """Host memory from the release's allocator for the pool's transfer device."""
    # Given what its signature takes: the pool's allocator (0.5.7+) and the registration
    # granularity (0.5.19+). Before 0.5.6.post1 there is none: torch.empty, as the stock pool.
    if ALLOC_MEMORY_FUNCS is None:
        return torch.empty(shape, dtype=dtype, device=pool.device, pin_memory=pool.pin_memory)
    alloc = ALLOC_MEMORY_FUNCS[pool._transfer_device.type]
    params = inspect.signature(alloc).parameters
    kwargs = dict(dtype=dtype, device=pool.device, pin_memory=pool.pin_memory)
    if "allocator" in params:
        kwargs["allocator"] = pool.allocator
    if granularity is not None and "registration_granularity_bytes" in params:
        kwargs["registration_granularity_bytes"] = granularity
    return alloc(shape, **kwargs)


def visible_model_layer_num(layers_through_this_stage: int) -> Optional[int]:
    """The model's layer count where this rank can know it, else None."""
    # Known without pipeline parallelism, or on the last stage (whose layers end with the
    # model's). Callers pass start_layer + the pool's layer count, never end_layer: SGLang's
    # device pool defaults end_layer to the last layer (inclusive) when a caller omits it,
    # while the model runner passes the exclusive end.
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        pp_size, pp_rank = int(parallel.pp_size), int(parallel.pp_rank)
    except Exception:  # parallel state not initialized: a single-process build
        return layers_through_this_stage
    return layers_through_this_stage if pp_rank == pp_size - 1 else None


def init_host_kv_cache(
    pool,
    device_pool,
    *,
    host_to_device_ratio: float,
    host_size: float,
    page_size: int,
    layout: str,
    pin_memory: bool,
    device: str,
    allocator_type: str,
    pool_label: str,
    device_capacity_tokens: int,
) -> None:
    """Run the release's own ``HostKVCache.__init__`` on ``pool`` (0.5.3 - 0.5.22)."""
    # 0.5.23 passes host pools an MHABufferInfo and goes through MHATokenToKVPoolHost.__init__.
    params = inspect.signature(HostKVCache.__init__).parameters
    if "device_pool" in params:
        # Up to 0.5.21: the base sizes the pool from the device pool and calls
        # get_size_per_token() / init_kv_buffer() itself. It takes the allocator
        # from 0.5.7 and a label from 0.5.20.
        extra = {
            name: value
            for name, value in (("allocator_type", allocator_type), ("pool_label", pool_label))
            if name in params
        }
        HostKVCache.__init__(
            pool,
            device_pool,
            host_to_device_ratio,
            host_size,
            page_size,
            layout,
            pin_memory,
            device,
            **extra,
        )
    else:
        # 0.5.22: keyword-only geometry, computed by the concrete pool first.
        HostKVCache.__init__(
            pool,
            dtype=pool.dtype,
            device_capacity_tokens=device_capacity_tokens,
            size_per_token=pool.get_size_per_token(),
            start_layer=device_pool.start_layer,
            end_layer=device_pool.end_layer,
            host_to_device_ratio=host_to_device_ratio,
            host_size=host_size,
            page_size=page_size,
            layout=layout,
            pin_memory=pin_memory,
            device=device,
            allocator_type=allocator_type,
            pool_label=pool_label,
        )
