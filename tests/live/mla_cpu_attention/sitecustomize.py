"""Test scaffolding: lets SGLang's CPU engine run a DeepSeek (MLA) model with
``--attention-backend torch_native``, for the live MLA test (``tests/python/test_live_mla.py``).

The gap (SGLang 0.5.22 and 0.5.23, found by serving a tiny DeepSeek-V2-shaped model): DeepSeek's
attention picks its forward method through ``AttentionBackendRegistry``
(``models/deepseek_common/attention_backend_handler.py``), which has no entry for
``torch_native`` and falls back to the ``triton`` handler. That one sends a prefill without a
cached prefix down the MHA path (per-head keys of ``qk_nope_head_dim + qk_rope_head_dim``),
but ``TorchNativeAttnBackend.forward_extend`` always attends over the KV pool's buffers, which
for MLA hold the ``kv_lora_rank + qk_rope_head_dim`` latent rows; the first request fails:
``RuntimeError: Expected size for first two dimensions of batch2 tensor to be: [4, 192] but
got: [4, 576]``. The CPU engine's own MLA backend (``intel_amx``) needs ``sgl_kernel``'s CPU
attention ops, which the stand-in in ``tests/live/sgl_kernel_standin`` does not have.

The hook below registers a ``torch_native`` handler that always takes the absorbed MLA path
(attention over the latent rows, which ``torch_native`` computes from the pool), so every
token's KV goes through ``MLATokenToKVPool`` and HiCache's MLA host pool as on a GPU.

Put this folder on ``PYTHONPATH`` of the server: Python imports ``sitecustomize`` in every
process it starts. It cannot be combined with ``tests/live/stock_pool_cpu`` (one
``sitecustomize`` is imported, the first on the path).
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "sglang.srt.models.deepseek_common.attention_backend_handler"


def _patch(module) -> None:
    # The absorbed path's own dispatcher (plain MLA off AMX, the fused CPU form with AMX).
    module.AttentionBackendRegistry.register("torch_native", module._dispatch_mla_subtype)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
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
