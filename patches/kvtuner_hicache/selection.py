"""Which dense-MHA host pool class SGLang builds.

From 0.5.14 the patch calls :func:`select_mha_host_pool_cls` first thing in
``get_mha_host_pool_cls``, the one place SGLang chooses the dense MHA host pool
class (``mem_cache/pool_host/mha.py`` from 0.5.16, ``mem_cache/memory_pool_host.py``
in 0.5.14 - 0.5.15; 0.5.23's ``build_kv_host_pool`` reaches it through
``_mha_host_inputs``, earlier releases from ``HiRadixCache``, ``build_kv_host_pool``
and the draft / decode-offload builders). Its argument is the ``MHABufferInfo`` in
0.5.23 and the device pool before; the call passes whichever it is::

    _kvtuner_cls = select_mha_host_pool_cls(buffer_info, None)   # device_pool before 0.5.23
    if _kvtuner_cls is not None:
        return _kvtuner_cls

0.5.3 - 0.5.13.post1 have no such function (each of those sites names
``MHATokenToKVPoolHost`` itself), so the patch gives that class a ``__new__`` that
asks :func:`select_mha_host_pool_cls` with the device pool, the constructor's first
argument, and builds the returned subclass instead.

Without ``--enable-kvtuner-hicache`` it returns ``default_cls`` untouched and imports
nothing else, so SGLang behaves exactly as before.
"""

from __future__ import annotations

from typing import Any, Optional

from .config import is_enabled


def select_mha_host_pool_cls(source: Any, default_cls: Optional[type]) -> Optional[type]:
    """The quantizing host pool class when the flag is on, else ``default_cls``.

    With the flag on, a device pool the quantizing pool cannot mirror (scaled
    MXFP8 KV, K/V of different head_dim, relocatable buffers) is a startup error
    naming the reason, never a silent fall back to full precision. ``source``
    is what the release passes ``get_mha_host_pool_cls``: an ``MHABufferInfo``
    (0.5.23) or the device pool (0.5.3 - 0.5.22)."""
    if not is_enabled():
        return default_cls
    from .host_pool import KVTunerMHATokenToKVPoolHost, check_pool_source

    check_pool_source(source)
    return KVTunerMHATokenToKVPoolHost
