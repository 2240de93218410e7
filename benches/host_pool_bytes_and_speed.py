"""Bytes per token and CPU throughput of the KVTuner quantizing HiCache host pool.

Run in the SGLang venv with kvtuner_quant installed:
    $(scripts/sglang-venv.sh 0.5.23)/bin/python benches/host_pool_bytes_and_speed.py \
        [--threads N] [--torch-threads N] [--tokens N] [--runs N]

Geometry: one TP shard of a Llama-3-8B-like model (32 layers, 8 KV heads,
head_dim 128, fp16, page 64). The device pool is SGLang's real MHATokenToKVPool
built on CPU; the host pool is the real class. Throughput is the pool's
backup_from_device_all_layer (gather + quantize into host rows, all layers) and
load_to_device_per_layer (dequantize + scatter, every layer), reported as GB/s of
fp16 KV and as a ratio to a plain fp16 copy of the same tokens done the same way
(torch gather from the device rows + a strided copy into a preallocated page-first
fp16 host buffer, and back) in the same run. Working set >= 256 MiB of fp16 KV; median
of --runs runs; every config's round trip is checked (SNR) before it is timed.
"""

from __future__ import annotations

import argparse
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


def kvtuner_style_preset(layers: int) -> dict:
    """A KVTuner-shaped preset (keys get more bits than values; the first and last
    layers, the most sensitive ones, get more bits). Synthetic, not calibrated."""
    out = {}
    for layer in range(layers):
        if layer < 2 or layer >= layers - 2:
            out[layer] = (8, 4)
        elif layer % 4 == 0:
            out[layer] = (4, 4)
        else:
            out[layer] = (4, 2)
    return out


