"""JuiceFS HiCache backend throughput, as a ratio to plain file I/O on the same mount.

For 1, 2, 4 and 8 MiB pages: ``batch_set_v1`` / ``batch_get_v1`` of 128 MiB per round through
SGLang's stock CPU host pool, against plain sequential writes and reads of the same bytes (one
file per page, no header, no temp file, no checksum) on the same mount, in the same run.
Reads start with the kernel page cache dropped for both sides (posix_fadvise DONTNEED), so
they are served by the JuiceFS client. Then ``batch_exists`` over 128 keys, cold (fresh backend,
kernel entry cache expired) and warm.

    PYTHONPATH=patches $(scripts/sglang-venv.sh 0.5.23)/bin/python benches/juicefs_backend.py
    ... [--mount /mnt/jfs] [--threads 8] [--rounds 3] [--total-mib 128]

Without --mount it formats and mounts a throwaway volume (sqlite3 metadata, local-dir object
storage, trash off) like the tests do, and removes it afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
if str(REPO / "patches") not in sys.path:
    sys.path.insert(0, str(REPO / "patches"))

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from juicefs_fixture import (  # noqa: E402
    MOUNT_OPTIONS,
    create_volume,
    juicefs_binary,
    make_mha_host_pool,
    storage_config,
)
from kvtuner_hicache.juicefs import JuiceFSStorage  # noqa: E402

MIB = 1 << 20


def keys(prefix: str, n: int):
    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]


def pool_for(page_mib: int, pages: int):
    # bf16, 8 heads x 128 dims, 16 tokens per page: 64 KiB per layer per page (K+V).
    return make_mha_host_pool(
        "page_first", layers=16 * page_mib, heads=8, head_dim=128, page_size=16, tokens=16 * pages
    )


def plain_write(directory: str, names, pool, pages) -> float:
    os.makedirs(directory, exist_ok=True)
    t = time.perf_counter()
    for name, p in zip(names, pages):
        data = pool.get_data_page(p * pool.page_size, flat=False)
        with open(os.path.join(directory, name), "wb", buffering=0) as f:
            for half in (data[0], data[1]):  # K then V: already contiguous, no copy
                f.write(memoryview(half.contiguous().view(torch.uint8).numpy()))
    return time.perf_counter() - t


def drop_page_cache(paths) -> None:
    """Evict these files from the kernel page cache, so reads reach the JuiceFS client
    (its local block cache stays warm for both sides alike)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(directory: str, names, page_bytes: int) -> float:
    buf = bytearray(page_bytes)
    view = memoryview(buf)
    t = time.perf_counter()
    for name in names:
        with open(os.path.join(directory, name), "rb", buffering=0) as f:
            got = 0
            while got < page_bytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        assert got == page_bytes
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mount", help="use this mounted JuiceFS volume instead of a throwaway one")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--total-mib", type=int, default=128, help="bytes per measurement")
    ap.add_argument("--sizes", default="1,2,4,8", help="page sizes in MiB")
    args = ap.parse_args()

    vol = None
    if args.mount:
        mount = args.mount
        options = "(mounted outside this benchmark)"
    else:
        try:
            vol = create_volume("kvbench")
        except BaseException as e:  # pytest.skip raises a BaseException subclass
            print(f"SKIP: no JuiceFS volume: {e}")
            return 0
        mount = vol.mnt
        options = (
            " ".join(["--cache-dir", str(vol.base / "cache"), *MOUNT_OPTIONS])
            + " (sqlite3 metadata, local-dir object storage, --trash-days 0)"
        )
    try:
        with open("/proc/mounts") as f:
            line = next((m.strip() for m in f if m.split()[1] == os.path.realpath(mount)), "?")
        version = subprocess.run(
            [juicefs_binary(), "version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"# {version}; {os.cpu_count()} CPUs; backend threads={args.threads}")
        print(f"# juicefs mount options: {options}")
        print(f"# /proc/mounts: {line}")
        work = tempfile.mkdtemp(prefix="bench-", dir=mount)
        run(work, args)
    finally:
        if vol is not None:
            vol.destroy()
    return 0


def run(work: str, args) -> None:
    print()
    print(
        "| page | v1 set MiB/s | plain write MiB/s | set ratio "
        "| v1 get MiB/s | plain read MiB/s | get ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for page_mib in [int(s) for s in args.sizes.split(",")]:
        n = max(1, args.total_mib // page_mib)
        pool = pool_for(page_mib, n)
        raw = pool.kv_buffer.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
        cfg = storage_config(work, threads=args.threads, root_dir=f"ns-{page_mib}")
        backend = JuiceFSStorage(cfg, {})
        backend.register_mem_pool_host(pool)
        page_bytes = backend.page_bytes
        assert page_bytes == page_mib * MIB, page_bytes
        total = n * page_bytes / MIB
        src = list(range(n))
        idx = torch.arange(0, n * pool.page_size)
        res = {k: [] for k in ("set", "write", "get", "read")}
        for r in range(args.rounds):
            ks = keys(f"{page_mib}-{r}", n)
            plain_dir = os.path.join(work, f"plain-{page_mib}-{r}")
            # Alternate the order so neither side always runs on a warmer client.
            if r % 2 == 0:
                res["write"].append(plain_write(plain_dir, ks, pool, src))
                t = time.perf_counter()
                ok = backend.batch_set_v1(ks, idx)
                res["set"].append(time.perf_counter() - t)
            else:
                t = time.perf_counter()
                ok = backend.batch_set_v1(ks, idx)
                res["set"].append(time.perf_counter() - t)
                res["write"].append(plain_write(plain_dir, ks, pool, src))
            assert all(ok), "batch_set_v1 failed"
            time.sleep(2.0)  # let the client finish uploading before anyone reads
            drop_page_cache(
                [os.path.join(plain_dir, k) for k in ks] + [backend._path(k) for k in ks]
            )
            reader = JuiceFSStorage(cfg, {})  # no in-process state
            reader.register_mem_pool_host(pool)
            if r % 2 == 0:
                res["read"].append(plain_read(plain_dir, ks, page_bytes))
                t = time.perf_counter()
                ok = reader.batch_get_v1(ks, idx)
                res["get"].append(time.perf_counter() - t)
            else:
                t = time.perf_counter()
                ok = reader.batch_get_v1(ks, idx)
                res["get"].append(time.perf_counter() - t)
                res["read"].append(plain_read(plain_dir, ks, page_bytes))
            assert all(ok), "batch_get_v1 failed"
            reader.close()
            shutil.rmtree(plain_dir, ignore_errors=True)
        rate = {k: total / statistics.median(v) for k, v in res.items()}
        print(
            f"| {page_mib} MiB x {n} | {rate['set']:.0f} | {rate['write']:.0f} | "
            f"{rate['set'] / rate['write']:.2f} | {rate['get']:.0f} | {rate['read']:.0f} | "
            f"{rate['get'] / rate['read']:.2f} |",
            flush=True,
        )
        backend.clear()
        backend.close()
        del pool, raw

    # batch_exists over 128 keys of small pages (the controller's query batch).
    pool = make_mha_host_pool("page_first", tokens=16 * 128)
    cfg = storage_config(work, threads=args.threads, root_dir="ns-exists")
    writer = JuiceFSStorage(cfg, {})
    writer.register_mem_pool_host(pool)
    ks = keys("exists", 128)
    assert all(writer.batch_set_v1(ks, torch.arange(0, 128 * pool.page_size)))
    time.sleep(1.5)  # let the kernel's 1 s entry/attr caches expire: lookups reach JuiceFS
    print()
    print("| batch_exists, 128 keys | keys/s | ms per call |")
    print("| --- | --- | --- |")

    def measure(label, b, key_list, expect):
        t = time.perf_counter()
        hits = b.batch_exists(key_list)
        dt = time.perf_counter() - t
        assert hits == expect, (label, hits)
        print(f"| {label} | {len(key_list) / dt:,.0f} | {dt * 1e3:.1f} |", flush=True)

    cold = JuiceFSStorage(cfg, {})
    cold.register_mem_pool_host(pool)
    measure("cold (fresh backend, kernel caches expired)", cold, ks, 128)
    measure("warm (backend's presence cache)", cold, ks, 128)
    nocache = JuiceFSStorage(
        storage_config(work, threads=args.threads, root_dir="ns-exists", exists_cache_ttl=0), {}
    )
    nocache.register_mem_pool_host(pool)
    nocache.batch_exists(ks)  # fill the kernel's entry/attr caches
    measure("warm, presence cache off (kernel entry/attr cache)", nocache, ks, 128)
    time.sleep(1.5)
    measure("cold misses (128 absent keys)", nocache, keys("absent", 128), 0)
    writer.clear()


if __name__ == "__main__":
    sys.exit(main())
