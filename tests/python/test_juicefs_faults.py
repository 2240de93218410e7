"""Fleet faults on real Redis metadata and two FUSE mounts: the metadata engine going away and
coming back, and one server's mount lazily unmounted.

Run: PYTHONPATH=patches $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest -rs tests/python/test_juicefs_faults.py
"""

from __future__ import annotations

import os
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from juicefs_fixture import make_mha_host_pool
from juicefs_fleet_fixture import fill_random, fleet_server, indices, keys_for, page_bytes
from kvtuner_hicache.juicefs import HEADER_SIZE
from sglang.srt.observability.metrics_collector import StorageMetrics


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_redis_down_gives_misses_then_service_resumes(make_fleet):
    f = make_fleet("kvredisdown")
    pool_a, pool_b = make_mha_host_pool(), make_mha_host_pool()
    fill_random(pool_a, seed=41)
    cap = 100 * (HEADER_SIZE + pool_a.page_size * pool_a.size_per_token)
    # A runs its maintenance thread (access log, lease, passes) all along.
    a = fleet_server(
        f.mnts[0],
        pool_a,
        "fleet",
        capacity_bytes=cap,
        evict_interval=0.5,
        access_flush_interval=0.2,
    )
    b = fleet_server(f.mnts[1], pool_b, "fleet")
    keys = keys_for("redis", 4)
    expected = [page_bytes(pool_a, p) for p in range(4)]
    assert a.batch_set_v1(keys, indices(pool_a, range(4))) == [True] * 4
    assert b.batch_exists(keys) == 4

    f.redis.stop()
    start = time.monotonic()

    # Every call returns (no exception into SGLang): misses and refused writes. Both servers
    # at once: each finds out on its own (JuiceFS retries each operation for 10-45 s here).
    def server_b():
        assert b.batch_get_v1(keys, indices(pool_b, range(4, 8))) == [False] * 4
        assert b.batch_exists(keys) == 0
        assert b.get(keys[0], pool_b.get_dummy_flat_data_page()) is None
        assert b.batch_set(keys_for("down-legacy", 1), [pool_b.get_data_page(0)]) is False

    def server_a():
        assert a.batch_set_v1(keys_for("down", 2), indices(pool_a, [0, 1])) == [False] * 2
        assert a.batch_get_v1(keys, indices(pool_a, range(4, 8))) == [False] * 4
        assert isinstance(a.get_stats(), StorageMetrics)

    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as e:  # reported below, with the thread's assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (server_a, server_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert a.counters["volume_outages"] == 1 and b.counters["volume_outages"] == 1
    # Once a server knows the volume is not answering, calls fail fast instead of each waiting
    # for JuiceFS's own retries.
    fast = time.monotonic()
    for _ in range(20):
        assert b.batch_exists(keys) == 0
        assert a.batch_set_v1(keys_for("down", 2), indices(pool_a, [0, 1])) == [False] * 2
    assert time.monotonic() - fast < 2.0
    down_for = time.monotonic() - start

    f.redis.start()
    assert _wait_for(lambda: b.batch_exists(keys) == 4, 120), "B did not resume"
    assert _wait_for(lambda: a.batch_exists(keys) == 4, 120), "A did not resume"
    assert b.batch_get_v1(keys, indices(pool_b, range(4, 8))) == [True] * 4
    assert [page_bytes(pool_b, p) for p in range(4, 8)] == expected
    later = keys_for("after", 2)
    assert a.batch_set_v1(later, indices(pool_a, [0, 1])) == [True, True]
    assert b.batch_exists(later) == 2
    assert down_for < 180
    for s in (a, b):
        s.close()


def test_lazy_unmount_of_one_server_leaves_the_other_serving(make_fleet):
    f = make_fleet("kvlazy")
    pool_a, pool_b = make_mha_host_pool(), make_mha_host_pool()
    fill_random(pool_a, seed=42)
    a, b = fleet_server(f.mnts[0], pool_a, "fleet"), fleet_server(f.mnts[1], pool_b, "fleet")
    keys = keys_for("lazy", 4)
    expected = [page_bytes(pool_a, p) for p in range(4)]
    assert a.batch_set_v1(keys, indices(pool_a, range(4))) == [True] * 4

    f.mounts[0].lazy_umount()
    assert a.batch_exists(keys) == 0
    assert a.batch_get_v1(keys, indices(pool_a, range(4, 8))) == [False] * 4
    assert a.batch_set_v1(keys_for("lazy-after", 1), indices(pool_a, [0])) == [False]
    assert not os.listdir(f.mnts[0])  # nothing written under the bare mount point
    # B: unaffected, reads A's pages and writes new ones.
    assert b.batch_exists(keys) == 4
    assert b.batch_get_v1(keys, indices(pool_b, range(4, 8))) == [True] * 4
    assert [page_bytes(pool_b, p) for p in range(4, 8)] == expected
    fill_random(pool_b, seed=43)
    assert b.batch_set_v1(keys_for("b-only", 2), indices(pool_b, [0, 1])) == [True, True]
    assert b.batch_exists(keys_for("b-only", 2)) == 2
    for s in (a, b):
        s.close()
