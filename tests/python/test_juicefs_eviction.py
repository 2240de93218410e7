"""Fleet-wide LRU eviction between watermarks, on real Redis metadata and two FUSE mounts.

Run: PYTHONPATH=patches $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest -rs tests/python/test_juicefs_eviction.py
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from juicefs_fixture import make_mha_host_pool, storage_config
from juicefs_fleet_fixture import fill_random, fleet_server, indices, keys_for, page_bytes
from kvtuner_hicache.juicefs import HEADER_SIZE, JuiceFSStorage

# Small pages (32 KiB) keep the test fast; the capacity is counted in pages.
CAPACITY_PAGES = 40  # high watermark 0.95: 38 pages; low 0.85: 34 pages
QUIET = dict(evict_interval=3600, access_flush_interval=3600, recency_resolution=0)


@pytest.fixture
def root(request):
    return f"e-{request.node.name}"[:100]


def server(mount, pool, root, **kw) -> JuiceFSStorage:
    """One server's backend; returns once its startup maintenance pass is over, so a test
    controls every later pass."""
    b = fleet_server(mount, pool, root, **kw)
    assert b.wait_for_maintenance(60)
    return b


def capacity_for(pool, pages=CAPACITY_PAGES) -> int:
    return pages * (HEADER_SIZE + pool.page_size * pool.size_per_token)


def page_files(ns_dir):
    """What the test counts itself: page files under the namespace's shard directories."""
    found = []
    for shard in os.listdir(ns_dir):
        if len(shard) == 2:
            found += [n for n in os.listdir(os.path.join(ns_dir, shard)) if n.endswith(".kvp")]
    return found


