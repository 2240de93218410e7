"""JuiceFSStorage against a real JuiceFS FUSE mount, with SGLang 0.5.23's own classes.

Run:
    PYTHONPATH=patches $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest -rs \
        tests/python/test_juicefs_backend.py
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

# juicefs_volume / make_volume come from conftest.py (juicefs_fixture.py).
from juicefs_fixture import REPO, make_mha_host_pool, storage_config
from kvtuner_hicache.juicefs import HEADER_SIZE, JuiceFSStorage
from sglang.srt.observability.metrics_collector import StorageMetrics

LAYOUTS = ["page_first", "layer_first", "page_first_direct", "page_head"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def mnt(juicefs_volume, request):
    """A fresh directory on the shared volume per test, so tests never see each other's pages."""
    path = os.path.join(juicefs_volume.mnt, f"t-{request.node.name}"[:120].replace("/", "_"))
    os.makedirs(path, exist_ok=True)
    return path


def backend(mount, pool=None, **kw) -> JuiceFSStorage:
    b = JuiceFSStorage(storage_config(mount, **kw), {})  # the `dynamic` construction form
    if pool is not None:
        b.register_mem_pool_host(pool)
    return b


def fill_random(pool, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def page_bytes(pool, page: int) -> bytes:
    return (
        pool.get_data_page(page * pool.page_size, flat=True)
        .contiguous()
        .view(torch.uint8)
        .numpy()
        .tobytes()
    )


def indices(pool, pages):
    ps = pool.page_size
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages])


def keys_for(prefix, n):
    # Same shape as SGLang's page keys: SHA-256 hex.
    import hashlib

    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]


def page_path(b: JuiceFSStorage, key: str) -> str:
    return b._path(key)


# --------------------------------------------------------------------------- round trips


def test_volume_is_a_real_juicefs_mount(juicefs_volume):
    from kvtuner_hicache.juicefs import mount_fstype

    assert mount_fstype(juicefs_volume.mnt) == (juicefs_volume.mnt, "fuse.juicefs")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_roundtrip_lands_in_host_pages(mnt, layout):
    pool = make_mha_host_pool(layout)
    fill_random(pool, seed=1)
    b = backend(mnt, pool)
    src_pages, dst_pages = [0, 1, 2, 3], [7, 5, 9, 11]
    keys = keys_for(layout, 4)
    expected = [page_bytes(pool, p) for p in src_pages]
    assert b.batch_set_v1(keys, indices(pool, src_pages)) == [True] * 4
    # Every file: header + exactly one page.
    for k in keys:
        assert os.path.getsize(page_path(b, k)) == HEADER_SIZE + b.page_bytes
    for p in dst_pages:
        pool.get_data_page(p * pool.page_size, flat=False).zero_()
    fresh = backend(mnt, pool)  # no in-process state: everything comes from the volume
    assert fresh.batch_exists(keys) == 4
    assert fresh.batch_get_v1(keys, indices(pool, dst_pages)) == [True] * 4
    assert [page_bytes(pool, p) for p in dst_pages] == expected
    stats = fresh.get_stats()
    assert isinstance(stats, StorageMetrics) and stats.prefetch_pgs == [4]
    assert len(stats.prefetch_bandwidth) == 1 and stats.prefetch_bandwidth[0] > 0
    assert fresh.get_stats().prefetch_pgs == []  # drained


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_legacy_roundtrip(mnt, layout):
    pool = make_mha_host_pool(layout)
    fill_random(pool, seed=2)
    b = backend(mnt, pool)
    keys = keys_for("legacy-" + layout, 3)
    values = [pool.get_data_page(p * pool.page_size) for p in range(3)]
    expected = [page_bytes(pool, p) for p in range(3)]
    assert b.batch_set(keys, values) is True
    assert b.set("single-" + layout, values[0]) is True
    assert b.exists(keys[0]) and b.exists("single-" + layout) and not b.exists("absent")
    fresh = backend(mnt, pool)
    # Exactly how SGLang's generic prefetch path calls it.
    outs = fresh.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert all(o is not None for o in outs)
    for out, p, exp in zip(outs, [10, 11, 12], expected):
        pool.set_from_flat_data_page(p * pool.page_size, out)
        assert page_bytes(pool, p) == exp
    got = fresh.get(keys[1])  # no target: the backend allocates a flat page
    assert got is not None and got.view(torch.uint8).numpy().tobytes() == expected[1]
    assert fresh.get("absent", pool.get_dummy_flat_data_page()) is None
    assert fresh.batch_get(["absent"], [pool.get_dummy_flat_data_page()]) == [None]


