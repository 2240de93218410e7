"""KVTuner quantizing HiCache host pool (and its storage backends) for SGLang.

Works both injected into SGLang as ``sglang.srt.mem_cache.kvtuner_hicache`` and
installed standalone as ``kvtuner_hicache`` (``patches/pyproject.toml``); modules
import each other relatively. Importing the package imports nothing from SGLang:
``host_pool`` does, and only :mod:`.selection` loads it, when the flag is on.
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
