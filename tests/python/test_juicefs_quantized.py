"""JuiceFSStorage with the quantizing host pool (kvtuner_hicache.host_pool) on a real JuiceFS
mount: quantized pages go to L3 and come back bit-exact, through the v1 (zero-copy) and the
legacy paths, and pages of another quantization config are never seen.

Device side: SGLang's own MHATokenToKVPool built with device="cpu".
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from conftest import cpu_device_pool, host_pool_args, quantizing_config
from juicefs_fixture import make_mha_host_pool, storage_config
from kvtuner_hicache.juicefs import HEADER_SIZE, JuiceFSStorage

try:
    import kvtuner_quant  # noqa: F401  (the compiled quantizer the pool needs)
    from kvtuner_hicache import config as kvconfig
    from kvtuner_hicache import host_pool as kvhost
except ImportError as e:  # the quantizer is a compiled extension (pip install ./quant)
    pytest.skip(f"quantizing host pool unavailable: {e}", allow_module_level=True)

PAGE, HEADS, HEAD_DIM, LAYERS = 32, 2, 64, 3


@pytest.fixture
def mnt(juicefs_volume, request):
    path = os.path.join(juicefs_volume.mnt, f"q-{request.node.name}"[:120])
    os.makedirs(path, exist_ok=True)
    return path


def make_cfg(**kw):
    return quantizing_config(kvconfig, **kw)


def device_pool(seed=0):
    pool = cpu_device_pool(size=512, page_size=PAGE, heads=HEADS, head_dim=HEAD_DIM, layers=LAYERS)
    g = torch.Generator().manual_seed(seed)
    for bufs in (pool.k_buffer, pool.v_buffer):
        for b in bufs:
            b.copy_((torch.randn(b.shape, generator=g) * 2.0).to(torch.float16))
    return pool


def quant_pool(dev, cfg):
    source, geometry = host_pool_args(dev)
    return kvhost.KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        0.004,
        PAGE,
        "page_first",
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
    )


def backend(mnt, pool):
    b = JuiceFSStorage(storage_config(mnt), {})
    b.register_mem_pool_host(pool)
    return b


def filled(cfg, seed=0, pages=3):
    dev = device_pool(seed)
    host = quant_pool(dev, cfg)
    hidx = host.alloc(pages * PAGE)
    host.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE, (pages + 1) * PAGE), "kernel")
    return dev, host, hidx


def rows(host, hidx):
    return [host.get_data_page(int(hidx[i * PAGE])).clone() for i in range(len(hidx) // PAGE)]


def test_quantized_pages_roundtrip_v1(mnt):
    cfg = make_cfg()
    dev, a, ha = filled(cfg)
    ba = backend(mnt, a)
    keys = [f"q{i:02d}" + "0" * 62 for i in range(3)]
    assert ba.batch_set_v1(keys, ha) == [True] * 3
    # Quantized on disk: header + one quantized row, smaller than the stock page.
    row = a.kvtuner_layout.row_nbytes
    assert os.path.getsize(ba._path(keys[0])) == HEADER_SIZE + row
    assert row < 2 * LAYERS * PAGE * HEADS * HEAD_DIM * 2
    assert ba.namespace_fields["kv_format"] == a.kvtuner_namespace_tag()

    dev2, b, _ = filled(cfg, seed=1, pages=1)  # other rows in use: land elsewhere
    hb = b.alloc(3 * PAGE)
    bb = backend(mnt, b)
    assert bb.batch_exists(keys) == 3
    assert bb.batch_get_v1(keys, hb) == [True] * 3
    for x, y in zip(rows(a, ha), rows(b, hb)):
        assert torch.equal(x, y)
    for layer in range(LAYERS):  # and they dequantize to the same KV
        a.load_to_device_per_layer(dev, ha, torch.arange(0, 3 * PAGE), layer, "kernel")
        b.load_to_device_per_layer(dev2, hb, torch.arange(0, 3 * PAGE), layer, "kernel")
        assert torch.equal(dev.k_buffer[layer][: 3 * PAGE], dev2.k_buffer[layer][: 3 * PAGE])
        assert torch.equal(dev.v_buffer[layer][: 3 * PAGE], dev2.v_buffer[layer][: 3 * PAGE])


def test_quantized_pages_roundtrip_legacy(mnt):
    cfg = make_cfg(nbits_key=8, nbits_value=4)
    _, a, ha = filled(cfg)
    ba = backend(mnt, a)
    keys = [f"l{i:02d}" + "1" * 62 for i in range(3)]
    assert ba.batch_set(keys, [a.get_data_page(int(ha[i * PAGE])) for i in range(3)])
    _, b, _ = filled(cfg, seed=2, pages=1)
    hb = b.alloc(3 * PAGE)
    bb = backend(mnt, b)
    outs = bb.batch_get(keys, [b.get_dummy_flat_data_page() for _ in keys])
    assert all(o is not None for o in outs)
    for i, out in enumerate(outs):  # what SGLang's generic prefetch does next
        b.set_from_flat_data_page(int(hb[i * PAGE]), out)
    for x, y in zip(rows(a, ha), rows(b, hb)):
        assert torch.equal(x, y)


def test_other_quant_config_or_stock_pool_never_sees_pages(mnt):
    bits_a = ((0, (4, 4)), (1, (2, 2)), (2, (4, 4)))
    bits_b = ((0, (2, 2)), (1, (4, 4)), (2, (4, 4)))
    _, a, ha = filled(make_cfg(layer_bits=bits_a))
    _, b, _ = filled(make_cfg(layer_bits=bits_b), pages=1)
    assert a.kvtuner_layout.row_nbytes == b.kvtuner_layout.row_nbytes  # same size, other bits
    ba, bb = backend(mnt, a), backend(mnt, b)
    assert ba.ns_dir != bb.ns_dir
    keys = [f"x{i:02d}" + "2" * 62 for i in range(3)]
    assert ba.batch_set_v1(keys, ha) == [True] * 3
    hb = b.alloc(3 * PAGE)
    assert bb.batch_exists(keys) == 0
    assert bb.batch_get_v1(keys, hb) == [False] * 3
    stock = make_mha_host_pool(
        page_size=PAGE, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, dtype=torch.float16
    )
    assert backend(mnt, stock).batch_exists(keys) == 0