def test_legacy_pages_of_another_size_are_refused_once_logged(mnt, caplog):
    """0.5.13 - 0.5.18 send an MTP draft pool's pages through the legacy interface as
    ``<key>.draft`` (another page size): refused, nothing written, one warning per size."""
    pool = make_mha_host_pool()
    b = backend(mnt, pool)
    keys = [f"{k}.draft" for k in keys_for("draft", 3)]
    draft = torch.zeros(b.flat_bytes // 4, dtype=torch.uint8)
    caplog.set_level(logging.WARNING)
    assert b.batch_set(keys, [draft] * 3) is False
    assert b.set(keys[0], draft) is False
    assert not any(os.path.exists(b._path(k)) for k in keys)
    assert b.batch_get(keys, [draft.clone() for _ in keys]) == [None] * 3
    assert caplog.text.count("not this namespace's") == 1


def test_v1_and_legacy_share_pages_only_when_bytes_agree(mnt):
    """page_first: flat pages equal the zero-copy regions, so both paths hit each other's
    pages. layer_first: the orders differ, so a cross read must miss, never scramble."""
    for layout, shared in (("page_first", True), ("layer_first", False)):
        pool = make_mha_host_pool(layout)
        fill_random(pool, seed=3)
        b = backend(mnt, pool)
        key = keys_for("cross-" + layout, 1)[0]
        assert b.batch_set_v1([key], indices(pool, [0])) == [True]
        out = b.get(key, pool.get_dummy_flat_data_page())
        if shared:
            assert out is not None and out.view(torch.uint8).numpy().tobytes() == page_bytes(
                pool, 0
            )
        else:
            assert out is None
            # ... and the refused read left the other path's page in place.
            assert b.batch_get_v1([key], indices(pool, [5])) == [True]
            assert page_bytes(pool, 5) == page_bytes(pool, 0)


def test_batch_exists_counts_leading_hits(mnt):
    pool = make_mha_host_pool()
    fill_random(pool)
    b = backend(mnt, pool)
    keys = keys_for("prefix", 6)
    assert b.batch_set_v1([keys[0], keys[1], keys[3]], indices(pool, [0, 1, 3])) == [True] * 3
    fresh = backend(mnt, pool)
    assert fresh.batch_exists(keys) == 2
    assert fresh.batch_exists(keys[3:]) == 1
    assert fresh.batch_exists([]) == 0
    assert fresh.batch_get_v1(keys[:3], indices(pool, [4, 5, 6])) == [True, True, False]


def test_storage_config_of_the_oldest_releases(mnt):
    """0.5.3 - 0.5.7's HiCacheStorageConfig has no pp_*, attn_cp_* or enable_storage_metrics
    (pp_* come in 0.5.8, attn_cp_* in 0.5.11): the backend serves it as one stage, one CP
    rank, no metrics."""
    import dataclasses

    @dataclasses.dataclass
    class OldestStorageConfig:  # the fields 0.5.3 - 0.5.7 have, nothing more
        tp_rank: int
        tp_size: int
        is_mla_model: bool
        is_page_first_layout: bool
        model_name: str
        extra_config: dict

    pool = make_mha_host_pool()
    fill_random(pool, seed=7)
    cfg = OldestStorageConfig(0, 1, False, True, "org/test-model", {"mount_point": mnt})
    b = JuiceFSStorage(cfg, {})
    b.register_mem_pool_host(pool)
    assert b.namespace_fields["pp"] == [0, 1] and b.namespace_fields["cp"] == [0, 1]
    keys = keys_for("oldest", 2)
    assert b.batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]
    assert backend(mnt, pool).batch_exists(keys) == 2  # the same namespace as today's config
    assert b.batch_get_v1(keys, indices(pool, [2, 3])) == [True, True]
    assert page_bytes(pool, 2) == page_bytes(pool, 0)


