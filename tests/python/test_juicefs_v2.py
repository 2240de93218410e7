"""JuiceFSStorage's v2 interface (hybrid models' pools) against SGLang's own ``HiCacheFile``,
on a real JuiceFS mount with SGLang's own host pools on CPU (an MHA KV pool plus
``MambaPoolHost``, and an MLA pool plus ``DSAIndexerPoolHost``): the same calls give the same
``PoolTransferResult`` and the same bytes. Where a release's ``MambaPoolHost`` cannot be built
here, an MHA host pool of one token per page stands in for the state pool.

Run:
    $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest -rs tests/python/test_juicefs_v2.py
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time

import pytest

torch = pytest.importorskip("torch")
hs = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
if not hasattr(hs, "PoolTransfer"):
    pytest.skip("SGLang before 0.5.10 has no v2 storage interface", allow_module_level=True)
from juicefs_fixture import make_mamba_host_pool, make_mha_host_pool, storage_config
from kvtuner_hicache.juicefs import JuiceFSStorage

PoolName, PoolTransfer, Policy = hs.PoolName, hs.PoolTransfer, hs.PoolHitPolicy
KV, MAMBA = PoolName.KV, PoolName.MAMBA
PAGES = 8
KV_PAGE = 4  # tokens per KV page
DSA_PAGE = 64  # tokens per MLA page with a DSA indexer


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def mnt(juicefs_volume, request):
    """A fresh directory on the shared volume per test."""
    path = os.path.join(juicefs_volume.mnt, f"v2-{request.node.name}"[:120])
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def make_state_pool(dtype=None):
    """A state pool: SGLang's MambaPoolHost, else an MHA pool of one token per page."""
    try:
        return make_mamba_host_pool(conv_dtype=dtype)
    except (ImportError, TypeError):  # a release whose pool is built otherwise
        return make_mha_host_pool("page_first", page_size=1, tokens=32, dtype=dtype)


def buffers(pool):
    """The host memory of a pool made above."""
    if hasattr(pool, "temporal_buffer"):
        return [pool.temporal_buffer, *pool.conv_buffer]
    return [pool.kv_buffer]


def restorable(result):
    """``restorable_prefix_pages`` (0.5.19+), else None."""
    return getattr(result, "restorable_prefix_pages", None)


class Side:
    """One backend with its own host pools (KV and state), filled with the same bytes."""

    def __init__(self, backend, seed=0):
        self.kv = make_mha_host_pool("page_first", page_size=KV_PAGE, tokens=64)
        self.mamba = make_state_pool()
        g = torch.Generator().manual_seed(seed)
        for t in buffers(self.kv) + buffers(self.mamba):
            raw = t.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
        self.snapshot = {"kv": self.kv_pages(), "mamba": self.mamba_pages()}
        self.b = backend
        self.b.register_mem_pool_host(self.kv)
        self.b.register_mem_host_pool_v2(self.kv, KV)
        self.b.register_mem_host_pool_v2(self.mamba, MAMBA)

    def kv_pages(self):
        return [
            self.kv.get_data_page(p * KV_PAGE, flat=True).view(torch.uint8).clone()
            for p in range(PAGES)
        ]

    def mamba_pages(self):
        return [
            self.mamba.get_data_page(p, flat=True).view(torch.uint8).clone() for p in range(PAGES)
        ]

    def wipe(self):
        for t in buffers(self.kv) + buffers(self.mamba):
            t.view(torch.uint8).zero_()


def keys_for(prefix, n=PAGES):
    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]


def kv_indices(pages):
    return torch.cat([torch.arange(p * KV_PAGE, (p + 1) * KV_PAGE) for p in pages])


def transfer(name, keys, pages, policy=Policy.ALL_PAGES):
    idx = kv_indices(pages) if name == KV else torch.tensor(pages, dtype=torch.int64)
    return PoolTransfer(
        name=name, host_indices=idx, keys=[keys[p] for p in pages], hit_policy=policy
    )


def reference_backend(directory, **config):
    """SGLang's ``HiCacheFile`` storing under ``directory`` (before 0.5.22 it reads the directory
    from its argument only, not from the extra config: else it would use /tmp/hicache)."""
    cfg = storage_config(None, file_storage_path=directory, **config)
    return hs.HiCacheFile(cfg, file_path=directory)


@pytest.fixture
def pair(mnt, tmp_path):
    """Our backend on the mount and SGLang's HiCacheFile (on the same mount), with equal pools."""
    ours = Side(JuiceFSStorage(storage_config(mnt), {}))
    ref_dir = os.path.join(mnt, "hicache-file")
    ref = Side(reference_backend(ref_dir))
    yield ours, ref
    ours.b.close()


