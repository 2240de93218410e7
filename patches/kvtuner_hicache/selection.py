"""Which dense-MHA host pool class SGLang builds. The patched ``get_mha_host_pool_cls``
(0.5.14+) or ``MHATokenToKVPoolHost.__new__`` (0.5.3 - 0.5.13.post1) asks
:func:`select_mha_host_pool_cls` first; without ``--enable-kvtuner-hicache`` it answers the
stock class and imports nothing else. Per release: ``docs/host-pool.md`` ("Releases").
"""

from __future__ import annotations

from typing import Any, Optional

from .config import is_enabled


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
