"""HiCache L2 transfers on a GPU: SGLang's stock host pool against the quantizing
pool with the device codec and with the host codec.

Needs a CUDA (or ROCm) GPU, torch, Triton, the sglang wheel (``pip install --no-deps``
is enough) and the kvtuner_quant wheel; finishes in a few minutes:

    python benches/device_codec_gpu.py [--tokens 2048,8192,32768] [--runs 5]

Geometry: one TP shard of a Llama-3-8B-like model (32 layers, 8 KV heads, head_dim
128, fp16, page 64), SGLang's real ``MHATokenToKVPool`` on the GPU and real host
pools with pinned rows. For every pool and token count:

* backup: ``backup_from_device_all_layer`` of the tokens, called on a transfer
  stream as the release's transfer engine does; device time between CUDA events
  around the call, and host wall time inside the call (what the scheduler thread
  loses);
* load: ``load_to_device_per_layer`` for every layer; device time per layer and
  host wall time per call;
* bytes over PCIe per transfer (fp16 rows for the stock pool and the host codec,
  quantized rows for the device codec).

Pools: stock ``MHATokenToKVPoolHost`` with I/O backend ``direct``
(``page_first_direct``) and ``kernel`` (``page_first``, only if ``sgl_kernel``
imports); the quantizing pool with ``--kvtuner-hicache-codec device`` and ``host``
for K8V8, K4V4, K2V2 (group 64, K per-channel, V per-token) and a KVTuner-style
per-layer preset. Before timing, the device codec's rows are checked byte for byte
against the host codec's for the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "patches"))

LAYERS, HEADS, HEAD_DIM, PAGE = 32, 8, 128, 64
STOCK_BYTES_PER_TOKEN = 2 * LAYERS * HEADS * HEAD_DIM * 2
CHECK_PAGES = 8  # pages of the bit-exactness check before timing


def kvtuner_style_preset(layers: int) -> dict:
    """Keys get more bits than values, the first and last layers more than the
    middle ones (the shape of KVTuner's calibrated presets; synthetic)."""
    out = {}
    for layer in range(layers):
        if layer < 2 or layer >= layers - 2:
            out[layer] = (8, 4)
        elif layer % 4 == 0:
            out[layer] = (4, 4)
        else:
            out[layer] = (4, 2)
    return out


def on_stream(stream):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def timed(fn, stream, runs):
    """(median device ms, median host ms inside fn) of fn enqueued on ``stream``
    (no stream: the CPU dry run, where both are the wall time)."""
    device_ms, host_ms = [], []
    for _ in range(runs + 1):  # the first run compiles and warms up
        if stream is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
        with on_stream(stream):
            if stream is not None:
                start.record()
            t0 = time.perf_counter()
            fn()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            if stream is not None:
                end.record()
        if stream is not None:
            end.synchronize()
        device_ms.append(start.elapsed_time(end) if stream is not None else host_ms[-1])
    return statistics.median(device_ms[1:]), statistics.median(host_ms[1:])


def build_host_pool(cls, info, dev, host_tokens, bytes_per_token, layout, **kw):
    return cls(
        info,
        0.0,
        host_tokens * bytes_per_token / 1e9 * 1.05,
        PAGE,
        layout,
        pin_memory=dev.device != "cpu",
        device="cpu",
        device_capacity_tokens=dev.size,
        start_layer=0,
        end_layer=LAYERS,
        **kw,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2048,8192,32768")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="check the script's code paths without a GPU: 2 layers, 128 tokens, "
        "Triton's interpreter, our pools only; the figures mean nothing",
    )
    a = ap.parse_args()
    global LAYERS, STOCK_BYTES_PER_TOKEN, CHECK_PAGES
    if a.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
        LAYERS, CHECK_PAGES, a.tokens, a.runs = 2, 1, "64", 1
        STOCK_BYTES_PER_TOKEN = 2 * LAYERS * HEADS * HEAD_DIM * 2
    token_counts = [int(t) // PAGE * PAGE for t in a.tokens.split(",")]
    device = "cpu" if a.cpu_dry_run else "cuda"

    import triton

    import kvtuner_quant
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    try:  # 0.5.16+
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    except ImportError:
        from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost
    from kvtuner_hicache.config import KVTunerHiCacheConfig
    from kvtuner_hicache.host_pool import KVTunerMHATokenToKVPoolHost

    if not a.cpu_dry_run and not torch.cuda.is_available():
        sys.exit(
            "device_codec_gpu.py needs CUDA (or ROCm): no GPU is visible to torch "
            f"(torch {torch.__version__}, Triton {triton.__version__}, kvtuner_quant "
            f"{kvtuner_quant.__version__} imported fine)"
        )
    try:
        import sgl_kernel  # noqa: F401

        stock_backends = [("direct", "page_first_direct"), ("kernel", "page_first")]
    except ImportError:
        stock_backends = [("direct", "page_first_direct")]
    if a.cpu_dry_run:
        stock_backends = []  # their copy kernels need CUDA

    max_tokens = max(token_counts)
    dev = MHATokenToKVPool(
        size=max(max_tokens, CHECK_PAGES * PAGE) + 4 * PAGE,
        page_size=PAGE,
        dtype=torch.float16,
        head_num=HEADS,
        head_dim=HEAD_DIM,
        layer_num=LAYERS,
        device=device,
        enable_memory_saver=False,
        start_layer=0,
        end_layer=LAYERS,
    )
    g = torch.Generator(device=device).manual_seed(0)
    for b in (*dev.k_buffer, *dev.v_buffer):
        b.copy_(torch.randn(b.shape, generator=g, device=device).half() * 2)
    info = dev.get_device_pool_infos()[0].buffer_info
    stream = None if a.cpu_dry_run else torch.cuda.Stream()
    gpu = "none (CPU dry run)" if a.cpu_dry_run else torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}, Triton {triton.__version__}")
    print(f"geometry: {LAYERS} layers x {HEADS} KV heads x head_dim {HEAD_DIM}, fp16, page {PAGE}")

    configs = [
        ("K8V8 g64", dict(nbits_key=8, nbits_value=8)),
        ("K4V4 g64", dict(nbits_key=4, nbits_value=4)),
        ("K2V2 g64", dict(nbits_key=2, nbits_value=2)),
        ("preset", dict(layer_bits=tuple(sorted(kvtuner_style_preset(LAYERS).items())))),
    ]

    def ours(over, codec, tokens):
        cfg = KVTunerHiCacheConfig(
            enabled=True,
            asym=True,
            axis_key=1,
            axis_value=0,
            group_size=64,
            residual_length=0,
            codec=codec,
            **over,
        )
        return build_host_pool(
            KVTunerMHATokenToKVPoolHost,
            info,
            dev,
            tokens,
            STOCK_BYTES_PER_TOKEN,
            "page_first",
            kvtuner_config=cfg,
        )

    for name, over in configs:
        check_bit_exact(
            name,
            ours(over, "device", CHECK_PAGES * PAGE),
            ours(over, "host", CHECK_PAGES * PAGE),
            dev,
            stream,
        )

    # One pool at a time: each holds the largest transfer in pinned memory.
    makers = [
        (
            f"stock {io}",
            io,
            lambda io=io, layout=layout: build_host_pool(
                MHATokenToKVPoolHost, info, dev, max_tokens, STOCK_BYTES_PER_TOKEN, layout
            ),
        )
        for io, layout in stock_backends
    ]
    makers += [
        (f"{name} {codec}", "kernel", lambda over=over, codec=codec: ours(over, codec, max_tokens))
        for name, over in configs
        for codec in ("device", "host")
    ]
    print()
    print(
        f"{'pool':<18}{'tokens':>7}{'PCIe MB':>9}{'backup ms':>11}{'host ms':>9}"
        f"{'load/layer ms':>15}{'host ms/call':>14}{'backup x':>10}{'load x':>8}"
    )
    base = {}
    for label, io, make in makers:
        pool = make()
        for n in token_counts:
            device_pages = torch.randperm(dev.size // PAGE - 1, device=device)[: n // PAGE] + 1
            didx = (device_pages[:, None] * PAGE + torch.arange(PAGE, device=device)).reshape(-1)
            pool.clear()
            hidx = pool.alloc(n)
            if io == "kernel" and (label.startswith("stock") or label.endswith("device")):
                hidx = hidx.to(device)
            d_idx = didx if io == "kernel" else didx.cpu()
            b_ms, b_host = timed(
                lambda: pool.backup_from_device_all_layer(dev, hidx, d_idx, io), stream, a.runs
            )
            l_ms, l_host = timed(
                lambda: [
                    pool.load_to_device_per_layer(dev, hidx, d_idx, layer, io)
                    for layer in range(LAYERS)
                ],
                stream,
                a.runs,
            )
            base.setdefault(n, (b_ms, l_ms))
            moved_mb = pcie_bytes(label, pool, n) / 1e6
            print(
                f"{label:<18}{n:>7}{moved_mb:>9.1f}{b_ms:>11.2f}{b_host:>9.2f}"
                f"{l_ms / LAYERS:>15.3f}{l_host / LAYERS:>14.3f}"
                f"{base[n][0] / b_ms:>10.2f}{base[n][1] / l_ms:>8.2f}",
                flush=True,
            )
        pool = None  # release its pinned rows before the next pool
        if stream is not None:
            torch.cuda.empty_cache()
    print()
    print("backup x / load x: speed relative to the stock direct pool (> 1 = faster). host ms =")
    print(
        "wall time inside the calls (the scheduler thread), device ms = CUDA events on the stream."
    )
    print(
        "PCIe MB: bytes one backup moves (a load of every layer moves the same, less page headers)."
    )


def pcie_bytes(label: str, pool, n: int) -> int:
    """Bytes one backup moves over PCIe."""
    if label.startswith("stock") or label.endswith("host"):
        return n * STOCK_BYTES_PER_TOKEN
    return n // PAGE * pool.kvtuner_layout.row_nbytes


def check_bit_exact(name, device_pool, host_pool, dev, stream) -> None:
    """The device codec's blobs == the host codec's for the same tokens."""
    didx = torch.arange(PAGE, (CHECK_PAGES + 1) * PAGE, device=dev.device)
    blobs = []
    for pool in (device_pool, host_pool):
        hidx = pool.alloc(len(didx))
        with on_stream(stream):
            pool.backup_from_device_all_layer(
                dev, hidx.to(dev.device) if pool is device_pool else hidx, didx, "kernel"
            )
        if stream is not None:
            stream.synchronize()
        pages = hidx[::PAGE] // PAGE
        # Only the blobs: the page header's stamp differs by design, padding is never written.
        lay = pool.kvtuner_layout
        blobs.append(
            torch.cat(
                [
                    pool.kv_buffer[pages, off : off + size]
                    for offs, sizes in (
                        (lay.k_offsets, lay.k_nbytes),
                        (lay.v_offsets, lay.v_nbytes),
                    )
                    for off, size in zip(offs, sizes)
                ],
                dim=1,
            )
        )
    same = torch.equal(blobs[0], blobs[1])
    print(f"bit-exact device vs host codec, {name}: {'yes' if same else 'NO'}", flush=True)
    if not same:
        sys.exit("device codec bytes differ from the host codec: not timing a wrong result")


if __name__ == "__main__":
    main()