def both(pair, method, *args):
    """Call ``method`` on both backends: equal results (multi-pool lookups before 0.5.23: ours
    never longer)."""
    ours, ref = pair
    got = getattr(ours.b, method)(*args)
    want = getattr(ref.b, method)(*args)
    if isinstance(want, hs.PoolTransferResult) and restorable(want) is None and len(args[1]) > 1:
        # Before 0.5.23 HiCacheFile answered the least of the pools' longest lengths, which one
        # pool may be unable to restore; the intersection's longest is never longer.
        assert got.kv_hit_pages <= want.kv_hit_pages, method
    elif isinstance(want, hs.PoolTransferResult):
        assert (got.kv_hit_pages, dict(got.extra_pool_hit_pages)) == (
            want.kv_hit_pages,
            dict(want.extra_pool_hit_pages),
        ), method
        # 0.5.19 - 0.5.22's HiCacheFile leaves the field None (only Mooncake reads it there).
        assert restorable(want) in (None, restorable(got)), method
    else:
        assert got == want, method
    return got


# --------------------------------------------------------------------------- differential


def test_same_results_and_bytes_as_hicache_file(pair):
    keys = keys_for("diff")
    kv_written = [0, 1, 2, 3, 4, 5, 6]  # page 7's KV missing
    mamba_written = [0, 1, 2, 4, 5, 7]  # pages 3 and 6 missing: holes in the state
    res = both(
        pair,
        "batch_set_v2",
        [transfer(KV, keys, kv_written), transfer(MAMBA, keys, mamba_written)],
    )
    assert res[KV] == [True] * 7 and res[MAMBA] == [True] * 6

    # Lookups: every hit policy, window and combination gives HiCacheFile's answer.
    for n in (1, 2, 3):
        tail = keys[PAGES - n :]
        t = PoolTransfer(name=MAMBA, keys=tail, hit_policy=Policy.TRAILING_PAGES)
        both(pair, "batch_exists_v2", keys, [t])
        both(pair, "batch_exists_v2", keys[:5], [t])
    all_pages = PoolTransfer(name=MAMBA, keys=keys, hit_policy=Policy.ALL_PAGES)
    r = both(pair, "batch_exists_v2", keys, [all_pages])
    assert r.kv_hit_pages == 3 and restorable(r) in (None, [1, 2, 3])
    trailing = PoolTransfer(name=MAMBA, keys=keys[-1:], hit_policy=Policy.TRAILING_PAGES)
    r = both(pair, "batch_exists_v2", keys, [trailing])
    # KV stops at 7 pages; prefixes of 4 and 7 pages end on a missing state page (3, 6).
    assert r.kv_hit_pages == 6 and restorable(r) in (None, [1, 2, 3, 5, 6])
    both(pair, "batch_exists_v2", keys, [trailing, all_pages])
    both(pair, "batch_exists_v2", keys, [PoolTransfer(name=KV, keys=keys), trailing])
    both(pair, "batch_exists_v2", keys, [all_pages, trailing])
    both(pair, "batch_exists_v2", keys, [])
    both(pair, "batch_exists_v2", keys_for("absent"), [trailing])
    both(pair, "batch_exists_v2", [], [trailing])

    # Reads into wiped pools: same flags, same bytes, and the bytes that were written.
    ours, ref = pair
    ours.wipe(), ref.wipe()
    everything = list(range(PAGES))
    res = both(
        pair, "batch_get_v2", [transfer(KV, keys, everything), transfer(MAMBA, keys, everything)]
    )
    assert res[KV] == [p in kv_written for p in everything]
    assert res[MAMBA] == [p in mamba_written for p in everything]
    for side in (ours, ref):
        for p in everything:
            kv_ok = torch.equal(side.kv_pages()[p], side.snapshot["kv"][p])
            mamba_ok = torch.equal(side.mamba_pages()[p], side.snapshot["mamba"][p])
            assert kv_ok == (p in kv_written) and mamba_ok == (p in mamba_written), p
    for a, b in zip(ours.kv_pages() + ours.mamba_pages(), ref.kv_pages() + ref.mamba_pages()):
        assert torch.equal(a, b)