def snapshot(ns_dir):
    """(name, size, mtime, inode) of every file of a namespace."""
    out = set()
    for dirpath, _, files in os.walk(ns_dir):
        for n in files:
            st = os.stat(os.path.join(dirpath, n))
            out.add((os.path.join(dirpath, n), st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def test_options_are_validated(tmp_path):
    for bad in (
        {"high_watermark": 1.5},
        {"low_watermark": 0},
        {"high_watermark": 0.8, "low_watermark": 0.9},
        {"evict_interval": 0},
        {"recency_resolution": -1},
    ):
        with pytest.raises(ValueError, match="|".join(bad)):
            JuiceFSStorage(storage_config(str(tmp_path), capacity_bytes="1GiB", **bad), {})
    ok = JuiceFSStorage(storage_config(str(tmp_path), capacity_bytes="1GiB"), {}).options
    assert (ok.high_watermark, ok.low_watermark) == (0.95, 0.85)


def test_two_servers_fill_past_high_watermark_lru_pages_go(fleet, root, caplog):
    pools = [make_mha_host_pool(), make_mha_host_pool()]
    for i, p in enumerate(pools):
        fill_random(p, seed=30 + i)
    cap = capacity_for(pools[0])
    a = server(fleet.mnts[0], pools[0], root, capacity_bytes=cap, **QUIET)
    b = server(fleet.mnts[1], pools[1], root, capacity_bytes=cap, **QUIET)
    file_bytes = HEADER_SIZE + a.page_bytes
    # Another namespace on the same volume and root, with the same capacity: never touched.
    other = server(
        fleet.mnts[0], make_mha_host_pool(), root, model="org/other", capacity_bytes=cap, **QUIET
    )
    other_keys = keys_for("other", 12)
    assert other.batch_set_v1(other_keys, indices(other.mem_pool_host, range(12))) == [True] * 12
    other_before = snapshot(other.ns_dir)

    # 30 old pages from A; then B reads 10 of them (the hot ones); then both servers add 20 new
    # pages at once: 50 pages > 38 (high), so 16 must go, and only cold old pages qualify.
    old = keys_for("old", 30)
    for i in range(0, 30, 10):
        assert a.batch_set_v1(old[i : i + 10], indices(pools[0], range(10))) == [True] * 10
    expected = {k: page_bytes(pools[0], i % 10) for i, k in enumerate(old)}
    time.sleep(0.05)  # hot reads strictly later than every old write
    hot = old[5:15]
    assert b.batch_get_v1(hot, indices(pools[1], range(10))) == [True] * 10
    time.sleep(0.05)
    new_a, new_b = keys_for("new-a", 10), keys_for("new-b", 10)
    expected.update({k: page_bytes(pools[0], i) for i, k in enumerate(new_a)})
    expected.update({k: page_bytes(pools[1], i) for i, k in enumerate(new_b)})
    barrier = threading.Barrier(2)

    def fill(srv, keys):
        barrier.wait()
        return srv.batch_set_v1(keys, indices(srv.mem_pool_host, range(10)))

    results = {}
    threads = [
        threading.Thread(target=lambda s=s, k=k: results.__setitem__(id(s), fill(s, k)))
        for s, k in ((a, new_a), (b, new_b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[id(a)] == [True] * 10 and results[id(b)] == [True] * 10
    assert len(page_files(a.ns_dir)) == 50

    # Both maintenance threads wake at once (after their access logs reached the volume);
    # a reader on B keeps reading meanwhile.
    assert a.flush_access_log() and b.flush_access_log()
    caplog.set_level(logging.INFO)
    stop, seen = threading.Event(), {"hits": 0, "misses": 0, "bad": []}
    reader_pool = make_mha_host_pool()
    reader = server(fleet.mnts[1], reader_pool, root, **QUIET)

    def read_all():
        while not stop.is_set():
            for k in list(expected):
                ok = reader.batch_get_v1([k], indices(reader_pool, [15]))[0]
                if ok and page_bytes(reader_pool, 15) != expected[k]:
                    seen["bad"].append(k)
                seen["hits" if ok else "misses"] += 1

    rt = threading.Thread(target=read_all)
    rt.start()
    passes = {}
    try:
        barrier = threading.Barrier(2)
        workers = [
            threading.Thread(
                target=lambda s=s: (barrier.wait(), passes.__setitem__(id(s), s.maintain()))
            )
            for s in (a, b)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        stop.set()
        rt.join()
    assert not seen["bad"], f"pages read with wrong bytes: {seen['bad']}"
    assert seen["hits"] > 0

    evicting = [s for s in (a, b) if passes[id(s)] and passes[id(s)].evicted_pages]
    assert len(evicting) == 1, "exactly one server holds the lease and evicts"
    left = set(page_files(a.ns_dir))
    assert len(left) * file_bytes <= 0.85 * cap  # at or below the low watermark
    assert len(left) == 34
    names = {k: os.path.basename(a._path(k)) for k in expected}
    gone = {k for k, n in names.items() if n not in left}
    assert len(gone) == 16
    assert gone <= set(old) - set(hot), "only cold old pages are evicted"
    assert set(hot) | set(new_a) | set(new_b) <= {k for k in names if k not in gone}
    assert evicting[0].counters["evicted_pages"] == 16
    assert evicting[0].counters["evicted_bytes"] == 16 * file_bytes
    assert "evicted 16 pages" in caplog.text
    # Every survivor still reads back bit-identical, on both servers.
    for srv in (a, b):
        for k in expected:
            if k not in gone:
                assert srv.batch_get_v1([k], indices(srv.mem_pool_host, [14])) == [True]
                assert page_bytes(srv.mem_pool_host, 14) == expected[k]
            else:  # a miss; and no longer reported present afterwards
                assert srv.batch_get_v1([k], indices(srv.mem_pool_host, [14])) == [False]
                assert srv.batch_exists([k]) == 0
    assert snapshot(other.ns_dir) == other_before  # the other namespace: not one file touched
    assert other.batch_exists(other_keys) == 12
    for s in (a, b, other, reader):
        s.close()


def test_background_eviction_keeps_namespace_under_high_watermark(fleet, root):
    pools = [make_mha_host_pool(), make_mha_host_pool()]
    cap = capacity_for(pools[0])
    live = dict(evict_interval=0.1, access_flush_interval=0.1, recency_resolution=0)
    servers = [server(m, p, root, capacity_bytes=cap, **live) for m, p in zip(fleet.mnts, pools)]
    file_bytes = HEADER_SIZE + servers[0].page_bytes
    accepted = []
    for round_ in range(15):  # 2 servers x 15 rounds x 2 pages = 1.5x the capacity
        for i, srv in enumerate(servers):
            keys = keys_for(f"bg-{i}-{round_}", 2)
            ok = srv.batch_set_v1(keys, indices(srv.mem_pool_host, range(2)))
            accepted += [k for k, good in zip(keys, ok) if good]
        time.sleep(0.25)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(page_files(servers[0].ns_dir)) * file_bytes <= 0.95 * cap:
            break
        time.sleep(0.1)
    assert len(page_files(servers[0].ns_dir)) * file_bytes <= 0.95 * cap
    assert len(accepted) > 38, "the fill went past the high watermark"
    assert sum(s.counters["evicted_pages"] for s in servers) >= len(accepted) - 38
    assert sum(s.counters["eviction_passes"] for s in servers) > 0
    # The newest accepted pages survive (the oldest went first).
    newest = accepted[-20:]
    assert all(os.path.exists(servers[0]._path(k)) for k in newest)
    for s in servers:
        s.close()


def test_recency_survives_restart(fleet, root):
    pool = make_mha_host_pool()
    fill_random(pool, seed=33)
    cap = capacity_for(pool, 20)  # high 19 pages, low 17
    first = server(fleet.mnts[0], pool, root, capacity_bytes=cap, **QUIET)
    keys = keys_for("restart-lru", 18)
    # Write order: keys[:6], then keys[6:]; then keys[:3] are read: the least recently used
    # are keys[3:6] (written first, never read), although keys[:3] were written as early.
    assert first.batch_set_v1(keys[:6], indices(pool, range(6))) == [True] * 6
    time.sleep(0.05)
    assert first.batch_set_v1(keys[6:], indices(pool, range(12))) == [True] * 12
    time.sleep(0.05)
    assert first.batch_get_v1(keys[:3], indices(pool, [13, 14, 15])) == [True] * 3
    first.close()  # flushes its access log; the process state is gone after this
    del first
    # The restarted server (on the other mount) adds 2 pages: 20 > 19, evict down to 17.
    again = server(fleet.mnts[1], make_mha_host_pool(), root, capacity_bytes=cap, **QUIET)
    extra = keys_for("restart-extra", 2)
    assert again.batch_set_v1(extra, indices(again.mem_pool_host, [0, 1])) == [True, True]
    result = again.maintain()
    assert result is not None and result.evicted_pages == 3
    assert [again.exists(k) for k in keys[3:6]] == [False] * 3
    assert again.batch_exists(keys[:3]) == 3
    assert again.batch_exists(keys[6:]) == 12 and again.batch_exists(extra) == 2
    again.close()


def test_one_evictor_at_a_time_and_takeover(fleet, root):
    pool = make_mha_host_pool()
    cap = capacity_for(pool)
    a = server(fleet.mnts[0], pool, root, capacity_bytes=cap, **QUIET)
    b = server(fleet.mnts[1], make_mha_host_pool(), root, capacity_bytes=cap, **QUIET)
    assert a.evictor.hold_lease() and not b.evictor.hold_lease()
    assert a.evictor.hold_lease()  # renewal
    a.close()  # a clean shutdown releases the lease
    # B's kernel may show the old lease file for up to --entry-cache (1 s).
    assert _wait_for(b.evictor.hold_lease, 10) and not a.evictor.still_holds_lease()
    # A holder that died: its lease expires and is taken over.
    c = server(fleet.mnts[0], make_mha_host_pool(), root, capacity_bytes=cap, **QUIET)
    b.evictor.lease_seconds = 0.5
    assert b.evictor.hold_lease()
    assert not c.evictor.hold_lease()
    b.evictor.lease_seconds = 3600  # B would renew a live lease; this one must expire
    time.sleep(0.6)
    assert _wait_for(c.evictor.hold_lease, 10)
    assert not b.evictor.still_holds_lease() and not b.evictor.hold_lease()
    assert c.evictor.hold_lease()  # C renews; B's stale view never took it back
    for s in (b, c):
        s.close()


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_closed_log_epochs_fold_into_a_checkpoint(fleet, root):
    pool = make_mha_host_pool()
    cap = capacity_for(pool, 20)  # high 19 pages, low 17
    a = server(fleet.mnts[0], pool, root, capacity_bytes=cap, **QUIET)
    a.evictor.epoch_seconds = 0.3  # epochs close within the test (600 s in service)
    keys = keys_for("fold", 18)
    # Same story as the restart test, each step flushed into its own epoch.
    for step in (
        lambda: a.batch_set_v1(keys[:6], indices(pool, range(6))),
        lambda: a.batch_set_v1(keys[6:], indices(pool, range(12))),
        lambda: a.batch_get_v1(keys[:3], indices(pool, [13, 14, 15])),
    ):
        assert all(step())
        assert a.flush_access_log()
        time.sleep(0.35)
    time.sleep(0.6)  # every epoch written so far is now closed
    lru = os.path.join(a.ns_dir, ".lru")
    epochs = [d for d in os.listdir(lru) if d.isdigit()]
    assert len(epochs) >= 3
    folded = a.maintain()  # below the high watermark: folds only
    assert folded.evicted_pages == 0 and folded.folded_epochs == len(epochs)
    assert not [d for d in os.listdir(lru) if d.isdigit()]
    with open(os.path.join(lru, "checkpoint")) as f:
        assert len(f.read().splitlines()) == 18
    # The folded recency still decides: 2 more pages, and keys[3:6] go.
    extra = keys_for("fold-extra", 2)
    assert a.batch_set_v1(extra, indices(pool, [0, 1])) == [True, True]
    result = a.maintain()
    assert result.evicted_pages == 3
    assert [a.exists(k) for k in keys[3:6]] == [False] * 3
    assert a.batch_exists(keys[:3]) == 3 and a.batch_exists(keys[6:]) == 12
    a.close()
