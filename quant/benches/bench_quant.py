#!/usr/bin/env python3
"""Throughput of kvtuner_quant on fp16 KV pages, as ratios measured in the same run.

For each thread count and bit width (asymmetric, per-token, group 64 by default) it times, interleaved
run by run so that background load hits every contender alike:

* memcpy    - numpy.copyto of the same fp16 bytes into a preallocated array (two threads: two halves
              copied concurrently, numpy releases the GIL)
* rust      - kvtuner_quant.quantize_pages / dequantize_pages over the whole working set, pages of
              --page-tokens tokens, into preallocated buffers
* torch     - the same formula written with torch ops (torch.set_num_threads = thread count), timed on
              a --torch-mib slice (in 16 MiB pieces so its temporaries stay bounded) and scaled: it runs
              at well under 1 GB/s, so ten runs over the full set would take minutes
* numpy     - the same formula in plain numpy (the oracle's math), single-threaded, timed on a
              --numpy-mib slice and scaled to GB/s (it is ~100x slower; the full set would take minutes)

GB/s counts fp16 input bytes (quantize) or fp16 output bytes (dequantize). Every implementation is checked
against tests/oracle.py on the first pages before anything is timed. Reported: medians of --runs runs;
ratios are medians of the per-run ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import kvtuner_quant as kq  # noqa: E402
import oracle  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

F32 = np.float32


# ---------------------------------------------------------------- numpy implementation (oracle math)
def np_quantize(x16: np.ndarray, bits: int, G: int):
    """Per-token asymmetric groups of G along the last axis -> (packed codes, scales f16, mins f16)."""
    levels = F32(2**bits - 1)
    xf = x16.astype(F32).reshape(-1, G)
    with np.errstate(all="ignore"):
        fin = np.isfinite(xf).all(1)
        mn, mx = xf.min(1), xf.max(1)
        s32 = (mx - mn) / levels + F32(0)
        s = s32.astype(np.float16)
        low = s.astype(F32) < s32
        s[low] = np.nextafter(s[low], np.float16(np.inf))
        m = (mn + F32(0)).astype(np.float16)
        s[~fin] = np.float16(np.nan)
        m[~fin] = np.float16(np.nan)
        sf, mf = s.astype(F32)[:, None], m.astype(F32)[:, None]
        t = (xf - mf) / sf
        t[np.isnan(t)] = 0
        q = np.clip(np.rint(t), 0, levels)
        q[(sf == 0)[:, 0]] = 0
    q = q.astype(np.uint8).reshape(-1)
    per = 8 // bits
    q = q.reshape(-1, per)
    packed = q[:, 0].copy()
    for j in range(1, per):
        packed |= q[:, j] << np.uint8(j * bits)
    return packed, s, m


def np_dequantize(packed: np.ndarray, s: np.ndarray, m: np.ndarray, bits: int, G: int, shape):
    per = 8 // bits
    mask = np.uint8(2**bits - 1)
    q = np.empty((packed.size, per), np.uint8)
    for j in range(per):
        q[:, j] = (packed >> np.uint8(j * bits)) & mask
    qf = q.reshape(-1, G).astype(F32)
    return (qf * s.astype(F32)[:, None] + m.astype(F32)[:, None]).astype(np.float16).reshape(shape)


# ---------------------------------------------------------------- torch implementation
def torch_quantize(x16, bits: int, G: int):
    levels = float(2**bits - 1)
    xf = x16.float().reshape(-1, G)
    fin = torch.isfinite(xf).all(1)
    mn, mx = torch.aminmax(xf, dim=1)
    s32 = (mx - mn) / levels + 0.0
    s = s32.half()
    low = s.float() < s32
    s = torch.where(low, (s.view(torch.int16) + 1).view(torch.float16), s)  # next value up (s >= 0)
    m = (mn + 0.0).half()
    nan = torch.tensor(float("nan"), dtype=torch.float16)
    s = torch.where(fin, s, nan)
    m = torch.where(fin, m, nan)
    sf, mf = s.float()[:, None], m.float()[:, None]
    t = (xf - mf) / sf
    t = torch.where(torch.isnan(t), 0.0, t)
    q = torch.round(t).clamp_(0, levels)
    q = torch.where(sf == 0, 0.0, q).to(torch.uint8).reshape(-1, 8 // bits)
    packed = q[:, 0].clone()
    for j in range(1, 8 // bits):
        packed |= q[:, j] << (j * bits)
    return packed, s, m


def torch_dequantize(packed, s, m, bits: int, G: int, out):
    per = 8 // bits
    q = torch.stack([(packed >> (j * bits)) & (2**bits - 1) for j in range(per)], dim=1)
    y = q.reshape(-1, G).float() * s.float()[:, None] + m.float()[:, None]
    out.copy_(y.reshape(out.shape))


# ---------------------------------------------------------------- helpers
CLOCK = time.perf_counter


def timed(f) -> float:
    t = CLOCK()
    f()
    return CLOCK() - t


def med(v):
    return statistics.median(v)


def check_against_oracle(x16, bits, G, P, dst, ids, out):
    """The Rust pages, the numpy and the torch implementations vs tests/oracle.py on 4 pages."""
    cfg = dict(bits=bits, asym=True, axis=0, group_size=G)
    n = 4
    xs = x16[: n * P]
    for i in range(n):
        ref = oracle.quantize_ref(xs[i * P : (i + 1) * P], "float16", **cfg)
        blob = dst[ids[i], : kq.packed_nbytes(P, *x16.shape[1:], dtype="float16", **cfg)].tobytes()
        codes, sb, mb = kq.QuantizedTensor.from_bytes(blob)._unpack()
        assert np.array_equal(np.frombuffer(codes, np.int32), ref.codes), (
            "rust codes differ from the oracle"
        )
        assert np.array_equal(np.frombuffer(sb, np.uint32), ref.scale_bits), "rust scales differ"
        assert np.array_equal(np.frombuffer(mb, np.uint32), ref.min_bits), "rust mins differ"
        assert oracle.ulp_diff(out[i * P : (i + 1) * P], ref.xhat, "float16").max() <= 1, (
            "rust x_hat"
        )
        packed, s, m = np_quantize(xs[i * P : (i + 1) * P], bits, G)
        assert np.array_equal(s.view(np.uint16).astype(np.uint32), ref.scale_bits), "numpy scales"
        assert np.array_equal(m.view(np.uint16).astype(np.uint32), ref.min_bits), "numpy mins"
        y = np_dequantize(packed, s, m, bits, G, (P,) + x16.shape[1:])
        assert oracle.ulp_diff(y, ref.xhat, "float16").max() <= 1, "numpy x_hat"
        if torch is not None:
            tp, ts, tm = torch_quantize(torch.from_numpy(xs[i * P : (i + 1) * P]), bits, G)
            assert np.array_equal(tp.numpy(), packed), "torch codes differ from numpy/oracle"
            assert np.array_equal(ts.numpy().view(np.uint16).astype(np.uint32), ref.scale_bits), (
                "torch scales"
            )
            ty = torch.empty((P,) + x16.shape[1:], dtype=torch.float16)
            torch_dequantize(tp, ts, tm, bits, G, ty)
            assert oracle.ulp_diff(ty.numpy(), ref.xhat, "float16").max() <= 1, "torch x_hat"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=256, help="fp16 working set (input) in MiB")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--page-tokens", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument(
        "--numpy-mib", type=int, default=8, help="slice the numpy implementation is timed on"
    )
    ap.add_argument("--torch-slice-mib", type=int, default=16)
    ap.add_argument(
        "--torch-mib", type=int, default=32, help="slice the torch implementation is timed on"
    )
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--per-channel", action="store_true", help="also time K layout: axis 1, group 32"
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="one-thread runs: time with time.thread_time (CPU seconds of the calling thread, which "
        "runs every contender's work at one thread) instead of wall-clock; for shared machines",
    )
    args = ap.parse_args()
    global torch
    if args.no_torch:
        torch = None

    P, H, D, G = args.page_tokens, args.heads, args.head_dim, args.group_size
    tokens = args.mib * (1 << 20) // (2 * H * D) // P * P
    n = tokens // P
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((tokens, H, D), dtype=np.float32).astype(np.float16)
    x16[..., 3] *= 8  # an outlier channel
    copy_dst = np.empty_like(x16)
    out = np.empty_like(x16)
    ids = np.arange(n, dtype=np.int64)
    rng.shuffle(ids)  # pages land scattered in the pool, as they do in a host cache
    nbytes = x16.nbytes
    ns = max(P, args.numpy_mib * (1 << 20) // (2 * H * D) // P * P)
    xs = x16[:ns]
    tsl = max(1, args.torch_slice_mib * (1 << 20) // (2 * H * D))
    ttok = min(tokens, max(tsl, args.torch_mib * (1 << 20) // (2 * H * D)))

    print(
        f"kvtuner_quant bench: {nbytes / 2**20:.0f} MiB fp16 [{tokens}, {H}, {D}] in {n} pages of {P} tokens, "
        f"asym per-token group {G}; {args.runs} runs, medians; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, kernels={['portable', 'avx2', 'avx512'][kq._native._simd_level()]}"
    )
    print(
        f"numpy implementation timed on a {xs.nbytes / 2**20:.0f} MiB slice, scaled; torch "
        f"{'(not installed)' if torch is None else torch.__version__} timed on a {ttok * H * D * 2 / 2**20:.0f} MiB slice "
        f"(in {tsl * H * D * 2 / 2**20:.0f} MiB pieces), scaled"
    )

    configs = [
        dict(bits=b, asym=True, axis=0, group_size=G) for b in map(int, args.bits.split(","))
    ]
    if args.per_channel:
        configs.append(dict(bits=4, asym=True, axis=1, group_size=32))
    rows = []
    global CLOCK
    for nt in map(int, args.threads.split(",")):
        CLOCK = time.thread_time if (args.cpu_time and nt == 1) else time.perf_counter
        kq.set_num_threads(nt)
        if torch is not None:
            torch.set_num_threads(nt)
        pool = concurrent.futures.ThreadPoolExecutor(nt)
        half = tokens // nt

        def memcpy():
            if nt == 1:
                np.copyto(copy_dst, x16)
            else:
                list(
                    pool.map(
                        lambda i: np.copyto(
                            copy_dst[i * half : (i + 1) * half], x16[i * half : (i + 1) * half]
                        ),
                        range(nt),
                    )
                )

        for cfg in configs:
            bits = cfg["bits"]
            blob = kq.packed_nbytes(P, H, D, dtype="float16", **cfg)
            dst = np.empty((n, blob), np.uint8)

            def rq():
                kq.quantize_pages(x16, dst, ids, page_tokens=P, **cfg)

            def rdq():
                kq.dequantize_pages(dst, ids, out, **cfg)

            rq()
            rdq()
            if cfg["axis"] == 0:
                check_against_oracle(x16, bits, G, P, dst, ids, out)
                npk = np_quantize(xs, bits, G)
                tq_state = {}

                def tq():
                    for a in range(0, ttok, tsl):
                        tq_state[a] = torch_quantize(tx[a : min(a + tsl, ttok)], bits, G)

                def tdq():
                    for a in range(0, ttok, tsl):
                        p_, s_, m_ = tq_state[a]
                        torch_dequantize(p_, s_, m_, bits, G, tout[a : min(a + tsl, ttok)])

                if torch is not None:
                    tx = torch.from_numpy(x16)
                    tout = torch.empty_like(tx)
                    tq()
            t = {k: [] for k in ("mem", "q", "dq", "npq", "npdq", "tq", "tdq")}
            for _ in range(args.runs):
                t["mem"].append(timed(memcpy))
                t["q"].append(timed(rq))
                t["dq"].append(timed(rdq))
                if cfg["axis"] == 0:
                    if nt == 1:  # numpy is single-threaded: time it once, with the one-thread runs
                        t["npq"].append(
                            timed(lambda: np_quantize(xs, bits, G)) * nbytes / xs.nbytes
                        )
                        t["npdq"].append(
                            timed(lambda: np_dequantize(*npk, bits, G, xs.shape))
                            * nbytes
                            / xs.nbytes
                        )
                    if torch is not None:
                        t["tq"].append(timed(tq) * tokens / ttok)
                        t["tdq"].append(timed(tdq) * tokens / ttok)
            gbs = lambda k: nbytes / med(t[k]) / 1e9  # noqa: E731
            ratio = lambda a, b: med([x / y for x, y in zip(t[a], t[b])])  # time(b)/time(a) per run  # noqa: E731
            row = dict(
                threads=nt,
                cfg=cfg,
                mem=gbs("mem"),
                q=gbs("q"),
                dq=gbs("dq"),
                q_mem=ratio("mem", "q"),
                dq_mem=ratio("mem", "dq"),
            )
            if t["npq"]:
                row.update(q_np=med(t["npq"]) / med(t["q"]), dq_np=med(t["npdq"]) / med(t["dq"]))
            if t["tq"]:
                row.update(
                    q_torch=ratio("tq", "q"),
                    dq_torch=ratio("tdq", "dq"),
                    tq=gbs("tq"),
                    tdq=gbs("tdq"),
                )
            rows.append(row)
            lay = (
                "per-token g%d" % cfg["group_size"]
                if cfg["axis"] == 0
                else "per-channel g%d" % cfg["group_size"]
            )
            clock = "cpu-time" if CLOCK is time.thread_time else "wall"
            line = (
                f"threads={nt} ({clock}) bits={bits} {lay}: memcpy {row['mem']:6.2f} GB/s | quantize {row['q']:6.2f} GB/s "
                f"= {row['q_mem']:.2f}x memcpy | dequantize {row['dq']:6.2f} GB/s = {row['dq_mem']:.2f}x memcpy"
            )
            if "q_torch" in row:
                line += (
                    f" | vs torch ({row['tq']:.2f} / {row['tdq']:.2f} GB/s): q {row['q_torch']:.1f}x, "
                    f"dq {row['dq_torch']:.1f}x"
                )
            if "q_np" in row:
                line += f" | vs numpy: q {row['q_np']:.0f}x, dq {row['dq_np']:.0f}x"
            print(line, flush=True)
        pool.shutdown()

    # thread scaling of the headline (4-bit if timed)
    by = {(r["threads"], r["cfg"]["bits"], r["cfg"]["axis"]): r for r in rows}
    for bits in map(int, args.bits.split(",")):
        if (1, bits, 0) in by and (2, bits, 0) in by:
            a, b = by[(1, bits, 0)], by[(2, bits, 0)]
            print(
                f"scaling {bits}-bit, 2 threads / 1 thread: quantize {b['q'] / a['q']:.2f}x, "
                f"dequantize {b['dq'] / a['dq']:.2f}x, memcpy {b['mem'] / a['mem']:.2f}x"
            )


if __name__ == "__main__":
    main()
