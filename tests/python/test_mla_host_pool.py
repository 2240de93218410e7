"""The quantizing MLA host pool (DeepSeek, Kimi, GLM) through a patched SGLang tree.

SGLang's own ``MLATokenToKVPool`` on CPU stands for the GPU pool; the stock
``MLATokenToKVPoolHost`` is called as the release's call sites call it (0.5.23: also through
``build_kv_host_pool``), and its patched ``__new__`` picks the class. Rows are checked against
an independent reading of page format 4 (``docs/host-pool.md``, "MLA models"): per layer the
latent blob ``kvtuner_quant.quantize`` gives, then the latent's sink tokens and every rope key,
exact. The device codec's kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import inspect
import logging
import os
import struct

import pytest
import torch

from conftest import published_server_args, quantizing_config, requires_patched
from juicefs_fixture import storage_config

os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = requires_patched

PAGE, LORA, ROPE, LAYERS = 64, 512, 64, 2
FLAGS = dict(
    enable_hierarchical_cache=True,
    enable_kvtuner_hicache=True,
    hicache_ratio=2.0,
    hicache_size=0,
    hicache_mem_layout="page_first",
    page_size=PAGE,
    kvtuner_hicache_residual_length=0,
)


def _stock_cls():
    from sglang.srt.mem_cache.kvtuner_hicache.compat import MLATokenToKVPoolHost

    return MLATokenToKVPoolHost


def takes_buffer_info() -> bool:
    return "buffer_info" in inspect.signature(_stock_cls().__init__).parameters


def mla_device_pool(*, layers=LAYERS, page=PAGE, lora=LORA, rope=ROPE, seed=0, **kw):
    """SGLang's MLA device pool on CPU, filled with latent-like values (a few outlier
    channels, as real MLA latents have)."""
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    dtype = kw.pop("dtype", torch.bfloat16)
    dev = MLATokenToKVPool(
        size=8 * page,
        page_size=page,
        dtype=dtype,
        kv_lora_rank=lora,
        qk_rope_head_dim=rope,
        layer_num=layers,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=layers,
        **kw,
    )
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(seed)
        for b in dev.kv_buffer:
            x = torch.randn(b.shape, generator=g)
            x[..., 7] *= 20.0
            x[..., lora:] *= 3.0
            b.copy_(x.to(dtype))
    return dev


def stock_args(dev, drafts=(), page=PAGE, layout="page_first"):
    """(args, kwargs) the release's call sites pass ``MLATokenToKVPoolHost`` for ``dev``."""
    if takes_buffer_info():
        info = dev.get_device_pool_infos()[0].buffer_info
        kwargs = dict(
            device_capacity_tokens=dev.size,
            start_layer=dev.start_layer,
            end_layer=dev.end_layer,
            target_layer_num=dev.layer_num,
            draft_buffer_infos=tuple(d.get_device_pool_infos()[0].buffer_info for d in drafts),
        )
        return (info, 2.0, 0, page, layout), dict(pin_memory=False, device="cpu", **kwargs)
    kwargs = dict(pin_memory=False, device="cpu")
    if drafts:
        kwargs["mtp_draft_device_pools"] = tuple(drafts)
    return (dev, 2.0, 0, page, layout), kwargs


def build(dev, drafts=(), **flags):
    """The host pool the release builds for ``dev`` with these server flags."""
    args, kwargs = stock_args(dev, drafts, page=flags.get("page_size", PAGE))
    with published_server_args(**{**FLAGS, **flags}):
        return _stock_cls()(*args, **kwargs)


def direct(kvh, dev, cfg, page=PAGE):
    """The quantizing pool built with an explicit config (no server flags)."""
    args, kwargs = stock_args(dev, page=page)
    return kvh.mla_pool.KVTunerMLATokenToKVPoolHost(*args, kvtuner_config=cfg, **kwargs)


@pytest.fixture(scope="module")
def kvh(sgl):
    import importlib

    ns = type("kvh", (), {})()
    for sub in ("config", "page_format", "mla_pool", "selection"):
        setattr(ns, sub, importlib.import_module(f"sglang.srt.mem_cache.kvtuner_hicache.{sub}"))
    return ns


