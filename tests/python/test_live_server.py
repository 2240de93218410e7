"""A real ``python -m sglang.launch_server`` (SGLang's CPU engine, SmolLM2-135M) with the
patched tree: prefixes come back from the quantizing host pool and, after a restart, from L3
(``file``, JuiceFS on a real mount, NIXL's POSIX plugin, a Mooncake store over TCP), with the
cold run's greedy tokens; the same host budget serves a multiple of the stock pool's hits; bad flags end start-up with
one line. Each server is stopped by the test, also on failure (``tests/live/server.py``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
from packaging.version import Version

from conftest import PATCHED, ROOT, requires_patched

sys.path.insert(0, str(ROOT / "tests" / "live"))
from mooncake import MooncakeStore  # noqa: E402
from server import (  # noqa: E402
    PAGE_SIZE,
    LiveServer,
    ServerFailed,
    kjv_documents,
    launch_refused,
    model_dir,
    pool_bytes_per_token,
    pool_startup_line,
)

pytestmark = requires_patched

# Pages of 64 tokens on the CPU engine from 0.5.22 (tests/live/server.py); older releases serve
# only with one token per page, which test_page_size_one_host_hit covers.
if PATCHED:
    from sglang.version import __version__ as RELEASE
else:
    RELEASE = "0"
needs_paged_cpu_engine = pytest.mark.skipif(
    Version(RELEASE) < Version("0.5.22"),
    reason=f"SGLang {RELEASE}'s paged allocator has only Triton kernels, which its CPU engine "
    "cannot run: pages of 64 tokens do not serve there (page size 1 does)",
)

PRESET = ROOT / "benches" / "presets" / "smollm2-3bits.yaml"
# A device pool smaller than the prompt plus the documents sent after it, so those push it out.
DEVICE_TOKENS = "3072"
# At least this much of a ~1.4k-token prompt must come back (whole pages of 64 tokens).
MIN_HIT_TOKENS = 1024


@pytest.fixture(scope="module")
def model():
    return model_dir()


def new_server(model, log_path, *args, stock_pool=False, env=None, page_size=PAGE_SIZE):
    return LiveServer(
        sys.executable,
        PATCHED,
        model,
        ["--max-total-tokens", DEVICE_TOKENS, *args],
        log_path,
        stock_pool=stock_pool,
        env=env,
        page_size=page_size,
    )


def assert_no_traceback(srv):
    assert srv.tracebacks() == [], f"{srv.log_path}:\n" + "\n\n".join(srv.tracebacks())


@pytest.fixture
def serve(model, tmp_path):
    """Start servers of the patched tree; every one is stopped at the end, and none may
    have logged a traceback."""
    started = []

    def start(name, *args, env=None, page_size=PAGE_SIZE):
        srv = new_server(model, tmp_path / f"{name}.log", *args, env=env, page_size=page_size)
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop()
    for srv in started:
        assert_no_traceback(srv)


def quantized(*flags):
    return ("--enable-kvtuner-hicache", *flags)


def push_out(srv, docs):
    """Fill the device pool with other prompts, so earlier prefixes leave it."""
    for doc in docs:
        srv.generate(doc, max_new_tokens=1)


def host_hit(srv, prompt, others):
    """Send ``prompt`` cold, push it out of the device pool, send it again: the second reply,
    which must have come from the host pool."""
    cold = srv.generate(prompt)
    assert cold.cached_tokens == 0, cold
    push_out(srv, others)
    again = srv.generate(prompt)
    assert again.host >= MIN_HIT_TOKENS, f"expected a host hit, got {again}"
    assert again.device < MIN_HIT_TOKENS, again
    return again


def capacity_documents():
    """~700-token documents, more distinct tokens than the stock pool's host budget of 2x the
    device pool holds, fewer than the same bytes hold quantized."""
    return kjv_documents(chars=3000)


def round_robin_host_hits(srv, docs, rounds=2):
    """Send every document in turn, ``rounds`` times; the host-hit tokens after round one."""
    hits = 0
    for r in range(rounds):
        for doc in docs:
            served = srv.generate(doc, max_new_tokens=1)
            if r:
                hits += served.host
    return hits


@pytest.fixture(scope="module")
def stock(model, tmp_path_factory):
    """What SGLang's own host pool serves on the same budget: the probe prompt's host-hit
    reply (the reference for exact configurations) and the capacity workload's host hits."""
    log = tmp_path_factory.mktemp("stock") / "stock.log"
    prompt, *others = kjv_documents()[:4]
    with new_server(model, log, "--hicache-ratio", "2", stock_pool=True) as srv:
        reference = host_hit(srv, prompt, others)
        hits = round_robin_host_hits(srv, capacity_documents())
    assert_no_traceback(srv)
    return dict(prompt=prompt, others=others, hit=reference, capacity_hits=hits)


