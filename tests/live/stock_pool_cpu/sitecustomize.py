"""Test scaffolding: lets SGLang 0.5.23's *stock* HiCache host pool run on its CPU engine,
for the live tests and benchmark that compare it with the quantizing pool.

Two gaps stop the stock pool there (the quantizing pool needs neither of these):
- it pins its host memory by default (``cudaHostRegister``, and ``pin_memory=True`` scratch
  pages on the L3 read path), which fails with no NVIDIA driver;
- the ``direct`` transfer functions for ``page_first_direct`` are imported only on CUDA, HIP
  and XPU, and are native ``sgl_kernel`` ops this machine does not have.

Put this folder on ``PYTHONPATH`` of the server: Python imports ``sitecustomize`` in every
process it starts, and the hook below edits the module defining ``MHATokenToKVPoolHost`` right after it is imported:
the pool is built unpinned, and the two page_first_direct transfers get plain torch copies.
"""

import importlib.abc
import importlib.machinery
import inspect
import sys

# Where MHATokenToKVPoolHost lives: pool_host/mha.py from 0.5.16, memory_pool_host.py before.
_TARGETS = ("sglang.srt.mem_cache.pool_host.mha", "sglang.srt.mem_cache.memory_pool_host")


def transfer_kv_per_layer_direct_pf_lf(
    src_ptrs, dst_ptrs, src_indices, dst_indices, layer_id, page_size
):
    """Host pages (page_first_direct: page, layer, token, head, dim) -> one device layer."""
    pages = src_indices[::page_size] // page_size
    for host, device in zip(src_ptrs, dst_ptrs):  # K, then V
        device[dst_indices] = host[pages, layer_id].reshape(-1, *device.shape[1:])


def transfer_kv_all_layer_direct_lf_pf(src_ptrs, dst_ptrs, src_indices, dst_indices, page_size):
    """Every device layer (K layers, then V layers) -> host pages (page_first_direct)."""
    pages = dst_indices[::page_size] // page_size
    layers = len(src_ptrs) // len(dst_ptrs)
    for part, host in enumerate(dst_ptrs):
        for layer, device in enumerate(src_ptrs[part * layers : (part + 1) * layers]):
            host[pages, layer] = device[src_indices].reshape(host[pages, layer].shape)


def _unpinned(init):
    params = inspect.signature(init)

    def __init__(self, *args, **kwargs):
        bound = params.bind(self, *args, **kwargs)
        bound.arguments["pin_memory"] = False
        init(*bound.args, **bound.kwargs)

    return __init__


def _patch(module) -> None:
    stock = vars(module).get("MHATokenToKVPoolHost")
    if stock is None or stock.__module__ != module.__name__:
        return  # a module that only re-exports the class (memory_pool_host.py from 0.5.16)
    module.transfer_kv_per_layer_direct_pf_lf = transfer_kv_per_layer_direct_pf_lf
    module.transfer_kv_all_layer_direct_lf_pf = transfer_kv_all_layer_direct_lf_pf
    stock.__init__ = _unpinned(stock.__init__)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            self._loader = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


sys.meta_path.insert(0, _AfterImport())
