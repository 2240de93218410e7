"""``KVTunerMLATokenToKVPoolHost``: SGLang's MLA host pool (DeepSeek, Kimi, GLM, MiniCPM3, ...)
storing every page quantized: per layer the latent (``kv_lora_rank`` values per token) as a
``kvtuner_quant`` blob with the key flags, the rope keys (``qk_rope_head_dim``) exact in the KV
dtype (page format 4). It builds from the release's own ``MLATokenToKVPoolHost.__init__``,
whichever form it has (0.5.3 - 0.5.23); configurations it cannot mirror keep the stock pool
(:func:`mla_refusal`). Design: ``docs/host-pool.md`` ("MLA models").
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

import torch

from .compat import MLATokenToKVPoolHost, is_buffer_info, visible_model_layer_num
from .config import (
    SUPPORTED_LAYOUTS,
    KVTunerHiCacheConfig,
    current_server_config,
    resolve_layer_plan,
)
from .page_format import KV_ITEMSIZE
from .quantized_rows import QuantizedRowsMixin, dtype_name, pin_for


def stock_init_arguments(args: Tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The stock ``MLATokenToKVPoolHost.__init__``'s arguments by name, defaults filled in,
    for this release's form of it."""
    bound = inspect.signature(MLATokenToKVPoolHost.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)))  # self
    # Keyword-only arguments the form folds into **kwargs (none today) stay keywords.
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def _source(arguments: Dict[str, Any]) -> Any:
    """What the pool mirrors: an ``MLABufferInfo`` (0.5.23) or the device pool (up to 0.5.22)."""
    return next(iter(arguments.values()))


def mla_refusal(args: Tuple, kwargs: Dict[str, Any]) -> Optional[str]:
    """Why the quantizing pool cannot mirror the MLA device KV these arguments describe, or
    None when it can."""
    arguments = stock_init_arguments(args, kwargs)
    source = _source(arguments)
    if arguments.get("is_dummy") or not (is_buffer_info(source) or hasattr(source, "kv_buffer")):
        return "an allocator-only host pool (no device buffers to mirror)"
    if is_buffer_info(source):
        if source.scales is not None:
            return "FP4 device KV (block scales)"
        if not isinstance(source.buffers, tuple):
            return "split K/rope device buffers (NPU layout)"
        packed = bool(source.packed_fp8)
    else:
        packed = bool(getattr(source, "dsa_kv_cache_store_fp8", False))
        if getattr(source, "layer_shard_enabled", False):
            return "layer-sharded device pool"
    dtype = source.dtype if is_buffer_info(source) else source.store_dtype
    if packed:
        return "FP8 DSA packed rows (latent, rope and scales in one row)"
    if dtype_name(dtype) not in KV_ITEMSIZE:
        return f"{dtype} device KV (needs fp16, bf16 or fp32)"
    row = int(source.kv_lora_rank) + int(source.qk_rope_head_dim)
    override = arguments.get("override_kv_cache_dim")
    if override not in (None, row) or int(getattr(source, "kv_cache_dim", row)) != row:
        return f"device rows wider than kv_lora_rank + qk_rope_head_dim ({row})"
    if int(arguments.get("dcp_size", 1) or 1) > 1:
        return "decode context parallelism (DCP)"
    if arguments.get("layer_shard_enabled"):
        return "layer-sharded device pool"
    # HiSparse (0.5.23) builds its host pool with layer_first and reads the rows itself.
    if arguments["layout"] not in SUPPORTED_LAYOUTS:
        return f"--hicache-mem-layout {arguments['layout']} (supported: {', '.join(SUPPORTED_LAYOUTS)})"
    if torch.device(source.device).type == "npu":
        return "an NPU device pool"
    return None