def backup(host, dev, hidx, didx):
    fn = getattr(host, "backup_from_device_all_layer_physical", host.backup_from_device_all_layer)
    fn(dev, hidx, didx, "direct")


def load(host, dev, hidx, didx, layer, is_draft=False):
    fn = getattr(host, "load_to_device_per_layer_physical", host.load_to_device_per_layer)
    fn(dev, hidx, didx, layer, "direct", is_draft=is_draft)


def test_selection_follows_the_flag(sgl, kvh):
    dev = mla_device_pool()
    assert type(build(dev)) is kvh.mla_pool.KVTunerMLATokenToKVPoolHost
    assert type(build(dev, enable_kvtuner_hicache=False)) is _stock_cls()
    args, kwargs = stock_args(dev)
    assert type(_stock_cls()(*args, **kwargs)) is _stock_cls()  # nothing published: stock


def test_build_kv_host_pool_picks_it(sgl, kvh):
    """0.5.23's assembler hard-codes the stock class: the class itself chooses."""
    try:
        from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import build_kv_host_pool
    except ImportError:
        pytest.skip("this release has no hybrid_pool_assembler.build_kv_host_pool")
    params = inspect.signature(build_kv_host_pool).parameters
    if "server_args" in params:
        pytest.skip("this release's build_kv_host_pool takes server_args (0.5.11 - 0.5.13.post1)")
    dev = mla_device_pool()
    with published_server_args(**FLAGS):
        host = build_kv_host_pool(kv_pool=dev, page_size=PAGE, use_mla=True)
    assert type(host) is kvh.mla_pool.KVTunerMLATokenToKVPoolHost
    # (Without the flag it builds the stock pool, which pins host memory: CUDA only.)


def test_bytes_per_token_at_4_bits(sgl, kvh):
    """DeepSeek's row (512 + 64, bf16, page 64): K4 latent with the rope exact is at least
    2.5x smaller than stock, and the same --hicache-ratio holds that many more tokens."""
    dev = mla_device_pool()
    stock = build(dev, enable_kvtuner_hicache=False)
    host = build(dev, kvtuner_hicache_nbits_key=4)
    assert stock.get_size_per_token() == (LORA + ROPE) * 2 * LAYERS
    assert host.stock_size_per_token() == stock.get_size_per_token()
    ratio = stock.get_size_per_token() / host.get_size_per_token()
    assert ratio >= 2.5, ratio
    assert host.size >= 2.4 * stock.size
    assert host.kvtuner_namespace_tag().startswith("kvt-mla-bf16-l4-")


def _independent_row(kq, cfg, dev, device_rows, layers):
    """Page format 4 for one page, from FORMAT.md and docs/host-pool.md alone."""
    row = bytearray()
    row += b"\0" * 64  # header, checked separately
    for layer in range(layers):
        x = dev.kv_buffer[layer][device_rows].view(PAGE, -1)
        latent, rope = x[:, :LORA].contiguous(), x[:, LORA:].contiguous()
        blob = bytes(
            kq.quantize(
                latent.view(PAGE, 1, LORA),
                bits=cfg.nbits_key,
                asym=cfg.asym,
                axis=cfg.axis_key,
                group_size=cfg.group_size,
            )
        )
        row += blob
        row += b"\0" * (-len(row) % 64)
        row += latent[: cfg.sink_tokens].view(torch.uint8).numpy().tobytes()
        row += rope.view(torch.uint8).numpy().tobytes()
        row += b"\0" * (-len(row) % 64)
    return bytes(row)