def test_random_holes_give_hicache_file_s_answers(pair):
    """Many patterns of missing KV and state pages, every policy mix: the same lookups."""
    import random

    rng = random.Random(23)
    for round_ in range(12):
        keys = keys_for(f"random-{round_}")
        kv_written = sorted(rng.sample(range(PAGES), rng.randint(4, PAGES)))
        state_written = sorted(rng.sample(range(PAGES), rng.randint(2, PAGES)))
        both(
            pair,
            "batch_set_v2",
            [transfer(KV, keys, kv_written), transfer(MAMBA, keys, state_written)],
        )
        for _ in range(4):
            transfers = [
                PoolTransfer(
                    name=MAMBA,
                    keys=keys[PAGES - rng.randint(1, 4) :],
                    hit_policy=rng.choice([Policy.ALL_PAGES, Policy.TRAILING_PAGES]),
                )
                for _ in range(rng.randint(1, 3))
            ]
            both(pair, "batch_exists_v2", keys[: rng.randint(1, PAGES)], transfers)


def test_pools_have_their_own_checksummed_namespaces(pair):
    ours = pair[0].b
    keys = keys_for("ns")
    ours.batch_set_v2([transfer(KV, keys, [0, 1]), transfer(MAMBA, keys, [0, 1])])
    (pool_dir,) = ours.pools.dirs()
    assert os.path.dirname(pool_dir) == ours.ns_dir
    assert os.path.basename(pool_dir).startswith("pool-mamba__tp0of1__")
    assert os.path.isfile(os.path.join(pool_dir, "namespace.json"))
    kv_file, state_file = ours._path(keys[0]), ours.pools.pools["mamba"].space.path(keys[0])
    assert os.path.isfile(kv_file) and os.path.isfile(state_file) and kv_file != state_file
    # A state page copied over another key's is a miss (the key tag), never that key's state.
    os.unlink(ours.pools.pools["mamba"].space.path(keys[1]))
    shutil.copy(state_file, ours.pools.pools["mamba"].space.path(keys[1]))
    res = ours.batch_get_v2([transfer(MAMBA, keys, [0, 1])])
    assert res[MAMBA] == [True, False]


# --------------------------------------------------------------------------- bad input


def files_under(path):
    return sorted(f for f in glob.glob(f"{path}/**/*.kvp", recursive=True))


def test_torn_state_page_is_a_miss_and_restorable_shrinks(pair, mnt):
    ours = pair[0].b
    keys = keys_for("torn")
    ours.batch_set_v2([transfer(KV, keys, [0, 1, 2]), transfer(MAMBA, keys, [0, 1, 2])])
    path = ours.pools.pools["mamba"].space.path(keys[2])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    # Another server on the volume (nothing cached): the torn state page is not there.
    reader = Side(JuiceFSStorage(storage_config(mnt), {})).b
    t = PoolTransfer(name=MAMBA, keys=keys[2:3], hit_policy=Policy.TRAILING_PAGES)
    r = reader.batch_exists_v2(keys[:3], [t])
    assert r.kv_hit_pages == 2 and restorable(r) in (None, [1, 2])
    reader.close()
    # The writer's presence cache still vouches for it; its read is the miss.
    assert ours.batch_get_v2([transfer(MAMBA, keys, [2])])[MAMBA] == [False]
    assert ours.batch_exists_v2(keys[:3], [t]).kv_hit_pages == 2
    # A checksum mismatch (same size) is a miss too; the writer drops the file.
    path = ours.pools.pools["mamba"].space.path(keys[1])
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert ours.batch_get_v2([transfer(MAMBA, keys, [1])])[MAMBA] == [False]
    assert not os.path.exists(path)


def test_unknown_pool_and_mismatched_indices_write_nothing(pair):
    ours = pair[0].b
    keys = keys_for("bad")
    before = files_under(ours.ns_dir)
    unknown = PoolTransfer(name="swa", host_indices=torch.arange(2), keys=keys[:2])
    assert ours.batch_set_v2([unknown]) == {"swa": [False, False]}
    assert ours.batch_get_v2([unknown]) == {"swa": [False, False]}
    short = PoolTransfer(name=MAMBA, host_indices=torch.arange(1), keys=keys[:2])
    short_kv = PoolTransfer(name=KV, host_indices=torch.arange(KV_PAGE), keys=keys[:2])
    assert ours.batch_set_v2([short, short_kv]) == {MAMBA: [False, False], KV: [False, False]}
    assert files_under(ours.ns_dir) == before
    # An unknown pool holds nothing: it restores no prefix (HiCacheFile's answer too).
    both(pair, "batch_set_v2", [transfer(KV, keys, [0, 1])])
    r = both(pair, "batch_exists_v2", keys[:2], [PoolTransfer(name="swa", keys=keys[:2])])
    assert r.kv_hit_pages == 0


