"""Which host pool class SGLang builds. Dense MHA: the patched ``get_mha_host_pool_cls``
(0.5.14+) or ``MHATokenToKVPoolHost.__new__`` (0.5.3 - 0.5.13.post1) asks
:func:`select_mha_host_pool_cls` first. MLA: the patched ``MLATokenToKVPoolHost.__new__``
(every release) asks :func:`select_mla_host_pool_cls`. Without ``--enable-kvtuner-hicache``
both answer the stock class and import nothing else. Per release: ``docs/host-pool.md``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from .config import is_enabled

logger = logging.getLogger(__name__)


def select_mha_host_pool_cls(source: Any, default_cls: Optional[type]) -> Optional[type]:
    """The quantizing host pool class when the flag is on, else ``default_cls``."""
    # `source` is what the release passes get_mha_host_pool_cls: an MHABufferInfo (0.5.23) or
    # the device pool (0.5.3 - 0.5.22). With the flag on, one the quantizing pool cannot
    # mirror is a startup error naming the reason, never a silent fall back to full precision.
    if not is_enabled():
        return default_cls
    from .host_pool import KVTunerMHATokenToKVPoolHost, check_pool_source

    check_pool_source(source)
    return KVTunerMHATokenToKVPoolHost


_refusals_logged = set()


def select_mla_host_pool_cls(args: tuple, kwargs: dict) -> Optional[type]:
    """The quantizing MLA host pool class when the flag is on and it can mirror the device KV
    that ``MLATokenToKVPoolHost(*args, **kwargs)`` describes, else None (the stock class)."""
    # Unlike the MHA pool, a configuration it cannot serve (FP8 DSA packed rows, FP4 KV, DCP,
    # layer sharding, NPU split buffers) keeps the stock pool: MLA models mix such pools with
    # plain ones (draft pools, sidecars), so the server starts and says why, once per reason.
    if not is_enabled():
        return None
    from .mla_pool import KVTunerMLATokenToKVPoolHost, mla_refusal

    why = mla_refusal(args, kwargs)
    if why is None:
        return KVTunerMLATokenToKVPoolHost
    if why not in _refusals_logged:
        _refusals_logged.add(why)
        logger.warning(
            "--enable-kvtuner-hicache: this MLA host pool keeps full precision (stock "
            "MLATokenToKVPoolHost): %s is not supported by the quantizing pool",
            why,
        )
    return None
