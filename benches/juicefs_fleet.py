"""The JuiceFS backend as a fleet: one volume on Redis metadata, mounted twice (two servers).

Prints, in one run:
1. v1 batch set/get throughput for 1-8 MiB pages on server A's mount, as a ratio to plain file
   I/O on the same mount (benches/juicefs_backend.py's table, here on Redis metadata);
2. cross-server hit latency: a page written on A (batch_set_v1), then batch_exists + batch_get_v1
   on B (its own backend and host pool);
3. eviction: pages/s of one pass between the watermarks, and B's read throughput while A evicts,
   as a ratio to the same reads without eviction;
4. metadata: Redis bytes per page file and per cached GB, and files per GB of KV for the host
   pool configurations of the README (one TP shard of a Llama-3-8B-like model).

    PYTHONPATH=patches $(scripts/sglang-venv.sh 0.5.23)/bin/python benches/juicefs_fleet.py
    ... [--threads 8] [--rounds 3] [--total-mib 128] [--sizes 1,2,4,8] [--evict-pages 480]

Starts its own redis-server (127.0.0.1, noeviction) and volume like the tests, and removes both.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
sys.path.insert(0, str(REPO / "benches"))
if str(REPO / "patches") not in sys.path:
    sys.path.insert(0, str(REPO / "patches"))

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from juicefs_backend import MIB, keys, pool_for  # noqa: E402
from juicefs_backend import run as throughput_table  # noqa: E402
from juicefs_fixture import MOUNT_OPTIONS, juicefs_binary, storage_config  # noqa: E402
from juicefs_fleet_fixture import create_fleet  # noqa: E402
from kvtuner_hicache.juicefs import HEADER_SIZE, JuiceFSStorage  # noqa: E402

# Bytes per token of one TP shard of a Llama-3-8B-like model (32 layers, 8 KV heads,
# head_dim 128), from benches/host_pool_bytes_and_speed.py (README, host pool table).
CONFIGS = [
    ("fp16 stock pool", 131072),
    ("K8V8 g64", 69697),
    ("K4V4 g64", 36929),
    ("K2V2 g64", 20545),
]


def redis_used_memory(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += s.recv(65536)
    line = next(ln for ln in data.split(b"\r\n") if ln.startswith(b"used_memory:"))
    return int(line.split(b":")[1])


def server(mount, pool, root, **kw) -> JuiceFSStorage:
    b = JuiceFSStorage(storage_config(mount, root_dir=root, **kw), {})
    b.register_mem_pool_host(pool)
    b.wait_for_maintenance(60)
    return b


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def cross_server_latency(fleet, args) -> None:
    print()
    print(
        "| page | set on A ms | exists on B ms | get on B ms | A set -> B hit ms | B get MiB/s "
        "| Redis bytes per file |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for page_mib in (1, 4, 8):
        pool_a, pool_b = pool_for(page_mib, 4), pool_for(page_mib, 4)
        raw = pool_a.kv_buffer.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
        a = server(fleet.mnts[0], pool_a, "bench-cross", threads=args.threads)
        b = server(fleet.mnts[1], pool_b, "bench-cross", threads=args.threads)
        idx = torch.arange(0, pool_a.page_size)
        t_set, t_exists, t_get = [], [], []
        redis_before = redis_used_memory(fleet.redis.port)
        for i, k in enumerate(keys(f"cross-{page_mib}", args.samples)):
            t0 = time.perf_counter()
            assert a.batch_set_v1([k], idx) == [True]
            t1 = time.perf_counter()
            assert b.batch_exists([k]) == 1
            t2 = time.perf_counter()
            assert b.batch_get_v1([k], idx) == [True]
            t3 = time.perf_counter()
            t_set.append(t1 - t0), t_exists.append(t2 - t1), t_get.append(t3 - t2)
        total = [s + e + g for s, e, g in zip(t_set, t_exists, t_get)]
        per_file = (redis_used_memory(fleet.redis.port) - redis_before) / args.samples

        def ms(v):
            return f"{statistics.median(v) * 1e3:.1f} (p90 {pct(v, 0.9) * 1e3:.1f})"

        print(
            f"| {page_mib} MiB | {ms(t_set)} | {ms(t_exists)} | {ms(t_get)} | {ms(total)} | "
            f"{page_mib / statistics.median(t_get):.0f} | {per_file:.0f} |",
            flush=True,
        )
        a.clear()
        for s in (a, b):
            s.close()


def eviction_and_metadata(fleet, args) -> None:
    page_mib, sources = 1, 64
    pool_a, pool_b = pool_for(page_mib, sources), pool_for(page_mib, sources)
    raw = pool_a.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
    file_bytes = HEADER_SIZE + page_mib * MIB
    n = args.evict_pages
    # The fill ends at 98% of the capacity (past the high watermark, under the refusal line);
    # a low watermark of 0.5 makes the pass evict about half of it.
    cap = int(n / 0.98) * file_bytes
    quiet = dict(
        capacity_bytes=cap,
        low_watermark=0.5,
        evict_interval=3600,
        access_flush_interval=3600,
        threads=args.threads,
    )
    a = server(fleet.mnts[0], pool_a, "bench-evict", **quiet)
    b = server(fleet.mnts[1], pool_b, "bench-evict", threads=args.threads)
    ks = keys("evict", n)
    redis_before = redis_used_memory(fleet.redis.port)
    t = time.perf_counter()
    for i in range(0, n, 32):
        batch = ks[i : i + 32]
        idx = torch.cat(
            [
                torch.arange(j % sources * pool_a.page_size, (j % sources + 1) * pool_a.page_size)
                for j in range(i, i + len(batch))
            ]
        )
        assert all(a.batch_set_v1(batch, idx)), "fill refused (capacity too small?)"
    fill_s = time.perf_counter() - t
    time.sleep(1.0)
    per_file = (redis_used_memory(fleet.redis.port) - redis_before) / n
    hot = ks[-32:]  # written last: never evicted
    hot_idx = torch.arange(0, 32 * pool_b.page_size)

    def read_rate(seconds, stop=None):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds and not (stop and stop.is_set()):
            assert b.batch_get_v1(hot, hot_idx) == [True] * 32
            done += 32
        return done * page_mib / (time.perf_counter() - t0)

    read_rate(0.5)  # warm B's client cache as much as the eviction run will have it
    baseline = read_rate(3.0)
    stop, during = threading.Event(), []
    reader = threading.Thread(target=lambda: during.append(read_rate(600, stop)))
    reader.start()
    t = time.perf_counter()
    result = a.maintain()
    pass_s = time.perf_counter() - t
    stop.set()
    reader.join()
    listing = a.maintain()  # below the high watermark now: a listing-only pass
    print()
    print(
        f"Eviction: {n} pages of {page_mib} MiB written in {fill_s:.1f} s from A "
        f"({n * page_mib / fill_s:.0f} MiB/s); capacity {cap / MIB:.0f} MiB, watermarks 0.95 / 0.5"
    )
    print()
    print("| pass | pages | evicted | seconds | evicted pages/s |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| evicting | {result.pages} | {result.evicted_pages} | {pass_s:.2f} | "
        f"{result.evicted_pages / pass_s:.0f} |"
    )
    print(
        f"| listing only | {listing.pages} | {listing.evicted_pages} | {listing.seconds:.2f} | - |"
    )
    print()
    print(
        f"B reading 32 hot pages in a loop: {baseline:.0f} MiB/s alone, {during[0]:.0f} MiB/s "
        f"while A evicts ({during[0] / baseline:.2f}x)"
    )
    print()
    print(
        f"Redis metadata: {per_file:.0f} bytes per page file ({page_mib} MiB pages), "
        f"{per_file * 1e9 / file_bytes / 1e6:.2f} MB per cached GB"
    )
    print()
    print("| config (page 64 tokens) | page MiB | files per GB | Redis MB per cached GB |")
    print("| --- | --- | --- | --- |")
    for name, per_token in CONFIGS:
        page = 64 * per_token + HEADER_SIZE
        files = 1e9 / page
        print(f"| {name} | {page / MIB:.2f} | {files:.0f} | {files * per_file / 1e6:.2f} |")
    a.clear()
    for s in (a, b):
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--total-mib", type=int, default=128, help="bytes per throughput measurement")
    ap.add_argument("--sizes", default="1,2,4,8", help="page sizes in MiB")
    ap.add_argument("--samples", type=int, default=20, help="cross-server round trips per size")
    ap.add_argument("--evict-pages", type=int, default=480, help="1 MiB pages in the eviction fill")
    ap.add_argument(
        "--only",
        choices=["throughput", "cross", "evict"],
        action="append",
        help="run only these parts (repeatable)",
    )
    args = ap.parse_args()
    parts = set(args.only or ["throughput", "cross", "evict"])
    try:
        fleet = create_fleet("kvbenchfleet", 2)
    except BaseException as e:  # pytest.skip raises a BaseException subclass
        print(f"SKIP: no JuiceFS fleet: {e}")
        return 0
    try:
        version = subprocess.run(
            [juicefs_binary(), "version"], capture_output=True, text=True
        ).stdout.strip()
        redis = (
            subprocess.run([fleet.redis.binary, "--version"], capture_output=True, text=True)
            .stdout.split()[2]
            .removeprefix("v=")
        )
        print(
            f"# {version}; redis-server {redis}; {os.cpu_count()} CPUs; "
            f"backend threads={args.threads}"
        )
        print(
            f"# two mounts of one volume: {' '.join(MOUNT_OPTIONS)} (Redis metadata on "
            "127.0.0.1, local-dir object storage, --trash-days 0)"
        )
        if "throughput" in parts:
            work = os.path.join(fleet.mnts[0], "bench-throughput")
            os.makedirs(work)
            throughput_table(work, args)
        if "cross" in parts:
            cross_server_latency(fleet, args)
        if "evict" in parts:
            eviction_and_metadata(fleet, args)
    finally:
        fleet.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