@pytest.mark.skipif(not hasattr(Policy, "BLOCK_GROUPS"), reason="BLOCK_GROUPS is 0.5.22+")
def test_block_groups_is_refused_never_a_hit(pair):
    ours = pair[0].b
    keys = keys_for("blocks")
    blocks = PoolTransfer(
        name=MAMBA,
        host_indices=torch.arange(2),
        keys=keys[:2],
        hit_policy=Policy.BLOCK_GROUPS,
        block_pages=1,
        group_pages=1,
    )
    assert ours.batch_set_v2([blocks]) == {MAMBA: [False, False]}
    assert files_under(ours.pools.pools["mamba"].space.ns_dir) == []
    ours.batch_set_v2([transfer(KV, keys, [0, 1]), transfer(MAMBA, keys, [0, 1])])
    assert ours.batch_get_v2([blocks]) == {MAMBA: [False, False]}
    r = ours.batch_exists_v2(keys[:2], [blocks])
    # The pool reports no pages of its own; it does not gate the KV hit (as in 0.5.23).
    assert r.extra_pool_hit_pages[MAMBA] == 0 and r.kv_hit_pages == 2


def test_pool_registered_after_start_up(pair):
    ours = pair[0].b
    keys = keys_for("late")
    ours.batch_set_v2([transfer(KV, keys, [0, 1])])
    draft = make_state_pool()
    buffers(draft)[0].view(torch.uint8).fill_(7)
    late = PoolTransfer(name="draft", host_indices=torch.arange(2), keys=keys[:2])
    assert ours.batch_set_v2([late]) == {"draft": [False, False]}  # not registered yet
    ours.register_mem_host_pool_v2(draft, "draft")
    assert ours.batch_set_v2([late]) == {"draft": [True, True]}
    late_page = draft.get_data_page(1, flat=True).clone()
    buffers(draft)[0].view(torch.uint8).zero_()
    assert ours.batch_get_v2([late]) == {"draft": [True, True]}
    assert torch.equal(draft.get_data_page(1, flat=True), late_page)
    r = ours.batch_exists_v2(keys[:2], [PoolTransfer(name="draft", keys=keys[:2])])
    assert r.kv_hit_pages == 2 and r.extra_pool_hit_pages["draft"] == 2


def test_state_of_another_shape_is_never_read(mnt):
    keys = keys_for("shape")
    writer = Side(JuiceFSStorage(storage_config(mnt), {}))
    writer.b.batch_set_v2([transfer(KV, keys, [0]), transfer(MAMBA, keys, [0])])
    other = JuiceFSStorage(storage_config(mnt), {})
    other.register_mem_pool_host(writer.kv)
    other.register_mem_host_pool_v2(make_state_pool(torch.float16), MAMBA)
    assert other.pools.dirs() != writer.b.pools.dirs()
    t = PoolTransfer(name=MAMBA, keys=keys[:1], hit_policy=Policy.TRAILING_PAGES)
    assert other.batch_exists_v2(keys[:1], [t]).kv_hit_pages == 0
    assert writer.b.batch_exists_v2(keys[:1], [t]).kv_hit_pages == 1
    writer.b.close(), other.close()


def test_pool_without_page_forms_is_refused_at_registration(pair):
    class Opaque:
        page_size = 1

    with pytest.raises(ValueError, match="neither get_page_buffer_meta nor flat data pages"):
        pair[0].b.register_mem_host_pool_v2(Opaque(), "indexer")


def test_clear_removes_every_pool_s_pages(pair):
    ours = pair[0].b
    keys = keys_for("clear")
    ours.batch_set_v2([transfer(KV, keys, [0, 1]), transfer(MAMBA, keys, [0, 1])])
    assert len(files_under(ours.ns_dir)) == 4
    assert ours.clear()
    assert files_under(ours.ns_dir) == []


def test_patched_factory_backend_serves_v2(mnt):
    """The built-in ``juicefs`` of a patched tree (the injected package) stores a hybrid pool."""
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    if "juicefs" not in StorageBackendFactory._registry:
        pytest.skip("this SGLang is not patched by kvtuner-patch (no 'juicefs' backend)")
    kv, state = make_mha_host_pool("page_first", page_size=KV_PAGE, tokens=64), make_state_pool()
    b = StorageBackendFactory.create_backend("juicefs", storage_config(mnt), kv)
    assert type(b).__module__.startswith("sglang.srt.mem_cache.kvtuner_hicache.juicefs")
    b.register_mem_pool_host(kv)
    b.register_mem_host_pool_v2(state, MAMBA)
    keys = keys_for("patched", 2)
    res = b.batch_set_v2([transfer(KV, keys, [0, 1]), transfer(MAMBA, keys, [0, 1])])
    assert res == {KV: [True, True], MAMBA: [True, True]}
    t = PoolTransfer(name=MAMBA, keys=keys[1:], hit_policy=Policy.TRAILING_PAGES)
    assert b.batch_exists_v2(keys, [t]).kv_hit_pages == 2
    b.close()