def test_rewrite_is_write_once(mnt):
    pool = make_mha_host_pool()
    fill_random(pool, seed=4)
    b = backend(mnt, pool)
    key = keys_for("once", 1)[0]
    first = page_bytes(pool, 0)
    assert b.batch_set_v1([key], indices(pool, [0])) == [True]
    inode = os.stat(page_path(b, key)).st_ino
    fill_random(pool, seed=5)
    other = backend(mnt, pool)
    assert other.batch_set_v1([key], indices(pool, [0])) == [True]  # already there: kept
    assert os.stat(page_path(b, key)).st_ino == inode
    assert other.batch_get_v1([key], indices(pool, [3])) == [True]
    assert page_bytes(pool, 3) == first


def test_publish_never_clobbers(mnt, monkeypatch):
    """Two writers racing past the existence check: the first published page stays."""
    pool = make_mha_host_pool()
    fill_random(pool, seed=6)
    a, b = backend(mnt, pool), backend(mnt, pool)
    key = keys_for("race", 1)[0]
    assert a.batch_set_v1([key], indices(pool, [0])) == [True]
    first = page_bytes(pool, 0)
    inode = os.stat(page_path(a, key)).st_ino
    fill_random(pool, seed=7)
    import kvtuner_hicache.juicefs.page_file as js

    monkeypatch.setattr(js.os.path, "exists", lambda p: False)
    assert b.batch_set_v1([key], indices(pool, [0])) == [True]
    monkeypatch.undo()
    assert b.counters["set_existing"] == 1 and b.counters["set_pages"] == 0
    assert os.stat(page_path(a, key)).st_ino == inode
    assert not glob.glob(os.path.join(os.path.dirname(page_path(a, key)), ".tmp.*"))
    assert backend(mnt, pool).batch_get_v1([key], indices(pool, [2])) == [True]
    assert page_bytes(pool, 2) == first


# --------------------------------------------------------------------------- namespaces


def test_tp_ranks_and_quant_tags_are_isolated(mnt):
    pool = make_mha_host_pool()
    fill_random(pool, seed=8)
    keys = keys_for("iso", 2)
    tp0 = backend(mnt, pool, tp_rank=0, tp_size=2)
    tp1 = backend(mnt, pool, tp_rank=1, tp_size=2)
    assert tp0.ns_dir != tp1.ns_dir
    assert tp0.batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]
    assert tp1.batch_exists(keys) == 0
    assert tp1.batch_get_v1(keys, indices(pool, [2, 3])) == [False, False]
    assert tp1.get(keys[0], pool.get_dummy_flat_data_page()) is None

    pool_q4 = make_mha_host_pool()
    pool_q4.kvtuner_namespace_tag = lambda: "bf16-k4v4-g64"
    pool_q2 = make_mha_host_pool()
    pool_q2.kvtuner_namespace_tag = lambda: "bf16-k2v2-g64"
    fill_random(pool_q4, seed=9)
    q4, q2 = backend(mnt, pool_q4), backend(mnt, pool_q2)
    plain = backend(mnt, pool)  # stock pool: namespace from its dtype
    assert len({q4.ns_dir, q2.ns_dir, plain.ns_dir, tp0.ns_dir}) == 4
    assert "k4v4" in q4.namespace and "bfloat16" in plain.namespace
    assert q4.batch_set_v1(keys, indices(pool_q4, [0, 1])) == [True, True]
    assert q2.batch_exists(keys) == 0 and plain.batch_exists(keys) == 0
    assert q2.batch_get_v1(keys, indices(pool_q2, [2, 3])) == [False, False]

    # A page file copied into another namespace is still refused: the key tag names its home.
    os.makedirs(os.path.dirname(page_path(q2, keys[0])), exist_ok=True)
    with open(page_path(q4, keys[0]), "rb") as src, open(page_path(q2, keys[0]), "wb") as dst:
        dst.write(src.read())
    assert backend(mnt, pool_q2).batch_get_v1([keys[0]], indices(pool_q2, [2])) == [False]

    # clear() empties only its own namespace.
    assert tp1.clear() is True
    assert backend(mnt, pool, tp_rank=0, tp_size=2).batch_exists(keys) == 2
    assert q4.clear() is True and backend(mnt, pool_q4).batch_exists(keys) == 0
    assert backend(mnt, pool, tp_rank=0, tp_size=2).batch_exists(keys) == 2