# -------------------------------------------------------------- L2 and L3 ---


@dataclasses.dataclass
class L3:
    """Server flags and environment for one storage backend, and how to count what it holds."""

    flags: Tuple[str, ...]
    env: Dict[str, str]
    stored_bytes: Callable[[], int]


def bytes_under(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@pytest.fixture
def l3(tmp_path, make_volume):
    """``l3(backend)``: an ``L3`` storing pages in a fresh directory, JuiceFS volume or
    Mooncake store; a store started here outlives the test's servers when the test names this
    fixture before ``serve`` (fixtures are torn down in reverse)."""
    stores = []

    def start(backend):
        if backend == "juicefs":
            volume = make_volume("kvlive")
            config = {"mount_point": volume.mnt, "require_juicefs": True}
            flags = ("--hicache-storage-backend-extra-config", json.dumps(config))
            return L3(
                ("--hicache-storage-backend", "juicefs", *flags),
                {},
                lambda: bytes_under(volume.mnt),
            )
        if backend == "mooncake":
            store = MooncakeStore(Path(sys.executable).parent, tmp_path / "mooncake")
            stores.append(store)
            store.start()
            return L3(
                ("--hicache-storage-backend", "mooncake"), store.server_env(), store.allocated_bytes
            )
        directory = tmp_path / f"l3-{backend}"
        directory.mkdir()
        if backend == "file":
            env = {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": str(directory)}
            return L3(("--hicache-storage-backend", "file"), env, lambda: bytes_under(directory))
        assert backend == "nixl"
        if importlib.util.find_spec("nixl") is None:
            pytest.fail("nixl is not installed (scripts/test-requirements.txt installs it)")
        # NIXL's POSIX plugin, with its default O_DIRECT I/O. Its L3 cleaner deletes pages
        # while the file system holding them is over 80% used, whoever filled it (a full
        # disk here made the restart's storage hit vanish): off, so the test sees its pages.
        config = {"plugin": {"posix": {"active": True}}, "l3_cleaner_enabled": False}
        flags = ("--hicache-storage-backend", "nixl")
        flags += ("--hicache-storage-backend-extra-config", json.dumps(config))
        env = {"SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR": str(directory)}
        return L3(flags, env, lambda: bytes_under(directory))

    yield start
    for store in stores:
        store.stop()


def assert_quantized_pages_stored(store, srv, hit_tokens):
    """The store holds at least the hit's pages and no more than every prompt token the
    server saw at the pool's quantized bytes per token (stock pages would be 2-6x over)."""
    ours, stock = pool_bytes_per_token(srv.log())
    stored = store.stored_bytes()
    # 10%: page headers and whatever index files a backend keeps beside the pages.
    most = srv.prompt_tokens_sent * ours * 1.1
    assert hit_tokens * ours <= stored <= most, (
        stored,
        hit_tokens,
        srv.prompt_tokens_sent,
        ours,
        stock,
    )


# Residual window 0 in these: an L3 page is the quantized row alone, so a storage hit must
# give exactly the host hit's tokens (the window is tested on its own below).
L3_CASES = {
    "file": ("--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "8"),
    "juicefs": ("--kvtuner-hicache-layer-config", str(PRESET), "--kvtuner-hicache-asym"),
    "nixl": ("--kvtuner-hicache-nbits-value", "2", "--kvtuner-hicache-asym"),
    "mooncake": (),  # the defaults: K4V4 symmetric
}


@needs_paged_cpu_engine
@pytest.mark.parametrize("backend", list(L3_CASES))
def test_host_hit_then_storage_hit_after_restart(l3, serve, stock, backend):
    store = l3(backend)
    flags, env = store.flags, store.env
    args = (
        *quantized(*L3_CASES[backend], "--kvtuner-hicache-residual-length", "0"),
        "--hicache-ratio",
        "2",
        *flags,
    )
    first = serve(f"{backend}-1", *args, env=env)
    line = pool_startup_line(first.log())
    assert line is not None and "host codec" in line, first.log_tail()
    from_host = host_hit(first, stock["prompt"], stock["others"])
    if backend == "file":  # 8 bits: the stock pool's own greedy tokens
        assert from_host.text == stock["hit"].text
    first.stop()
    assert_quantized_pages_stored(store, first, MIN_HIT_TOKENS)

    second = serve(f"{backend}-2", *args, env=env)
    from_storage = second.generate(stock["prompt"])
    assert from_storage.storage >= MIN_HIT_TOKENS, f"no {backend} storage hit: {from_storage}"
    assert from_storage.text == from_host.text
    if backend != "file":
        return
    second.stop()
    # Pages of another quantization config sit in the same directory and are never read.
    other = serve("file-3", *quantized(), "--hicache-ratio", "2", *flags, env=env)
    served = other.generate(stock["prompt"])
    assert served.storage == 0 and served.cached_tokens == 0, served


@needs_paged_cpu_engine
def test_residual_window_serves_exact_tokens(serve, stock):
    # K2V2 alone changes this prompt's greedy tokens; with a residual window covering the
    # whole prefix, the host hit is served from the exact copy: the stock pool's tokens.
    window = ("--kvtuner-hicache-residual-length", "1536")
    k2v2 = ("--kvtuner-hicache-nbits-key", "2", "--kvtuner-hicache-nbits-value", "2")
    # 2 GB: an overlay ring (1/8 of the budget) that still holds this prompt's window after
    # the push-out prompts' own windows.
    srv = serve("k2v2-window", *quantized(*k2v2, *window), "--hicache-size", "2")
    assert "residual overlay 0 pages" not in pool_startup_line(srv.log())
    assert host_hit(srv, stock["prompt"], stock["others"]).text == stock["hit"].text


def test_page_size_one_host_hit(serve):
    # The geometry every release's CPU engine serves. A key group and the sink never cross a
    # page, so one-token pages take per-token keys and no sink; 8 bits keep the greedy tokens.
    # Each page carries its own scales and header, so one-token K8V8 pages are larger than
    # stock ones: ratio 4 holds the prompt and the three pushing it out.
    flags = ("--kvtuner-hicache-axis-key", "0", "--kvtuner-hicache-sink-tokens", "0")
    k8v8 = ("--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "8")
    srv = serve("page-1", *quantized(*flags, *k8v8), "--hicache-ratio", "4", page_size=1)
    assert "kvt-" in pool_startup_line(srv.log()), srv.log_tail()
    prompt, *others = kjv_documents()[:4]
    cold = srv.generate(prompt)
    push_out(srv, others)
    again = srv.generate(prompt)
    assert again.host >= MIN_HIT_TOKENS and again.device < MIN_HIT_TOKENS, again
    assert again.text == cold.text


# --------------------------------------------------------------- capacity ---


@needs_paged_cpu_engine
def test_same_host_budget_serves_a_multiple_of_the_stock_hits(serve, stock):
    ours = serve("k4v4", *quantized(), "--hicache-ratio", "2")
    our_hits = round_robin_host_hits(ours, capacity_documents())
    assert our_hits >= 8 * MIN_HIT_TOKENS // 2, (our_hits, stock["capacity_hits"])
    assert our_hits >= 2 * max(stock["capacity_hits"], 1), (our_hits, stock["capacity_hits"])


# -------------------------------------------------------------- bad flags ---


@pytest.mark.parametrize(
    "flags,names",
    [
        (("--hicache-mem-layout", "layer_first"), "--hicache-mem-layout 'layer_first'"),
        (("--kvtuner-hicache-layer-config", "/nonexistent/preset.yaml"), "no such file"),
        (("--kvtuner-hicache-nbits-key", "3"), "--kvtuner-hicache-nbits-key"),
        (("--kvtuner-hicache-sink-tokens", "64"), "--kvtuner-hicache-sink-tokens=64"),
    ],
)
def test_bad_flag_ends_startup_with_one_line(model, flags, names):
    done = launch_refused(sys.executable, PATCHED, model, [*quantized(), *flags])
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stdout, done.stdout[-4000:]
    errors = [line for line in done.stdout.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and names in errors[0], done.stdout[-2000:]


def test_server_failed_carries_the_log(model, tmp_path):
    # The harness itself: a server that cannot start is reported with its log, not a hang.
    srv = LiveServer(
        sys.executable,
        PATCHED,
        model,
        quantized("--kvtuner-hicache-nbits-key", "3"),
        tmp_path / "bad.log",
    )
    with pytest.raises(ServerFailed, match="invalid choice"):
        srv.start(timeout=300)
    srv.stop()
