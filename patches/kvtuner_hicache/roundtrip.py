"""One round trip of a prefix's KV the way a HiCache page goes: through SGLang's device pool,
the quantizing host pool and the page bytes an L3 backend stores (or through the codec
alone), with what it cost. ``evaluate`` and ``calibrate`` score what comes back."""

from __future__ import annotations

import dataclasses
import inspect

import torch

from .config import KVTunerHiCacheConfig

# The ways back a page takes: from an L3 backend's stored bytes, or from the host pool.
ROUTES = ("storage", "host")
GIB = 1 << 30


@dataclasses.dataclass
class RoundTrip:
    """What came back from one round trip of a prefix's KV, and what it cost."""

    k: torch.Tensor  # [layers, tokens, kv_heads, head_dim], float32
    v: torch.Tensor
    layer_bits: tuple[tuple[int, int], ...]
    stored_nbytes: int  # bytes the prefix took in the tier it was loaded from
    tokens_per_gib: int
    # Pool: the page rows as an L3 backend stored them ([pages, row bytes]) and their
    # layout; codec: blobs[layer][page] = (K blob, V blob), sinks[layer][page] = (K, V
    # sink tokens).
    pages: torch.Tensor | None = None
    layout: object = None
    blobs: list[list[tuple[bytes, bytes]]] | None = None
    sinks: list[list[tuple[bytes, bytes]]] | None = None

    def nominal_bits(self) -> float:
        return sum(k + v for k, v in self.layer_bits) / (2 * len(self.layer_bits))

    def effective_bits(self) -> float:
        return 8 * self.stored_nbytes / (2 * self.k.numel())


def _import_quant():
    try:
        import kvtuner_quant
    except ImportError as e:
        raise ValueError(
            f"kvtuner_quant is not installed (pip install ./quant from kvtuner-patch): {e}"
        ) from None
    return kvtuner_quant


