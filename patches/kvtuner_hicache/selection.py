"""Which dense-MHA host pool class SGLang builds.

The patch calls :func:`select_mha_host_pool_cls` first thing in
``sglang/srt/mem_cache/pool_host/mha.py::get_mha_host_pool_cls`` (the one place
0.5.23 chooses the dense MHA host pool; ``build_kv_host_pool`` reaches it through
``_mha_host_inputs``)::

    _kvtuner_cls = select_mha_host_pool_cls(buffer_info, None)
    if _kvtuner_cls is not None:
        return _kvtuner_cls

Without ``--enable-kvtuner-hicache`` it returns ``default_cls`` untouched and imports
nothing else, so SGLang behaves exactly as before.
"""

from __future__ import annotations

from typing import Any, Optional

from .config import is_enabled


def select_mha_host_pool_cls(buffer_info: Any, default_cls: Optional[type]) -> Optional[type]:
    """The quantizing host pool class when the flag is on, else ``default_cls``.

    With the flag on, a device pool the quantizing pool cannot mirror (scaled
    MXFP8 KV, K/V of different head_dim, relocatable buffers) is a startup error
    naming the reason, never a silent fall back to full precision."""
    if not is_enabled():
        return default_cls
    from .host_pool import KVTunerMHATokenToKVPoolHost, check_buffer_info

    check_buffer_info(buffer_info)
    return KVTunerMHATokenToKVPoolHost