def test_namespace_spells_its_inputs(mnt):
    pool = make_mha_host_pool("page_first", page_size=16)
    b = backend(mnt, pool, tp_rank=1, tp_size=4, model="Org/Model-7B")
    assert b.namespace.startswith(
        "Org-Model-7B__tp1of4-pp0of1-cp0of1-dp0__ps16-page_first__bfloat16__"
    )
    marker = json.load(open(os.path.join(b.ns_dir, "namespace.json")))
    assert marker["model"] == "Org/Model-7B" and marker["tp"] == [1, 4]
    assert marker["page_bytes"] == b.page_bytes
    shard_dir = os.path.basename(os.path.dirname(page_path(b, "k")))
    assert len(shard_dir) == 2 and int(shard_dir, 16) < 256


def test_mla_pages_are_shared_across_tp(mnt):
    pool = make_mha_host_pool()  # geometry only; the MLA flag decides sharing and writers
    fill_random(pool, seed=10)
    r0 = backend(mnt, pool, is_mla=True, tp_rank=0, tp_size=2)
    r1 = backend(mnt, pool, is_mla=True, tp_rank=1, tp_size=2)
    assert r0.ns_dir == r1.ns_dir and "__mla-" in r0.namespace
    keys = keys_for("mla", 2)
    assert r1.batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]  # not the writer
    assert r1.batch_exists(keys) == 0
    assert r0.batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]
    expected = page_bytes(pool, 1)
    assert r1.batch_get_v1(keys, indices(pool, [4, 5])) == [True, True]
    assert page_bytes(pool, 5) == expected


# --------------------------------------------------------------------------- faults


def _damage_cases(path: str, other_path: str):
    def truncate_half():
        os.truncate(path, os.path.getsize(path) // 2)

    def header_only():
        os.truncate(path, HEADER_SIZE)

    def empty():
        os.truncate(path, 0)

    def flip(offset):
        def run():
            with open(path, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 0xFF]))

        return run

    def extend():
        with open(path, "ab") as f:
            f.write(b"\0")

    def other_key():
        with open(other_path, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())

    size = os.path.getsize(path)
    return {
        "truncated": truncate_half,
        "header_only": header_only,
        "empty": empty,
        "payload_bitflip": flip(HEADER_SIZE + (size - HEADER_SIZE) // 2),
        "last_byte_flip": flip(size - 1),
        "magic_flip": flip(0),
        "length_flip": flip(9),
        "checksum_flip": flip(17),
        "extended": extend,
        "other_keys_page": other_key,
    }


def test_damaged_pages_are_misses(mnt, caplog):
    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=11)
    b = backend(mnt, pool)
    names = list(_damage_cases(__file__, __file__).keys())
    keys = keys_for("damage", len(names) + 1)
    spare = keys[-1]
    assert b.batch_set_v1(keys, indices(pool, range(len(keys)))) == [True] * len(keys)
    for name, key in zip(names, keys):
        _damage_cases(page_path(b, key), page_path(b, spare))[name]()
    caplog.set_level(logging.WARNING)
    for name, key in zip(names, keys):
        fresh = backend(mnt, pool)
        target = indices(pool, [20])
        assert fresh.batch_get_v1([key], target) == [False], name
        assert fresh.get(key, pool.get_dummy_flat_data_page()) is None, name
    assert fresh.batch_get_v1([spare], indices(pool, [20])) == [True]
    # A bad file is dropped by the writer rank, so the next backup republishes the key.
    again = backend(mnt, pool)
    assert again.batch_exists(keys[:1]) == 0
    assert again.batch_set_v1(keys[:1], indices(pool, [0])) == [True]
    assert backend(mnt, pool).batch_get_v1(keys[:1], indices(pool, [21])) == [True]
    assert page_bytes(pool, 21) == page_bytes(pool, 0)


def test_wrong_size_pages_are_not_reported_present(mnt):
    pool = make_mha_host_pool()
    fill_random(pool, seed=12)
    b = backend(mnt, pool)
    keys = keys_for("size", 3)
    assert b.batch_set_v1(keys, indices(pool, [0, 1, 2])) == [True] * 3
    os.truncate(page_path(b, keys[1]), 100)
    assert backend(mnt, pool).batch_exists(keys) == 1


