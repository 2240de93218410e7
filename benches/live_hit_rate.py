"""Prefix hits of a live SGLang server: the stock host pool against the quantizing one, on the
same host budget, under a RAG-like workload with Zipf reuse.

Workload: ``--docs`` documents (disjoint King James chunks of ~700 tokens, ``benches/texts``)
are the shared long prefixes; each request is one document plus a short question of its own,
the document drawn from a Zipf(``--zipf``) popularity, sent by ``--clients`` concurrent clients
(``--requests`` in all, the same sequence for every configuration). The distinct prefix tokens
are about twice what the stock pool's host budget (``--hicache-ratio`` x the device pool) holds,
so the stock pool must evict documents that come back, and the quantizing pool need not.

Per configuration: prompt tokens served from the device pool, the host pool and storage, the
hit rate (cached / prompt tokens), time to first token p50 / p95 (streamed), requests and
prompt tokens per second, and greedy agreement: the share of requests whose generated text is
the stock server's for the same request. On a CPU the forward pass is slow, so every hit saves
a lot there; the hit rate is the figure that carries over to a GPU.

``--soak SECONDS``: the opt-in soak variant. The quantizing pool with ``file`` L3 serves the
workload for that long; a third of the way in the server is restarted, and two thirds in its
storage directory is taken away for 20 s (an outage: writes fail, reads miss). It fails if a request
failed, the log has a traceback, or no storage or host hits came after each event.

usage: python benches/live_hit_rate.py --sglang-tree PATCHED_TREE [--configs stock,k8v8,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "live"))

from server import LiveServer, kjv_documents, model_dir  # noqa: E402

PRESET = ROOT / "benches" / "presets" / "smollm2-3bits.yaml"
QUANTIZED = ("--enable-kvtuner-hicache",)
CONFIGS = {
    "stock": (),
    "k8v8": (*QUANTIZED, "--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "8"),
    "k4v4": (*QUANTIZED, "--kvtuner-hicache-asym"),
    "k4v2": (*QUANTIZED, "--kvtuner-hicache-asym", "--kvtuner-hicache-nbits-value", "2"),
    "preset-3bit": (
        *QUANTIZED,
        "--kvtuner-hicache-asym",
        "--kvtuner-hicache-layer-config",
        str(PRESET),
    ),
}


def requests_for(docs, n, zipf, seed):
    """The request sequence: (document index, prompt), documents by Zipf popularity."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** zipf for rank in range(len(docs))]
    order = list(range(len(docs)))
    rng.shuffle(order)  # popularity is not the text order
    picks = rng.choices(order, weights=weights, k=n)
    return [
        (d, f"{docs[d]}\n\nQuestion {i}: who is named in this passage?\nAnswer:")
        for i, d in enumerate(picks)
    ]


def stream_generate(url, prompt, max_new_tokens):
    """One streamed greedy request: (time to first token, text, meta_info)."""
    body = json.dumps(
        {
            "text": prompt,
            "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
        }
    ).encode()
    req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
    start = time.monotonic()
    ttft, last = None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.monotonic() - start
            last = json.loads(line[5:])
    return ttft, last["text"], last["meta_info"]


def run_workload(srv, reqs, clients, max_new_tokens):
    """Send ``reqs`` with ``clients`` concurrent clients; per-request results in order."""
    results = [None] * len(reqs)

    def one(i):
        try:
            ttft, text, meta = stream_generate(srv.url, reqs[i][1], max_new_tokens)
            details = meta.get("cached_tokens_details") or {}
            results[i] = dict(
                ttft=ttft,
                text=text,
                prompt=meta["prompt_tokens"],
                cached=meta.get("cached_tokens", 0),
                device=details.get("device", 0),
                host=details.get("host", 0),
                storage=details.get("storage", 0),
                error=None,
            )
        except Exception as e:  # reported as a failed request, never hidden
            results[i] = dict(error=repr(e))

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(reqs))))
    return results, time.monotonic() - start


