"""JuiceFSStorage on a fleet: one volume on real Redis metadata, mounted twice (two servers,
each with its own backend and host pool). A page written by one server is a hit on the other,
and a restarted server serves what its previous life wrote.

Run: PYTHONPATH=patches $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest -rs tests/python/test_juicefs_fleet.py
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from juicefs_fixture import make_mha_host_pool
from juicefs_fleet_fixture import fill_random, fleet_server, indices, keys_for, page_bytes


@pytest.fixture
def root(request):
    """A root_dir per test, so tests on the session fleet never see each other's pages."""
    return f"t-{request.node.name}"[:100]


def test_fleet_is_one_volume_on_redis(fleet):
    from kvtuner_hicache.juicefs import mount_fstype

    assert fleet.redis.url.startswith("redis://127.0.0.1:")
    assert [mount_fstype(m)[1] for m in fleet.mnts] == ["fuse.juicefs"] * 2
    assert os.stat(fleet.mnts[0]).st_dev != os.stat(fleet.mnts[1]).st_dev  # two FUSE daemons


def test_page_written_on_one_server_is_a_hit_on_the_other(fleet, root):
    pool_a, pool_b = make_mha_host_pool(), make_mha_host_pool()
    fill_random(pool_a, seed=21)
    a = fleet_server(fleet.mnts[0], pool_a, root)
    b = fleet_server(fleet.mnts[1], pool_b, root)
    assert os.path.relpath(a.ns_dir, a.mount_point) == os.path.relpath(b.ns_dir, b.mount_point)
    keys = keys_for("cross", 8)
    expected = [page_bytes(pool_a, p) for p in range(8)]
    assert b.batch_exists(keys) == 0
    assert a.batch_set_v1(keys, indices(pool_a, range(8))) == [True] * 8
    # B: its own mount, backend and pool; nothing but the volume connects it to A.
    assert b.batch_exists(keys) == 8
    assert b.batch_exists(keys + keys_for("absent", 1)) == 8
    dst = list(range(8, 16))
    assert b.batch_get_v1(keys, indices(pool_b, dst)) == [True] * 8
    assert [page_bytes(pool_b, p) for p in dst] == expected
    # Both directions, and the legacy path too.
    keys_b = keys_for("cross-back", 2)
    fill_random(pool_b, seed=22)
    back = [page_bytes(pool_b, p) for p in (0, 1)]
    assert b.batch_set_v1(keys_b, indices(pool_b, [0, 1])) == [True, True]
    assert a.batch_exists(keys_b) == 2
    out = a.get(keys_b[1], pool_a.get_dummy_flat_data_page())
    assert out is not None and out.view(torch.uint8).numpy().tobytes() == back[1]
    # A second writer of the same key keeps the first copy (write-once across servers).
    assert b.batch_set_v1(keys[:1], indices(pool_b, [5])) == [True]
    assert b.counters["set_existing"] >= 1
    assert a.batch_get_v1(keys[:1], indices(pool_a, [20])) == [True]
    assert page_bytes(pool_a, 20) == expected[0]


def test_restarted_server_serves_old_pages_and_other_configs_never_see_them(make_fleet):
    f = make_fleet("kvrestart")
    pool = make_mha_host_pool()
    fill_random(pool, seed=23)
    keys = keys_for("restart", 6)
    expected = [page_bytes(pool, p) for p in range(6)]
    first = fleet_server(f.mnts[0], pool, "fleet")
    assert first.batch_set_v1(keys, indices(pool, range(6))) == [True] * 6
    first.close()
    del first
    # The whole server goes away: backend, host pool and its mount.
    f.mounts[0].umount()
    f.mounts[0].mount()
    for mount in f.mnts:  # the restarted server, and the other one
        fresh_pool = make_mha_host_pool()
        again = fleet_server(mount, fresh_pool, "fleet")
        assert again.batch_exists(keys) == 6
        assert again.batch_get_v1(keys, indices(fresh_pool, range(6, 12))) == [True] * 6
        assert [page_bytes(fresh_pool, p) for p in range(6, 12)] == expected
        again.close()

    # Another quantization config, another model, another TP rank: never the old pages.
    quant = make_mha_host_pool()
    quant.kvtuner_namespace_tag = lambda: "bf16-k4v4-g64"
    others = [
        fleet_server(f.mnts[1], quant, "fleet"),
        fleet_server(f.mnts[1], make_mha_host_pool(), "fleet", model="org/other-model"),
        fleet_server(f.mnts[1], make_mha_host_pool(), "fleet", tp_rank=1, tp_size=2),
    ]
    for other in others:
        assert other.batch_exists(keys) == 0
        assert other.batch_get_v1(keys[:2], indices(other.mem_pool_host, [0, 1])) == [False] * 2
    # ... and they left the old namespace alone.
    assert fleet_server(f.mnts[0], make_mha_host_pool(), "fleet").batch_exists(keys) == 6


def test_a_page_deleted_on_one_server_is_a_miss_and_absent_on_the_other(fleet, root):
    """B's kernel may still hold the entry and attributes of a file A just deleted (the mount's
    --entry-cache / --attr-cache, 1 s here): B's read then fails while a stat still succeeds.
    Once a read found the file gone, B must not report the key present."""
    pool_a, pool_b = make_mha_host_pool(), make_mha_host_pool()
    fill_random(pool_a, seed=23)
    a = fleet_server(fleet.mnts[0], pool_a, root)
    b = fleet_server(fleet.mnts[1], pool_b, root, exists_cache_ttl=0)
    keys = keys_for("gone", 4)
    assert a.batch_set_v1(keys, indices(pool_a, range(4))) == [True] * 4
    assert b.batch_exists(keys) == 4  # B's kernel now caches the entries
    for k in keys:
        os.unlink(a._path(k))  # as A's eviction does, through A's mount
    assert b.batch_get_v1(keys[:1], indices(pool_b, [8])) == [False]
    assert b.batch_exists(keys[:1]) == 0
    assert not b.exists(keys[0])
    # A page published again is found again at once (by this server).
    assert b.batch_set_v1(keys[:1], indices(pool_b, [0])) == [True]
    assert b.batch_exists(keys[:1]) == 1