@pytest.mark.parametrize(
    "flags",
    [
        dict(kvtuner_hicache_nbits_key=4),
        dict(kvtuner_hicache_nbits_key=2, kvtuner_hicache_axis_key=0, kvtuner_hicache_asym=True),
        dict(kvtuner_hicache_nbits_key=8, kvtuner_hicache_sink_tokens=4),
    ],
)
def test_rows_are_page_format_4_and_load_back(sgl, kvh, kq, flags):
    dev = mla_device_pool(seed=3)
    host = build(dev, **flags)
    cfg = host._kvt_cfg
    ref = [b.clone() for b in dev.kv_buffer]
    hidx = host.alloc(3 * PAGE)
    didx = torch.cat([torch.arange(5 * PAGE, 6 * PAGE), torch.arange(PAGE, 3 * PAGE)])
    backup(host, dev, hidx, didx)
    for i in range(3):
        page = int(hidx[i * PAGE]) // PAGE
        got = host.kv_buffer[page].numpy().tobytes()
        want = _independent_row(kq, cfg, dev, didx[i * PAGE : (i + 1) * PAGE], LAYERS)
        magic, version, header, layers, page_size, row_nbytes = struct.unpack_from("<8sHHIIQ", got)
        assert (magic, version, header, layers, page_size) == (b"KVTPAGE1", 4, 64, LAYERS, PAGE)
        assert row_nbytes == len(got) and len(got) % 8192 == 0
        assert got[64 : len(want)] == want[64:]
        assert not any(got[len(want) :])
    for b in dev.kv_buffer:
        b.zero_()
    for layer in range(LAYERS):
        load(host, dev, hidx, didx, layer)
        got = dev.kv_buffer[layer][didx].view(-1, LORA + ROPE)
        want = ref[layer][didx].view(-1, LORA + ROPE)
        assert torch.equal(got[:, LORA:], want[:, LORA:])  # rope: exact
        sink = cfg.sink_tokens
        pages = got.view(3, PAGE, -1)
        assert torch.equal(pages[:, :sink, :LORA], want.view(3, PAGE, -1)[:, :sink, :LORA])
        # the latent: what kvtuner_quant decodes from the stored blob
        for i in range(3):
            blob = kq.quantize(
                want.view(3, PAGE, -1)[i, :, :LORA].contiguous().view(PAGE, 1, LORA),
                bits=cfg.nbits_key,
                asym=cfg.asym,
                axis=cfg.axis_key,
                group_size=cfg.group_size,
            )
            decoded = kq.dequantize(blob).view(PAGE, LORA).to(torch.bfloat16)
            assert torch.equal(pages[i, sink:, :LORA], decoded[sink:])


def test_rows_never_carry_stale_bytes(sgl, kvh, monkeypatch):
    """The allocator may hand back used memory: bytes no codec writes (alignment gaps, the
    tail pad) are zero in every stored page all the same."""
    import importlib

    rows_module = importlib.import_module("sglang.srt.mem_cache.kvtuner_hicache.quantized_rows")
    alloc = rows_module.alloc_host

    def used_memory(*args, **kwargs):
        return alloc(*args, **kwargs).fill_(0xA5)

    monkeypatch.setattr(rows_module, "alloc_host", used_memory)
    dev = mla_device_pool(seed=2)
    host = build(dev, kvtuner_hicache_nbits_key=2, kvtuner_hicache_sink_tokens=3)
    layout = host.kvtuner_layout
    assert layout.gaps and layout.gaps[-1][0] + layout.gaps[-1][1] == layout.row_nbytes
    hidx = host.alloc(2 * PAGE)
    backup(host, dev, hidx, torch.arange(2 * PAGE))
    for i in range(2):
        row = host.get_data_page(int(hidx[i * PAGE]))
        for off, nbytes in layout.gaps:
            assert not row[off : off + nbytes].any(), (off, nbytes)