def summarize(name, results, wall, reference):
    ok = [r for r in results if r["error"] is None]
    prompt = sum(r["prompt"] for r in ok)
    cached = sum(r["cached"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok)
    agree = None
    if reference is not None:
        same = sum(
            1
            for r, s in zip(results, reference)
            if r["error"] is None and s["error"] is None and r["text"] == s["text"]
        )
        agree = same / len(results)
    return dict(
        config=name,
        requests=len(results),
        failed=len(results) - len(ok),
        prompt=prompt,
        device=sum(r["device"] for r in ok),
        host=sum(r["host"] for r in ok),
        storage=sum(r["storage"] for r in ok),
        hit_rate=cached / prompt if prompt else 0.0,
        ttft_p50=statistics.median(ttfts),
        ttft_p95=ttfts[int(0.95 * (len(ttfts) - 1))],
        req_per_s=len(ok) / wall,
        tok_per_s=prompt / wall,
        agree=agree,
    )


def print_table(rows, stock_hit_rate):
    head = (
        "config",
        "prompt tok",
        "device",
        "host",
        "storage",
        "hit rate",
        "vs stock",
        "TTFT p50",
        "TTFT p95",
        "req/s",
        "prompt tok/s",
        "greedy = stock",
        "failed",
    )
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
    for r in rows:
        gain = f"{r['hit_rate'] / stock_hit_rate:.2f}x" if stock_hit_rate else "-"
        agree = "-" if r["agree"] is None else f"{100 * r['agree']:.0f}%"
        print(
            f"| {r['config']} | {r['prompt']} | {r['device']} | {r['host']} | {r['storage']} "
            f"| {100 * r['hit_rate']:.1f}% | {gain} | {r['ttft_p50']:.2f} s "
            f"| {r['ttft_p95']:.2f} s | {r['req_per_s']:.2f} | {r['tok_per_s']:.0f} "
            f"| {agree} | {r['failed']} |"
        )


def budget_args(args):
    return ("--max-total-tokens", str(args.device_tokens), "--hicache-ratio", str(args.ratio))


def compare(args, model, reqs, workdir):
    rows, reference = [], None
    for name in args.configs.split(","):
        flags = [*budget_args(args), *CONFIGS[name]]
        env = {}
        if args.file_l3:
            store = workdir / f"l3-{name}"
            store.mkdir()
            flags += ["--hicache-storage-backend", "file"]
            env["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(store)
        log = workdir / f"{name}.log"
        with LiveServer(
            sys.executable, args.sglang_tree, model, flags, log, stock_pool=name == "stock", env=env
        ) as srv:
            results, wall = run_workload(srv, reqs, args.clients, args.max_new_tokens)
        if srv.tracebacks():
            print(f"warning: {name}: traceback in {log}", file=sys.stderr)
        row = summarize(name, results, wall, reference)
        if name == "stock":
            reference = results
        rows.append(row)
        print(
            f"# {name}: hit rate {100 * row['hit_rate']:.1f}%, {row['failed']} failed",
            file=sys.stderr,
            flush=True,
        )
    stock = next((r["hit_rate"] for r in rows if r["config"] == "stock"), None)
    print_table(rows, stock)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def soak(args, model, reqs, workdir):
    """Minutes of traffic with a restart and a storage outage in the middle (module doc)."""
    store, offline = workdir / "l3-soak", workdir / "l3-soak-offline"
    store.mkdir()
    flags = [*budget_args(args), *CONFIGS["k4v4"], "--hicache-storage-backend", "file"]
    env = {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": str(store)}
    log = workdir / "soak.log"
    srv = LiveServer(sys.executable, args.sglang_tree, model, flags, log, env=env)
    phases, failed = [], 0
    try:
        for phase in ("start", "after restart", "after storage outage"):
            srv.start()
            # Each phase serves a third of --soak, counted from its server's start-up.
            phase_end = time.monotonic() + args.soak / 3
            outage = None
            if phase == "after storage outage":
                # Take the directory away (as a lost mount does): permission bits would not
                # stop a server that runs as root.
                store.rename(offline)
                outage = threading.Timer(20.0, offline.rename, (store,))
                outage.start()
            totals = dict(requests=0, host=0, storage=0, failed=0)
            i = 0
            while time.monotonic() < phase_end:
                batch = reqs[i % len(reqs) :][: args.clients * 4] or reqs[: args.clients * 4]
                results, _ = run_workload(srv, batch, args.clients, args.max_new_tokens)
                i += len(batch)
                for r in results:
                    totals["requests"] += 1
                    if r["error"] is not None:
                        totals["failed"] += 1
                    else:
                        totals["host"] += r["host"]
                        totals["storage"] += r["storage"]
            if outage is not None:
                outage.join()
            phases.append((phase, totals))
            failed += totals["failed"]
            if phase != "after storage outage":
                srv.stop()
    finally:
        if offline.exists():
            offline.rename(store)
        srv.stop()
    print("| phase | requests | failed | host-hit tokens | storage-hit tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for phase, t in phases:
        print(f"| {phase} | {t['requests']} | {t['failed']} | {t['host']} | {t['storage']} |")
    tracebacks = srv.tracebacks()
    print(f"tracebacks in the server log: {len(tracebacks)} ({log})")
    # Every phase served hits, and the restarted server's first hits came from storage.
    resumed = all(t["requests"] and t["host"] + t["storage"] for _, t in phases)
    resumed = resumed and dict(phases)["after restart"]["storage"] > 0
    return 0 if failed == 0 and not tracebacks and resumed else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sglang-tree", required=True, help="the patched tree (holding sglang/)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--docs", type=int, default=17, help="distinct shared prefixes")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=0.8, help="Zipf exponent of document reuse")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--device-tokens", type=int, default=3072)
    ap.add_argument("--ratio", type=float, default=2.0, help="--hicache-ratio of every server")
    ap.add_argument("--file-l3", action="store_true", help="also give every server file L3")
    ap.add_argument("--soak", type=float, default=0.0, help="run the soak variant this long")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    docs = kjv_documents(chars=3000)[: args.docs]
    reqs = requests_for(docs, args.requests, args.zipf, args.seed)
    model = model_dir()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} CPUs; SmolLM2-135M-Instruct "
        f"bf16 on SGLang's CPU engine; {len(docs)} documents, {len(reqs)} requests, "
        f"{args.clients} clients, Zipf {args.zipf}; device pool {args.device_tokens} tokens, "
        f"--hicache-ratio {args.ratio}, page 64"
    )
    workdir = Path(tempfile.mkdtemp(prefix="kvtuner-live-bench-"))
    print(f"# server logs and storage: {workdir}", file=sys.stderr)
    if args.soak:
        return soak(args, model, reqs, workdir)
    return compare(args, model, reqs, workdir)


if __name__ == "__main__":
    sys.exit(main())