class KVTunerMLATokenToKVPoolHost(QuantizedRowsMixin, MLATokenToKVPoolHost):
    """MLA host pool whose pages are stored quantized (``docs/host-pool.md``, "MLA models")."""

    def __init__(
        self,
        *args,
        kvtuner_config: Optional[KVTunerHiCacheConfig] = None,
        model_layer_num: Optional[int] = None,
        **kwargs,
    ):
        arguments = stock_init_arguments(args, kwargs)
        source = _source(arguments)
        from_info = is_buffer_info(source)
        if from_info:  # 0.5.23
            dtype = source.dtype
            target_layers = int(arguments["target_layer_num"])
            draft_layers = len(arguments.get("draft_buffer_infos") or ())
            start_layer = int(arguments["start_layer"] or 0)
            device_tokens = arguments["device_capacity_tokens"]
            fixed_capacity = arguments.get("host_token_capacity") is not None
        else:  # up to 0.5.22: the device pool
            dtype = source.store_dtype
            target_layers = int(source.layer_num)
            draft_layers = len(arguments.get("mtp_draft_device_pools") or ())
            start_layer = int(getattr(source, "start_layer", 0) or 0)
            device_tokens = getattr(source, "host_capacity_tokens", None) or source.size
            fixed_capacity = False
        self._kvt_latent_dim = int(source.kv_lora_rank)
        self._kvt_rope_dim = int(source.qk_rope_head_dim)
        cfg = kvtuner_config if kvtuner_config is not None else current_server_config()
        plan = resolve_layer_plan(
            cfg,
            start_layer=start_layer,
            target_layer_num=target_layers,
            draft_layer_num=draft_layers,
            head_num=1,
            head_dim=self._kvt_latent_dim,
            page_size=int(arguments["page_size"]),
            dtype_name=dtype_name(dtype),
            model_layer_num=(
                model_layer_num
                if model_layer_num is not None
                else visible_model_layer_num(start_layer + target_layers)
            ),
            kind="mla",
            rope_dim=self._kvt_rope_dim,
        )
        row = self._kvt_latent_dim + self._kvt_rope_dim
        self._kvt_bind(
            cfg,
            plan,
            stock_bytes_per_token=row * dtype.itemsize * (target_layers + draft_layers),
            fixed_capacity=fixed_capacity,
        )
        if not fixed_capacity:
            arguments["host_size"] = self._kvt_memory_ratio_as_size(
                arguments["host_size"], arguments["host_to_device_ratio"], device_tokens
            )
        # Where the rows are allocated for, and the target layers (the stock pool sets them
        # itself only in newer releases).
        self._transfer_device = torch.device(source.device)
        self.target_layer_num = target_layers
        arguments["pin_memory"] = pin_for(source.device, arguments["pin_memory"])
        super().__init__(**arguments)
        why = self._kvt_select_codec(self._kvt_device_parts(source, arguments))
        self._kvt_log_startup(why, kind="MLA ")

    def get_size_per_token(self):
        # Up to 0.5.21 the stock method also sets the pool's geometry (layer_num,
        # kv_cache_dim, ...) as the base's sizing calls it: keep that, report quantized bytes.
        MLATokenToKVPoolHost.get_size_per_token(self)
        return self.kvtuner_layout.bytes_per_token

    def _kvt_device_parts(self, source, arguments):
        """The device buffers of each part, per host layer: the latent columns and the rope
        columns of every layer's rows (target layers, then MTP draft layers)."""
        buffers = getattr(self, "device_kv_buffers", None)
        if not buffers:  # before 0.5.19 the pool keeps no tuple of them
            pools = (source, *(arguments.get("mtp_draft_device_pools") or ()))
            buffers = tuple(b for pool in pools for b in pool.kv_buffer)
        rows = [b.view(b.shape[0], -1) for b in buffers]
        latent, rope = self._kvt_latent_dim, self._kvt_rope_dim
        return (
            tuple(r[:, :latent] for r in rows),
            tuple(r[:, latent : latent + rope] for r in rows),
        )

    def _kvt_host_layer(self, layer_id: int, is_draft: bool) -> Optional[int]:
        by_controller = getattr(self, "_host_layer_by_controller", None)
        if by_controller is None:  # up to 0.5.22: controller layer ids are host layers
            return super()._kvt_host_layer(layer_id, is_draft)
        # 0.5.23: controller slots (target layers, then drafts after every device layer).
        if not is_draft and layer_id not in self._target_layer_indices:
            return None
        return by_controller.get(layer_id)

    def init_kv_buffer(self):
        """The host rows: one uint8 row of ``row_nbytes`` per page."""
        # Kept for code that reads them; they describe the device rows.
        self.token_stride_size = self.kv_cache_dim * self.dtype.itemsize
        self.layout_dim = self.token_stride_size * self.layer_num
        return self._kvt_alloc_rows()

    def _initialize_transfer_views(self, *_release_args) -> None:
        """Disable the release's full-precision copy kernels and their pointer tables."""
        # They address host rows of kv_cache_dim elements per token and layer; none of them
        # applies to quantized rows.
        self.can_use_jit = False
        self.can_use_write_back_jit = False
        self.data_refs = []
        self.data_ptrs = None
        self.staging_page_capacity = 0
        self.staging_token_capacity = 0
        self.staging_buffer = None

    def get_contiguous_buf_infos(self):
        raise NotImplementedError(
            "KVTuner MLA host pool pages are quantized rows; registering them as per-layer "
            "KV buffers (disaggregation) is not supported"
        )

    def get_page_buffer_meta(self, indices):
        """Zero-copy spans: one per page, the whole row (MLA backends move one span per key)."""
        assert len(indices) % self.page_size == 0
        return self.kvtuner_page_spans(indices)