def test_sidecar_registered_while_the_volume_is_away(make_volume):
    """A dynamic sidecar arriving while the volume is unmounted: no exception into SGLang, its
    transfers miss, and nothing lands on the local disk under the bare mount point."""
    vol = make_volume("kvv2away")
    b = Side(JuiceFSStorage(storage_config(vol.mnt), {})).b
    vol.umount()
    b.register_mem_host_pool_v2(make_state_pool(), "draft")
    late = PoolTransfer(name="draft", host_indices=torch.arange(2), keys=keys_for("a", 2))
    assert b.batch_set_v2([late]) == {"draft": [False, False]}
    assert b.batch_get_v2([late]) == {"draft": [False, False]}
    assert os.listdir(vol.mnt) == []
    b.close()


def test_mla_ranks_share_replicated_pools_and_shard_mamba(mnt):
    """MLA (e.g. Kimi-K3: MLA KV plus Mamba state): KV and the indexer are one copy written by
    the writer rank and read by every rank; Mamba state is per TP rank, written by each."""
    keys = keys_for("mla")
    ranks = []
    for rank in (0, 1):
        side = Side(JuiceFSStorage(storage_config(mnt, is_mla=True, tp_rank=rank, tp_size=2), {}))
        side.b.register_mem_host_pool_v2(side.mamba, "indexer")  # any pool stands in
        ranks.append(side)
    r0, r1 = ranks[0].b, ranks[1].b
    assert r0.ns_dir == r1.ns_dir
    indexer = [transfer("indexer", keys, [0, 1])]
    assert r1.batch_set_v2(indexer) == {"indexer": [True, True]}  # not its copy to write
    assert files_under(r1.pools.pools["indexer"].space.ns_dir) == []
    assert r0.batch_set_v2([transfer(KV, keys, [0, 1]), *indexer])["indexer"] == [True] * 2
    for b in (r0, r1):
        assert b.batch_set_v2([transfer(MAMBA, keys, [0, 1])]) == {MAMBA: [True, True]}
    assert os.path.basename(r1.pools.pools["mamba"].space.ns_dir).startswith("pool-mamba__tp1of2")
    assert r0.pools.pools["indexer"].space.ns_dir == r1.pools.pools["indexer"].space.ns_dir
    ranks[1].wipe()
    got = r1.batch_get_v2([transfer(KV, keys, [0, 1]), *indexer, transfer(MAMBA, keys, [0, 1])])
    assert got == {KV: [True] * 2, "indexer": [True] * 2, MAMBA: [True] * 2}
    assert all(
        torch.equal(a, b) for a, b in zip(ranks[1].mamba_pages()[:2], ranks[1].snapshot["mamba"])
    )
    r0.close(), r1.close()


def test_pool_names_spelled_by_value_as_0_5_10_passes_them(mnt):
    """0.5.10 - 0.5.11's ``PoolName`` has no ``__str__`` (``str()`` gives "PoolName.MAMBA"):
    the backend spells a pool by its value, so the KV pool is recognised and an MLA model's
    Mamba state stays per TP rank there as on later releases."""
    from enum import Enum

    class EarlyPoolName(str, Enum):  # the shape of 0.5.10's enum: string values, no __str__
        KV = "kv"
        MAMBA = "mamba"

    assert str(EarlyPoolName.MAMBA) != "mamba"
    keys = keys_for("early-enum", 2)
    dirs = []
    for rank in (0, 1):
        b = JuiceFSStorage(storage_config(mnt, is_mla=True, tp_rank=rank, tp_size=2), {})
        kv = make_mha_host_pool("page_first", page_size=KV_PAGE, tokens=64)
        b.register_mem_pool_host(kv)
        b.register_mem_host_pool_v2(kv, EarlyPoolName.KV)
        b.register_mem_host_pool_v2(make_state_pool(), EarlyPoolName.MAMBA)
        assert list(b.pools.pools) == ["mamba"]
        dirs.append(os.path.basename(b.pools.pools["mamba"].space.ns_dir))
        state = PoolTransfer(name=EarlyPoolName.MAMBA, host_indices=torch.arange(2), keys=keys)
        assert b.batch_set_v2([state]) == {EarlyPoolName.MAMBA: [True, True]}
        b.close()
    assert [d.split("__")[:2] for d in dirs] == [["pool-mamba", "tp0of2"], ["pool-mamba", "tp1of2"]]