def test_l3_pages_through_hicache_file_into_a_fresh_pool(sgl, kvh, tmp_path):
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile

    dev = mla_device_pool(seed=5)
    a = build(dev, kvtuner_hicache_nbits_key=4)
    ha = a.alloc(2 * PAGE)
    backup(a, dev, ha, torch.arange(PAGE, 3 * PAGE))
    keys = ["m0" + "a" * 62, "m1" + "b" * 62]
    cfg = storage_config(None, is_mla=True, file_storage_path=str(tmp_path))
    store = HiCacheFile(cfg, file_path=str(tmp_path))
    store.register_mem_pool_host(a)
    assert store.batch_set(keys, [a.get_data_page(int(ha[i * PAGE])) for i in range(2)])
    b = build(mla_device_pool(seed=6), kvtuner_hicache_nbits_key=4)
    hb = b.alloc(4 * PAGE)[2 * PAGE :]
    fresh = HiCacheFile(cfg, file_path=str(tmp_path))
    fresh.register_mem_pool_host(b)
    outs = fresh.batch_get(keys, [b.get_dummy_flat_data_page() for _ in keys])
    for i, out in enumerate(outs):  # what SGLang's generic prefetch does with them
        b.set_from_flat_data_page(int(hb[i * PAGE]), out)
    for i in range(2):
        assert torch.equal(a.get_data_page(int(ha[i * PAGE])), b.get_data_page(int(hb[i * PAGE])))
    # a pool of another config refuses those pages, naming why
    c = build(mla_device_pool(), kvtuner_hicache_nbits_key=4, kvtuner_hicache_axis_key=0)
    assert c.kvtuner_page_nbytes == a.kvtuner_page_nbytes  # same size, other groups
    page = a.get_data_page(int(ha[0])).clone()
    with pytest.raises(ValueError, match="another quantization config"):
        c.set_from_flat_data_page(0, page)


def test_l3_pages_through_juicefs_into_a_fresh_pool(sgl, kvh, juicefs_volume):
    from sglang.srt.mem_cache.kvtuner_hicache.juicefs import JuiceFSStorage

    mnt = os.path.join(juicefs_volume.mnt, "mla-pool")
    os.makedirs(mnt, exist_ok=True)
    dev = mla_device_pool(seed=7)
    a = build(dev, kvtuner_hicache_nbits_key=4)
    ha = a.alloc(2 * PAGE)
    backup(a, dev, ha, torch.arange(2 * PAGE))
    keys = ["j0" + "c" * 62, "j1" + "d" * 62]
    ba = JuiceFSStorage(storage_config(mnt, is_mla=True), {})
    ba.register_mem_pool_host(a)
    assert ba.namespace_fields["kv_format"] == a.kvtuner_namespace_tag()
    assert ba.batch_set_v1(keys, ha) == [True, True]
    out = mla_device_pool(seed=8)
    b = build(out, kvtuner_hicache_nbits_key=4)
    hb = b.alloc(2 * PAGE)
    bb = JuiceFSStorage(storage_config(mnt, is_mla=True, tp_rank=1, tp_size=2), {})
    bb.register_mem_pool_host(b)
    assert bb.batch_exists(keys) == 2  # MLA pages are one copy for every TP rank
    assert bb.batch_get_v1(keys, hb) == [True, True]
    for layer in range(LAYERS):  # the host pool loads into the device pool it mirrors
        load(b, out, hb, torch.arange(2 * PAGE), layer)
        load(a, dev, ha, torch.arange(2 * PAGE), layer)
        assert torch.equal(out.kv_buffer[layer][: 2 * PAGE], dev.kv_buffer[layer][: 2 * PAGE])
    # another config never sees them
    c = build(mla_device_pool(), kvtuner_hicache_nbits_key=8)
    bc = JuiceFSStorage(storage_config(mnt, is_mla=True), {})
    bc.register_mem_pool_host(c)
    assert bc.batch_exists(keys) == 0
    for s in (ba, bb, bc):
        s.close()


def test_mtp_draft_layers_ride_along(sgl, kvh):
    params = inspect.signature(_stock_cls().__init__).parameters
    if not {"draft_buffer_infos", "mtp_draft_device_pools"} & set(params):
        pytest.skip("this release's MLA host pool holds no MTP draft layers")
    dev, draft = mla_device_pool(seed=1), mla_device_pool(layers=1, seed=2)
    host = build(dev, drafts=(draft,))
    assert host.layer_num == LAYERS + 1
    assert len(host.kvtuner_layout.parts) == LAYERS + 1
    hidx = host.alloc(PAGE)
    didx = torch.arange(2 * PAGE, 3 * PAGE)
    want = draft.kv_buffer[0][didx].clone()
    backup(host, dev, hidx, didx)
    draft.kv_buffer[0].zero_()
    draft_id = getattr(host, "_device_layer_num", LAYERS)  # 0.5.23: after every device layer
    load(host, draft, hidx, didx, draft_id, is_draft=True)
    got = draft.kv_buffer[0][didx]
    assert torch.equal(got[..., LORA:], want[..., LORA:])
    assert (got[..., :LORA].float() - want[..., :LORA].float()).norm() < 0.2 * want[
        ..., :LORA
    ].float().norm()