def paired_times(fn, ref, runs):
    """Median seconds of fn and of ref, timed alternately so that load from other
    processes on the machine hits both alike."""
    fn()  # warm-up
    ref()
    t_fn, t_ref = [], []
    for _ in range(runs):
        for f, out in ((fn, t_fn), (ref, t_ref)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(t_fn), statistics.median(t_ref)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--tokens", type=int, default=2048, help="tokens per transfer (2048 = 256 MiB fp16)"
    )
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument(
        "--threads", type=int, default=1, help="kvtuner_quant threads (0 = its default)"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for the gathers/scatters of both sides; on a "
        "loaded 2-core box OpenMP spin-waits make >1 erratic",
    )
    a = ap.parse_args()

    import kvtuner_quant as kq
    from kvtuner_hicache.config import KVTunerHiCacheConfig
    from kvtuner_hicache.host_pool import KVTunerMHATokenToKVPoolHost
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if a.threads:
        kq.set_num_threads(a.threads)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    n = a.tokens // PAGE * PAGE
    dev = MHATokenToKVPool(
        size=n + PAGE,
        page_size=PAGE,
        dtype=torch.float16,
        head_num=HEADS,
        head_dim=HEAD_DIM,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=LAYERS,
    )
    g = torch.Generator().manual_seed(0)
    for b in (*dev.k_buffer, *dev.v_buffer):
        b.copy_((torch.randn(b.shape, generator=g) * 2).half())
    info = dev.get_device_pool_infos()[0].buffer_info
    didx = torch.arange(PAGE, PAGE + n)
    fp16_bytes = n * 2 * LAYERS * HEADS * HEAD_DIM * 2

    # Baseline: the same tokens as a plain fp16 copy into a page-first host buffer.
    host_k = torch.empty((n + PAGE, LAYERS, HEADS, HEAD_DIM), dtype=torch.float16)
    host_v = torch.empty_like(host_k)

    # The host rows of one transfer are a contiguous run, so the copy into the
    # page-first host buffer is a plain strided copy_ (faster than index_copy_).
    def plain_backup():
        for layer in range(LAYERS):
            host_k[:n, layer].copy_(dev.k_buffer[layer].index_select(0, didx))
            host_v[:n, layer].copy_(dev.v_buffer[layer].index_select(0, didx))

    def plain_load():
        for layer in range(LAYERS):
            dev.k_buffer[layer][didx] = host_k[:n, layer]
            dev.v_buffer[layer][didx] = host_v[:n, layer]

    stock_bpt = 2 * LAYERS * HEADS * HEAD_DIM * 2
    print(
        f"geometry: {LAYERS} layers x {HEADS} KV heads x head_dim {HEAD_DIM}, fp16, page {PAGE}; "
        f"{n} tokens = {fp16_bytes / 2**20:.0f} MiB fp16 per transfer; torch threads "
        f"{torch.get_num_threads()}, kvtuner_quant threads "
        f"{kq.get_num_threads() if hasattr(kq, 'get_num_threads') else '?'}"
    )
    print()
    print(
        f"{'config':<22}{'B/token':>9}{'vs fp16':>9}{'tok/GB':>10}{'SNR K/V dB':>14}"
        f"{'backup GB/s':>13}{'plain':>7}{'ratio':>7}{'load GB/s':>11}{'plain':>7}{'ratio':>7}"
    )
    print(f"{'fp16 stock pool':<22}{stock_bpt:>9}{1.0:>9.2f}{int(1e9 // stock_bpt):>10}{'-':>14}")

    preset = kvtuner_style_preset(LAYERS)
    configs = [
        ("K8V8 g64", dict(nbits_key=8, nbits_value=8)),
        ("K4V4 g64", dict(nbits_key=4, nbits_value=4)),
        ("K2V2 g64", dict(nbits_key=2, nbits_value=2)),
        ("KVTuner-style preset", dict(layer_bits=tuple(sorted(preset.items())))),
    ]
    for name, over in configs:
        cfg = KVTunerHiCacheConfig(
            enabled=True,
            asym=True,
            axis_key=1,
            axis_value=0,
            group_size=64,
            residual_length=0,
            **over,
        )
        host = KVTunerMHATokenToKVPoolHost(
            info,
            0.0,
            (n + 2 * PAGE) * 1.0 * stock_bpt / 1e9,
            PAGE,
            "page_first",
            pin_memory=False,
            device="cpu",
            device_capacity_tokens=dev.size,
            start_layer=0,
            end_layer=LAYERS,
            kvtuner_config=cfg,
        )
        hidx = host.alloc(n)
        ref_k = dev.k_buffer[0][didx].float().clone()
        ref_v = dev.v_buffer[LAYERS - 1][didx].float().clone()

        def backup():
            host.backup_from_device_all_layer(dev, hidx, didx, "kernel")

        def load():
            for layer in range(LAYERS):
                host.load_to_device_per_layer(dev, hidx, didx, layer, "kernel")

        backup()
        load()
        snr = []
        for ref, got in (
            (ref_k, dev.k_buffer[0][didx].float()),
            (ref_v, dev.v_buffer[LAYERS - 1][didx].float()),
        ):
            snr.append(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()).item())
        assert min(snr) > 3, f"{name}: round trip broken (SNR {snr})"
        t_b, t_pb = paired_times(backup, plain_backup, a.runs)
        t_l, t_pl = paired_times(load, plain_load, a.runs)
        bpt = host.size_per_token

        def gb(seconds):
            return fp16_bytes / seconds / 1e9

        print(
            f"{name:<22}{bpt:>9}{stock_bpt / bpt:>9.2f}{int(1e9 // bpt):>10}"
            f"{snr[0]:>7.1f}/{snr[1]:<6.1f}"
            f"{gb(t_b):>13.2f}{gb(t_pb):>7.2f}{t_pb / t_b:>7.2f}"
            f"{gb(t_l):>11.2f}{gb(t_pl):>7.2f}{t_pl / t_l:>7.2f}"
        )
        host = None  # free this config's pool before the next one is built
        # Restore the device data the loads overwrote with dequantized values.
        g = torch.Generator().manual_seed(0)
        for b in (*dev.k_buffer, *dev.v_buffer):
            b.copy_((torch.randn(b.shape, generator=g) * 2).half())
    print()
    print(
        "B/token includes every header and padding. GB/s are of fp16 KV moved; 'plain' is the plain"
    )
    print("fp16 copy of the same tokens timed alternately with the pool; ratio > 1 = pool faster.")


if __name__ == "__main__":
    main()