def host_pool_class(name):
    """A host pool class wherever the release keeps it (``pool_host/`` or ``memory_pool_host``)."""
    import importlib

    for module in ("pool_host.mla", "pool_host.dsa", "memory_pool_host"):
        try:
            return getattr(importlib.import_module(f"sglang.srt.mem_cache.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"no {name} in this SGLang")


def make_mla_dsa_pools(seed):
    """SGLang's MLA host pool and its DSA indexer sidecar (DeepSeek-V3.2, GLM-5) on CPU, built
    from a CPU DSATokenToKVPool as the release builds them; random bytes."""
    from sglang.srt.mem_cache.memory_pool import DSATokenToKVPool

    mla_host, indexer_host = (
        host_pool_class(n) for n in ("MLATokenToKVPoolHost", "DSAIndexerPoolHost")
    )
    geometry = dict(
        size=256,
        page_size=DSA_PAGE,
        kv_lora_rank=512,
        dtype=torch.bfloat16,
        qk_rope_head_dim=64,
        layer_num=2,
        device="cpu",
        index_head_dim=128,
        enable_memory_saver=False,
        kv_cache_dim=576,
    )
    try:
        from sglang.srt.mem_cache.pool_host.dsa import make_dsa_indexer_pool_decl
        from sglang.srt.runtime_context import get_parallel
    except ImportError:  # before 0.5.23: both host pools take the device pool itself
        dev = DSATokenToKVPool(**geometry)
        kv = mla_host(dev, 2.0, 0, DSA_PAGE, "page_first", pin_memory=False, device="cpu")
        indexer = indexer_host(dev, kv, "page_first", pin_memory=False)
    else:  # 0.5.23: the device pool's buffer info, and an indexer pool declaration
        with get_parallel().override(attn_dcp_size=1):
            dev = DSATokenToKVPool(**geometry)
            info = dev.get_device_pool_infos()[0].buffer_info
            kv = mla_host(
                info, 2.0, 0, DSA_PAGE, "page_first", pin_memory=False, device="cpu",
                device_capacity_tokens=256, start_layer=0, end_layer=2, target_layer_num=2,
            )  # fmt: skip
            indexer = indexer_host(make_dsa_indexer_pool_decl(dev), kv, pin_memory=False)
    g = torch.Generator().manual_seed(seed)
    for t in (kv.kv_buffer, indexer.index_k_with_scale_buffer):
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
    kv._device_keepalive = indexer._device_keepalive = dev
    return kv, indexer


def test_mla_with_dsa_indexer_matches_hicache_file(mnt):
    """DeepSeek-V3.2-style: MLA KV plus the DSA indexer sidecar (ALL_PAGES, indices from KV)."""
    try:
        sides = [make_mla_dsa_pools(0), make_mla_dsa_pools(0)]
    except (ImportError, TypeError, AttributeError) as e:
        pytest.skip(f"the DSA indexer host pool is not constructible on CPU here: {e}")
    cfg = storage_config(mnt, is_mla=True)
    backends = [JuiceFSStorage(cfg, {}), reference_backend(os.path.join(mnt, "file"), is_mla=True)]
    for b, (kv, indexer) in zip(backends, sides):
        b.register_mem_pool_host(kv)
        b.register_mem_host_pool_v2(kv, KV)
        b.register_mem_host_pool_v2(indexer, "indexer")
    assert backends[0].pools.pools["indexer"].shape.meta_regions  # zero-copy
    keys = keys_for("dsa", 4)

    def dsa(name, pages):
        idx = torch.cat([torch.arange(p * DSA_PAGE, (p + 1) * DSA_PAGE) for p in pages])
        return PoolTransfer(name=name, host_indices=idx, keys=[keys[p] for p in pages])

    def call(method, *args):
        got, want = (getattr(b, method)(*args) for b in backends)
        if isinstance(want, hs.PoolTransferResult):
            # 0.5.19 - 0.5.22's HiCacheFile leaves restorable_prefix_pages None.
            assert restorable(want) in (None, restorable(got)), method
            got, want = ((r.kv_hit_pages, dict(r.extra_pool_hit_pages)) for r in (got, want))
        assert got == want, method
        return got

    call("batch_set_v2", [dsa(KV, [0, 1, 2, 3]), dsa("indexer", [0, 1, 3])])
    lookup = [PoolTransfer(name="indexer", keys=keys, hit_policy=Policy.ALL_PAGES)]
    assert call("batch_exists_v2", keys, lookup)[0] == 2  # the indexer misses page 2

    def page(pool, p):
        return pool.get_data_page(p * DSA_PAGE, flat=True).view(torch.uint8).clone()

    originals = [[page(pool, p) for p in range(4)] for pool in sides[0]]
    for kv, indexer in sides:
        kv.kv_buffer.view(torch.uint8).zero_()
        indexer.index_k_with_scale_buffer.view(torch.uint8).zero_()
    res = call("batch_get_v2", [dsa(KV, [0, 1, 2, 3]), dsa("indexer", [0, 1, 2, 3])])
    assert res["indexer"] == [True, True, False, True]
    for kv, indexer in sides:  # both backends restore the same bytes: those written
        for p in range(4):
            assert torch.equal(page(kv, p), originals[0][p])
            assert torch.equal(page(indexer, p), originals[1][p]) == (p != 2)
    backends[0].close()


# --------------------------------------------------------------------------- fleet and eviction

# Maintenance only when a test calls it (as in test_juicefs_eviction.py).
QUIET = dict(evict_interval=3600, access_flush_interval=3600, recency_resolution=0)
TRAILING = Policy.TRAILING_PAGES


def fleet_side(mount, root, seed, **options):
    """One server of the fleet: a backend on its own mount with its own KV and state pools."""
    return Side(JuiceFSStorage(storage_config(mount, root_dir=root, **options), {}), seed)


def file_bytes(side):
    """(KV page file, state page file) sizes on the volume."""
    from kvtuner_hicache.juicefs import HEADER_SIZE

    state = side.b.pools.pools["mamba"].shape.page_bytes
    return HEADER_SIZE + side.b.page_bytes, HEADER_SIZE + state


def bytes_on_volume(ns_dir):
    """What the namespace holds, measured: every page file of the KV and every pool namespace."""
    return sum(os.path.getsize(f) for f in files_under(ns_dir))


def state_lookup(keys):
    """The lookup SGLang's Mamba component sends: the state at the prefix's last page."""
    return [PoolTransfer(name=MAMBA, keys=keys[-1:], hit_policy=TRAILING)]


def test_state_written_on_one_server_is_restorable_on_another(fleet, request):
    root = f"v2-{request.node.name}"[:100]
    a, b = fleet_side(fleet.mnts[0], root, 1), fleet_side(fleet.mnts[1], root, 2)
    keys = keys_for("fleet")
    # One Mamba state per radix node, at its last page: nodes end at pages 3 and 7.
    written = a.b.batch_set_v2(
        [transfer(KV, keys, list(range(PAGES))), transfer(MAMBA, keys, [3, 7], TRAILING)]
    )
    assert written == {KV: [True] * PAGES, MAMBA: [True, True]}
    # B: its own mount, backend and pools; nothing but the volume connects it to A.
    r = b.b.batch_exists_v2(keys, state_lookup(keys))
    assert r.kv_hit_pages == PAGES and restorable(r) in (None, [4, 8])
    assert b.b.batch_exists_v2(keys[:6], state_lookup(keys[:6])).kv_hit_pages == 4
    b.wipe()
    got = b.b.batch_get_v2(
        [transfer(KV, keys, list(range(PAGES))), transfer(MAMBA, keys, [3, 7], TRAILING)]
    )
    assert got == {KV: [True] * PAGES, MAMBA: [True, True]}
    assert all(torch.equal(x, y) for x, y in zip(b.kv_pages(), a.snapshot["kv"]))
    for p in (3, 7):  # the same bytes A wrote
        assert torch.equal(b.mamba_pages()[p], a.snapshot["mamba"][p])
    a.b.close(), b.b.close()


def test_state_reads_on_another_server_keep_its_pages_and_eviction_takes_both(fleet, request):
    """Fleet-wide recency covers state pages (a state read on B keeps the page's KV and state
    on the volume) and an eviction takes a page's state with its KV page."""
    root = f"v2-{request.node.name}"[:100]
    probe = fleet_side(fleet.mnts[0], root, 0)
    kv_file, state_file = file_bytes(probe)
    probe.b.close()
    unit = kv_file + state_file  # a one-page sequence with its state
    cap = int(20.5 * unit)  # high 19.5 units, low 17.4: 20 sequences evict 3
    a = fleet_side(fleet.mnts[0], root, 3, capacity_bytes=cap, **QUIET)
    b = fleet_side(fleet.mnts[1], root, 4, capacity_bytes=cap, **QUIET)
    assert a.b.wait_for_maintenance(60) and b.b.wait_for_maintenance(60)

    def write(side, keys):
        n = len(keys)
        got = side.b.batch_set_v2(
            [transfer(KV, keys, list(range(n))), transfer(MAMBA, keys, list(range(n)), TRAILING)]
        )
        assert got == {KV: [True] * n, MAMBA: [True] * n}

    old, new = keys_for("old", 16), keys_for("new", 4)
    hot = old[:5]
    write(a, old[:PAGES]), write(a, old[PAGES:])
    time.sleep(0.05)  # the state reads are strictly later than every old write
    reads = b.b.batch_get_v2([transfer(MAMBA, hot, list(range(5)), TRAILING)])
    assert reads == {MAMBA: [True] * 5}
    time.sleep(0.05)
    write(a, new)
    assert a.b.flush_access_log() and b.b.flush_access_log()
    passes = [r for r in (a.b.maintain(), b.b.maintain()) if r is not None]
    assert len(passes) == 1, "one server holds the lease"
    kv_space, state_space = a.b.kv, a.b.pools.pools["mamba"].space
    kept = {k for k in old + new if os.path.exists(kv_space.path(k))}
    with_state = {k for k in old + new if os.path.exists(state_space.path(k))}
    assert kept == with_state, "a page's state goes with its KV page"
    assert len(kept) == 17 and set(hot) | set(new) <= kept
    assert passes[0].usage_after == bytes_on_volume(a.b.ns_dir) == 17 * unit
    for k in hot:  # restorable on both servers
        for side in (a, b):
            assert side.b.batch_exists_v2([k], state_lookup([k])).kv_hit_pages == 1
    a.b.close(), b.b.close()


def test_eviction_under_pressure_never_reports_missing_state_restorable(fleet, request):
    """Small capacity, many sequences of KV pages with their Mamba states, random reads: after
    every eviction pass the namespace's measured bytes are the accounted ones, and every prefix
    a lookup reports restorable reads back whole. The checker is a second backend, nothing
    cached, on the writer's mount (another mount sees a deletion after its entry cache, 1 s)."""
    import random

    root = f"v2-{request.node.name}"[:100]
    rng = random.Random(23)
    probe = fleet_side(fleet.mnts[0], root, 0)
    kv_file, state_file = file_bytes(probe)
    probe.b.close()
    cap = 14 * kv_file + 6 * state_file
    writer = fleet_side(fleet.mnts[0], root, 5, capacity_bytes=cap, **QUIET)
    checker = fleet_side(fleet.mnts[0], root, 6, exists_cache_ttl=0)
    assert writer.b.wait_for_maintenance(60)

    # A sequence whose KV is all there but whose last state page is gone: not restorable.
    keys = keys_for("kv-only", 3)
    writer.b.batch_set_v2([transfer(KV, keys, [0, 1, 2]), transfer(MAMBA, keys, [2], TRAILING)])
    assert checker.b.batch_exists_v2(keys, state_lookup(keys)).kv_hit_pages == 3
    os.unlink(writer.b.pools.pools["mamba"].space.path(keys[2]))
    assert checker.b.batch_exists(keys) == 3
    r = checker.b.batch_exists_v2(keys, state_lookup(keys))
    assert r.kv_hit_pages == 0 and restorable(r) in (None, [])

    sequences = []
    for round_ in range(16):
        n = rng.randint(2, PAGES)
        keys = keys_for(f"seq-{round_}", n)
        # States at the sequence's end and, for some, at a node boundary inside it.
        ends = sorted({n - 1, rng.randrange(n)})
        writer.b.batch_set_v2(
            [transfer(KV, keys, list(range(n))), transfer(MAMBA, keys, ends, TRAILING)]
        )
        sequences.append(keys)
        for keys_read in rng.sample(sequences, min(2, len(sequences))):
            r = writer.b.batch_exists_v2(keys_read, state_lookup(keys_read))
            if r.kv_hit_pages:
                writer.b.batch_get_v2(
                    [
                        transfer(KV, keys_read, list(range(r.kv_hit_pages))),
                        transfer(MAMBA, keys_read, [r.kv_hit_pages - 1], TRAILING),
                    ]
                )
        result = writer.b.maintain()
        assert result is not None
        measured = bytes_on_volume(writer.b.ns_dir)
        assert measured == result.usage_after == writer.b.counters["usage_bytes"]
        assert measured <= 0.95 * cap
        for keys_seq in sequences:
            r = checker.b.batch_exists_v2(keys_seq, state_lookup(keys_seq))
            for p in restorable(r) or ([r.kv_hit_pages] if r.kv_hit_pages else []):
                # Reported restorable: the KV pages and the state read back as written.
                checker.wipe()
                got = checker.b.batch_get_v2(
                    [
                        transfer(KV, keys_seq, list(range(p))),
                        transfer(MAMBA, keys_seq, [p - 1], TRAILING),
                    ]
                )
                assert got == {KV: [True] * p, MAMBA: [True]}, (round_, p)
                for i in range(p):
                    assert torch.equal(checker.kv_pages()[i], writer.snapshot["kv"][i])
                assert torch.equal(checker.mamba_pages()[p - 1], writer.snapshot["mamba"][p - 1])
    assert writer.b.counters["evicted_pages"] > 0
    writer.b.close(), checker.b.close()
