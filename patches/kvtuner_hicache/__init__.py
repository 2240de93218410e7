"""KVTuner quantizing HiCache host pool and storage backends for SGLang, injected as
``sglang.srt.mem_cache.kvtuner_hicache`` or installed standalone as ``kvtuner_hicache``.
Importing the package imports nothing from SGLang. Module layout: ``docs/host-pool.md``.
"""

from .config import (
    KVTunerHiCacheConfig,
    check_server_args,
    config_from_args,
    load_layer_preset,
)
from .selection import select_mha_host_pool_cls

__all__ = [
    "KVTunerHiCacheConfig",
    "check_server_args",
    "config_from_args",
    "load_layer_preset",
    "select_mha_host_pool_cls",
]