class _Children:
    """Forked writer processes (they inherit the imported SGLang and the host pool, so no
    15 s re-import); always killed and reaped, whatever the test does."""

    def __init__(self):
        self.pids = []

    def start(self, fn) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # OpenMP's thread pool does not survive fork: stay single-threaded, as
                # torch's DataLoader workers do.
                torch.set_num_threads(1)
                code = 0 if fn() else 2
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def wait(self, pid, timeout=120.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        raise AssertionError(f"child {pid} did not finish in {timeout} s")

    def kill(self, pid) -> None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        self.pids.remove(pid)


@pytest.fixture
def children():
    kids = _Children()
    try:
        yield kids
    finally:
        for pid in list(kids.pids):
            kids.kill(pid)


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_writer_killed_mid_write_leaves_no_readable_page(mnt, tmp_path, children):
    pool = make_mha_host_pool(layers=16, heads=8, head_dim=128)  # 1 MiB pages
    fill_random(pool, seed=13)
    key = keys_for("killed", 1)[0]
    stalled = tmp_path / "stalled"

    def writer():
        import kvtuner_hicache.juicefs.page_file as js

        def half_then_hang(fd, bufs, offset):
            data = b"".join(bytes(b) for b in bufs)
            os.pwrite(fd, data[: len(data) // 2], offset)  # header + half the page reached disk
            stalled.write_text("1")
            time.sleep(600)

        w = backend(mnt, pool)
        js.os.pwritev = half_then_hang
        return w.batch_set_v1([key], indices(pool, [0])) == [True]

    pid = children.start(writer)
    assert _wait_for(stalled.exists), "writer never started"
    children.kill(pid)

    b = backend(mnt, pool)
    shard = os.path.dirname(page_path(b, key))
    torn = glob.glob(os.path.join(shard, ".tmp.*"))
    assert torn and os.path.getsize(torn[0]) > HEADER_SIZE  # the kill really was mid-write
    assert not os.path.exists(page_path(b, key))
    assert b.batch_exists([key]) == 0 and not b.exists(key)
    assert b.batch_get_v1([key], indices(pool, [3])) == [False]
    assert b.get(key, pool.get_dummy_flat_data_page()) is None
    # The key is still writable, and clear() sweeps the torn temporary.
    assert b.batch_set_v1([key], indices(pool, [0])) == [True]
    assert backend(mnt, pool).batch_get_v1([key], indices(pool, [3])) == [True]
    assert page_bytes(pool, 3) == page_bytes(pool, 0)
    assert b.clear() and not glob.glob(os.path.join(shard, ".tmp.*"))


def test_writer_killed_at_random_points_only_leaves_valid_pages(mnt, children):
    pool = make_mha_host_pool(layers=16, heads=8, head_dim=128)  # 1 MiB pages, 17 of them
    fill_random(pool, seed=14)
    n_pages = pool.page_num - 1
    keys = keys_for("randkill", 400)
    b = backend(mnt, pool)

    def writer():
        w = backend(mnt, pool, threads=4)
        for i in range(0, len(keys), 4):
            batch = keys[i : i + 4]
            w.batch_set_v1(batch, indices(pool, [(i + j) % n_pages for j in range(len(batch))]))
        return True

    pid = children.start(writer)
    assert _wait_for(lambda: b.batch_exists(keys[:5]) == 5, 120)
    time.sleep(0.05 + (os.getpid() % 7) * 0.01)
    children.kill(pid)
    published = [i for i, k in enumerate(keys) if os.path.exists(page_path(b, k))]
    assert published
    scratch = n_pages  # the padding page, never a source
    for i in published:
        assert b.batch_get_v1([keys[i]], indices(pool, [scratch])) == [True], i
        assert page_bytes(pool, scratch) == page_bytes(pool, i % n_pages), i
    # Beyond the published ones, nothing reads: no torn page under a final name.
    missing = [k for i, k in enumerate(keys) if i not in set(published)]
    assert all(not b.exists(k) for k in missing[:50])


def test_two_processes_writing_the_same_keys_leave_one_valid_page(mnt, tmp_path, children):
    # Same geometry (so the same namespace), different bytes.
    pools = {fill: make_mha_host_pool() for fill in (0x11, 0x22)}
    for fill, p in pools.items():
        p.kv_buffer.view(torch.uint8).fill_(fill)
    pool = pools[0x11]
    keys = keys_for("twowriters", 24)
    go = tmp_path / "go"

    def writer(fill):
        def run():
            w = backend(mnt, pools[fill], threads=8)
            assert _wait_for(go.exists)
            idx = indices(pools[fill], [i % 8 for i in range(len(keys))])
            return w.batch_set_v1(keys, idx) == [True] * len(keys)

        return run

    pids = [children.start(writer(0x11)), children.start(writer(0x22))]
    time.sleep(0.3)
    go.write_text("1")
    assert [children.wait(p) for p in pids] == [0, 0]
    b = backend(mnt, pool)
    page = pool.page_size * pool.size_per_token
    for k in keys:
        assert b.batch_get_v1([k], indices(pool, [9])) == [True]
        data = page_bytes(pool, 9)
        assert data in (b"\x11" * page, b"\x22" * page)
        shard = os.path.dirname(page_path(b, k))
        assert not glob.glob(os.path.join(shard, ".tmp.*"))


def test_unmounted_volume_gives_misses_not_exceptions(make_volume):
    vol = make_volume("kvunmount")
    pool = make_mha_host_pool()
    fill_random(pool, seed=15)
    b = backend(vol.mnt, pool)
    keys = keys_for("unmount", 3)
    assert b.batch_set_v1(keys, indices(pool, [0, 1, 2])) == [True] * 3
    vol.umount()
    assert not os.listdir(vol.mnt)  # the bare mount point
    assert b.batch_exists(keys) == 0
    assert b.exists(keys[0]) is False
    assert b.batch_get_v1(keys, indices(pool, [3, 4, 5])) == [False] * 3
    assert b.get(keys[0], pool.get_dummy_flat_data_page()) is None
    assert b.batch_get(keys, [pool.get_dummy_flat_data_page()] * 3) == [None] * 3
    assert b.batch_set_v1(keys_for("after", 1), indices(pool, [0])) == [False]
    assert b.set("after", pool.get_data_page(0)) is False
    assert b.batch_set(["after"], [pool.get_data_page(0)]) is False
    assert b.clear() is False
    assert isinstance(b.get_stats(), StorageMetrics)
    assert not os.listdir(vol.mnt)  # nothing leaked onto the local disk under the mount point
    # Mounting the same volume again brings the pages back.
    vol.mount()
    b.mount.last_reprobe = 0.0  # skip the re-probe back-off
    assert b.batch_exists(keys) == 3
    assert b.batch_get_v1(keys, indices(pool, [3, 4, 5])) == [True] * 3


# --------------------------------------------------------------------------- config


def test_config_errors_are_clear(mnt, tmp_path, caplog):
    with pytest.raises(ValueError, match="'mount_point' is required"):
        JuiceFSStorage(storage_config(None), {})
    with pytest.raises(ValueError, match="does not exist"):
        JuiceFSStorage(storage_config(str(tmp_path / "nope")), {})
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        JuiceFSStorage(storage_config(str(afile)), {})
    with pytest.raises(ValueError, match="threads"):
        JuiceFSStorage(storage_config(mnt, threads=0), {})
    with pytest.raises(ValueError, match="capacity_bytes"):
        JuiceFSStorage(storage_config(mnt, capacity_bytes="lots"), {})
    with pytest.raises(ValueError, match="root_dir"):
        JuiceFSStorage(storage_config(mnt, root_dir="../escape"), {})
    with pytest.raises(ValueError, match="not a JuiceFS mount"):
        JuiceFSStorage(storage_config(str(tmp_path), require_juicefs=True), {})
    caplog.set_level(logging.WARNING)
    plain = JuiceFSStorage(storage_config(str(tmp_path)), {})  # any directory, with a warning
    assert "not a JuiceFS mount" in caplog.text
    assert (
        JuiceFSStorage(
            storage_config(mnt, require_juicefs=True, capacity_bytes="1GiB"), {}
        ).options.capacity_bytes
        == 2**30
    )
    pool = make_mha_host_pool()
    plain.register_mem_pool_host(pool)
    assert plain.batch_set_v1(["k"], indices(pool, [0])) == [True]


def test_capacity_refuses_new_pages_when_full(mnt):
    pool = make_mha_host_pool()
    fill_random(pool, seed=16)
    probe = backend(mnt, pool)
    per_page = HEADER_SIZE + probe.page_bytes
    # High watermark 1: no eviction, so a full namespace refuses.
    b = backend(mnt, pool, capacity_bytes=2 * per_page, root_dir="cap", high_watermark=1.0)
    keys = keys_for("cap", 3)
    assert b.batch_set_v1(keys, indices(pool, [0, 1, 2])) == [True, True, False]
    assert b.counters["set_refused"] == 1
    assert b.batch_exists(keys) == 2
    assert b.batch_get_v1(keys[:2], indices(pool, [4, 5])) == [True, True]
    assert b.clear()
    assert b.batch_set_v1(keys[2:], indices(pool, [2])) == [True]
    b.close()  # stops its maintenance thread before the volume goes away


def test_used_before_pool_registration_is_a_miss(mnt):
    b = JuiceFSStorage(storage_config(mnt), {})
    assert b.batch_exists(["a"]) == 0
    assert b.get("a") is None and b.exists("a") is False


# --------------------------------------------------------------------------- loading


# What --hicache-storage-backend-extra-config carries for `--hicache-storage-backend dynamic`
# (plus mount_point).
DYNAMIC = {
    "backend_name": "juicefs",
    "module_path": "kvtuner_hicache.juicefs",
    "class_name": "JuiceFSStorage",
    "interface_v1": 1,
}


def test_loads_through_sglang_dynamic_factory(mnt):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    pool = make_mha_host_pool()
    fill_random(pool, seed=17)
    cfg = storage_config(mnt, **DYNAMIC)
    b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    assert isinstance(b, JuiceFSStorage)
    b.register_mem_pool_host(pool)  # what the cache controller does next
    keys = keys_for("dynamic", 2)
    assert b.batch_set_v1(keys, indices(pool, [0, 1])) == [True, True]
    assert b.batch_get_v1(keys, indices(pool, [2, 3])) == [True, True]
    assert page_bytes(pool, 3) == page_bytes(pool, 1)


def test_builtin_construction_form(mnt):
    """The patched factory branch calls cls(storage_config, mem_pool_host)."""
    pool = make_mha_host_pool()
    b = JuiceFSStorage(storage_config(mnt), pool)
    assert b.mem_pool_host is pool and b.ns_dir
    ns = b.ns_dir
    b.register_mem_pool_host(pool)  # the controller registers again: no change
    assert b.ns_dir == ns
    b.register_mem_host_pool_v2(pool, "kv")  # hybrid controllers re-announce the KV pool
    assert b.ns_dir == ns and b.pools.dirs() == []  # the KV pool keeps its namespace


def test_patched_factory_creates_juicefs(mnt):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    if "juicefs" not in StorageBackendFactory._registry:
        pytest.skip("this SGLang is not patched by kvtuner-patch (no 'juicefs' backend)")
    pool = make_mha_host_pool()
    b = StorageBackendFactory.create_backend("juicefs", storage_config(mnt), pool)
    assert type(b).__name__ == "JuiceFSStorage" and b.mem_pool_host is pool
    # The controller must pick the zero-copy v1 path for it, like for the other built-ins.
    import inspect

    from sglang.srt.managers.cache_controller import HiCacheController

    assert '"juicefs"' in inspect.getsource(HiCacheController.attach_storage_backend)


def test_standalone_package_loads_in_a_fresh_interpreter(mnt):
    """PYTHONPATH=patches only: SGLang's dynamic path imports the package on its own."""
    script = f"""
import json, torch, sys
sys.path.insert(0, {str(REPO / "tests" / "python")!r})
from juicefs_fixture import make_mha_host_pool, storage_config
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
pool = make_mha_host_pool()
pool.kv_buffer.view(torch.uint8).fill_(7)
cfg = storage_config({mnt!r}, **json.loads({json.dumps(json.dumps(DYNAMIC))}))
b = StorageBackendFactory.create_backend("dynamic", cfg, pool)
b.register_mem_pool_host(pool)
ok = b.batch_set_v1(["standalone"], torch.arange(16)) == [True]
ok &= b.batch_get_v1(["standalone"], torch.arange(16, 32)) == [True]
print("STANDALONE", type(b).__module__, ok)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "patches"))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "STANDALONE kvtuner_hicache.juicefs.storage True" in proc.stdout, proc.stderr[-3000:]