def _device_pool(layer_num: int, tokens: int, head_num: int, head_dim: int, dtype, page_size):
    """SGLang's own device pool on CPU, built as a caller that omits the layer range does
    (SGLang then defaults ``end_layer`` to the last layer, inclusive)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=tokens + page_size,
        page_size=page_size,
        dtype=dtype,
        head_num=head_num,
        head_dim=head_dim,
        layer_num=layer_num,
        device="cpu",
        enable_memory_saver=False,
    )


def _host_pool(dev, cfg: KVTunerHiCacheConfig, page_size: int, nbytes: float):
    """The quantizing host pool for ``dev`` with a budget of ``nbytes``, given what this
    release passes its dense MHA host pools (0.5.23: the device pool's buffer info and the
    layer range; before: the device pool)."""
    from .compat import MHATokenToKVPoolHost
    from .host_pool import KVTunerMHATokenToKVPoolHost

    source, geometry = dev, {}
    if "buffer_info" in inspect.signature(MHATokenToKVPoolHost.__init__).parameters:
        source = dev.get_device_pool_infos()[0].buffer_info
        geometry = {
            "device_capacity_tokens": dev.size,
            "start_layer": dev.start_layer,
            "end_layer": dev.end_layer,
        }
    return KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        nbytes / 1e9,  # --hicache-size is in GB
        page_size,
        "page_first",
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
    )


def check_pages(tokens: int, page_size: int) -> None:
    """Refuse a prefix that is not whole pages (HiCache backs up only whole pages)."""
    if page_size < 1 or tokens % page_size:
        raise ValueError(
            f"the prefix ({tokens} tokens) must be whole pages of --page-size {page_size}: "
            "HiCache only backs up whole pages"
        )


def pool_roundtrip(
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: KVTunerHiCacheConfig,
    *,
    dtype: torch.dtype = torch.float16,
    page_size: int = 64,
    route: str = "storage",
) -> RoundTrip:
    """Prefix KV -> device pool -> quantizing host pool -> (``storage``: page bytes -> fresh
    pool) -> device pool. ``host`` loads back from the same pool, so the residual overlay
    serves the last window exactly; storage never receives the overlay."""
    if route not in ROUTES:
        raise ValueError(f"route {route!r} is not one of {list(ROUTES)}")
    layers, tokens, head_num, head_dim = k.shape
    check_pages(tokens, page_size)
    dev = _device_pool(layers, tokens, head_num, head_dim, dtype, page_size)
    rows = torch.arange(page_size, page_size + tokens)
    for layer in range(layers):
        dev.k_buffer[layer][rows] = k[layer].to(dtype)
        dev.v_buffer[layer][rows] = v[layer].to(dtype)

    stock = 2 * k[0].numel() * layers * dtype.itemsize  # fp16 bytes of the prefix
    # Room for the prefix plus the residual overlay (at most 1/8 of the budget).
    window = cfg.residual_length + page_size if cfg.residual_length else 0
    budget = 2 * stock + 9 * window * stock // tokens + page_size * stock // tokens
    host = _host_pool(dev, cfg, page_size, budget)
    host_rows = host.alloc(tokens)
    host.backup_from_device_all_layer(dev, host_rows, rows, "kernel")
    first_rows = host_rows[::page_size]
    pages = torch.stack([host.get_data_page(int(i), flat=True).clone() for i in first_rows])
    stored = pages.numel()
    if route == "storage":
        host = _host_pool(dev, cfg, page_size, budget)
        host_rows = host.alloc(tokens)
        for i, page in zip(host_rows[::page_size], pages):
            host.set_from_flat_data_page(int(i), page.clone())
    else:
        exact = 2 * page_size * k[0, 0].numel() * layers * dtype.itemsize
        ours = set((first_rows // page_size).tolist())
        stored += exact * len(ours.intersection(host.kvtuner_overlay_pages()))
    for buf in (*dev.k_buffer, *dev.v_buffer):
        buf[rows] = float("nan")  # a row the load misses poisons the scores
    # The controller's entry point: the _physical wrapper from 0.5.21, the method before.
    load = getattr(host, "load_to_device_per_layer_physical", host.load_to_device_per_layer)
    for layer in range(layers):
        load(dev, host_rows, rows, layer, "kernel")
    k_hat = torch.stack([dev.k_buffer[i][rows] for i in range(layers)]).float()
    v_hat = torch.stack([dev.v_buffer[i][rows] for i in range(layers)]).float()
    # What one GiB of host pool holds under this config (the overlay carved from it).
    per_gib = _host_pool(dev, cfg, page_size, GIB).size
    return RoundTrip(
        k=k_hat,
        v=v_hat,
        layer_bits=host.kvtuner_plan.layer_bits,
        stored_nbytes=stored,
        tokens_per_gib=int(per_gib),
        pages=pages,
        layout=host.kvtuner_layout,
    )


def quantize_roundtrip(
    x: torch.Tensor,
    cfg: KVTunerHiCacheConfig,
    *,
    bits: int,
    axis: int,
    dtype: torch.dtype,
    page_size: int,
) -> tuple[torch.Tensor, list[bytes]]:
    """One layer's K or V ``[tokens, kv_heads, head_dim]`` through ``kvtuner_quant`` page by
    page, as the pool packs it: (float32 values back, the blob of each page, the exact sink
    tokens of each page)."""
    kq = _import_quant()
    out = torch.empty(x.shape, dtype=torch.float32)
    blobs, sinks = [], []
    for start in range(0, x.shape[0], page_size):
        exact = x[start : start + page_size].to(dtype).contiguous()
        blob = kq.quantize(
            exact,
            bits=bits,
            asym=cfg.asym,
            axis=axis,
            group_size=cfg.group_size,
            residual_length=0,
        )
        page = torch.empty(blob.shape, dtype=dtype)
        kq.dequantize(blob, out=page)
        # The pool keeps the page's first sink tokens exact and loads them over the decoded ones.
        page[: cfg.sink_tokens] = exact[: cfg.sink_tokens]
        out[start : start + page_size] = page.float()
        blobs.append(bytes(blob))
        sinks.append(exact[: cfg.sink_tokens].view(torch.uint8).numpy().tobytes())
    return out, blobs, sinks


def codec_roundtrip(
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: KVTunerHiCacheConfig,
    *,
    dtype: torch.dtype = torch.float16,
    page_size: int = 64,
) -> RoundTrip:
    """The same pages through ``kvtuner_quant`` directly (one blob per layer, K/V and page),
    with the per-layer bits the pool's own plan gives: the reference for the pool path."""
    from .config import resolve_layer_plan

    layers, tokens, head_num, head_dim = k.shape
    check_pages(tokens, page_size)
    plan = resolve_layer_plan(
        cfg,
        start_layer=0,
        target_layer_num=layers,
        draft_layer_num=0,
        head_num=head_num,
        head_dim=head_dim,
        page_size=page_size,
        dtype_name=str(dtype).replace("torch.", ""),
        model_layer_num=layers,
    )
    out = [torch.empty_like(k), torch.empty_like(v)]
    blobs: list[list[tuple[bytes, bytes]]] = []
    sinks: list[list[tuple[bytes, bytes]]] = []
    stored = 0
    for layer, bits in enumerate(plan.layer_bits):
        pair, sink_pair = [], []
        for is_value, x in ((0, k), (1, v)):
            axis = cfg.axis_value if is_value else cfg.axis_key
            out[is_value][layer], layer_blobs, layer_sinks = quantize_roundtrip(
                x[layer], cfg, bits=bits[is_value], axis=axis, dtype=dtype, page_size=page_size
            )
            pair.append(layer_blobs)
            sink_pair.append(layer_sinks)
            stored += sum(len(b) for b in layer_blobs) + sum(len(b) for b in layer_sinks)
        blobs.append(list(zip(*pair)))
        sinks.append(list(zip(*sink_pair)))
    per_token = stored / tokens
    return RoundTrip(
        k=out[0],
        v=out[1],
        layer_bits=plan.layer_bits,
        stored_nbytes=stored,
        tokens_per_gib=int(GIB // per_token),
        blobs=blobs,
        sinks=sinks,
    )


def unquantized_roundtrip(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> RoundTrip:
    """The prefix KV as the device pool holds it (the reference every config is scored against)."""
    layers = k.shape[0]
    bits = 8 * dtype.itemsize
    per_token = 2 * k[0, 0].numel() * layers * dtype.itemsize
    return RoundTrip(
        k=k.to(dtype).float(),
        v=v.to(dtype).float(),
        layer_bits=((bits, bits),) * layers,
        stored_nbytes=2 * k.numel() * dtype.itemsize,
        tokens_per_gib=GIB // per_token,
    )