def test_both_codecs_write_the_same_rows(sgl, kvh):
    pytest.importorskip("triton")
    page, lora, rope = 16, 128, 32
    rows, pools = {}, {}
    for codec in ("host", "device"):
        cfg = quantizing_config(
            kvh.config, group_size=16, codec=codec, sink_tokens=2, residual_length=page
        )
        dev = mla_device_pool(page=page, lora=lora, rope=rope, seed=4)
        host = direct(kvh, dev, cfg, page=page)
        assert host.kvtuner_codec == codec
        hidx = torch.cat([torch.arange(3 * page, 4 * page), torch.arange(page, 2 * page)])
        didx = torch.arange(2 * page, 4 * page)
        backup(host, dev, hidx, didx)
        rows[codec] = host.kv_buffer.clone()
        pools[codec] = (host, dev, hidx, didx)
        assert host.kvtuner_overlay_pages() == [1]  # the window: the last page backed up
    rows["host"][:, 48:56] = rows["device"][:, 48:56] = 0  # stamps differ per pool
    assert torch.equal(rows["host"], rows["device"])
    outs = []
    for host, dev, hidx, didx in pools.values():
        for b in dev.kv_buffer:
            b.zero_()
        for layer in range(LAYERS):
            load(host, dev, hidx, didx, layer)
        outs.append([b[didx].clone() for b in dev.kv_buffer])
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_device_codec_never_syncs(sgl, kvh, monkeypatch):
    pytest.importorskip("triton")
    from test_device_codec_pool import host_syncs_raise

    page = 16
    cfg = quantizing_config(kvh.config, group_size=16, codec="device", residual_length=page)
    dev = mla_device_pool(page=page, lora=128, rope=32)
    host = direct(kvh, dev, cfg, page=page)
    hidx, didx = torch.arange(2 * page, 4 * page), torch.arange(page, 3 * page)
    with host_syncs_raise(monkeypatch) as seen:
        backup(host, dev, hidx, didx)
        for layer in range(LAYERS):
            load(host, dev, hidx, didx, layer)
    assert seen == []


@pytest.mark.parametrize(
    "make,why",
    [
        (
            lambda: mla_device_pool(dtype=torch.float8_e4m3fn),
            "device KV (needs fp16, bf16 or fp32)",
        ),
        (
            lambda: mla_device_pool(
                dtype=torch.float8_e4m3fn, use_dsa=True, override_kv_cache_dim=656
            ),
            "FP8 DSA packed rows",
        ),
    ],
)
def test_configs_it_cannot_serve_keep_the_stock_pool(sgl, kvh, caplog, make, why):
    try:
        dev = make()
    except Exception as e:  # noqa: BLE001  (a release that cannot build it on CPU)
        pytest.skip(f"SGLang cannot build this device pool on CPU: {e}")
    args, kwargs = stock_args(dev)
    kvh.selection._refusals_logged.clear()
    with caplog.at_level(logging.WARNING), published_server_args(**FLAGS):
        assert kvh.selection.select_mla_host_pool_cls(args, kwargs) is None
        kvh.selection.select_mla_host_pool_cls(args, kwargs)
    lines = [r.getMessage() for r in caplog.records if "keeps full precision" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0], lines


def test_dcp_keeps_the_stock_pool(sgl, kvh):
    dev = mla_device_pool()
    args, kwargs = stock_args(dev)
    if "dcp_size" not in inspect.signature(_stock_cls().__init__).parameters:
        pytest.skip("this release's MLA host pool has no DCP")
    with published_server_args(**FLAGS):
        assert "DCP" in kvh.mla_pool.mla_refusal(args, {**kwargs, "dcp_size": 2})
        assert kvh.mla_pool.mla_refusal(args, kwargs) is None
