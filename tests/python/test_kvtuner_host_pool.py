"""The quantizing host pool built through SGLang's own classes on CPU.

Device side: a real ``MHATokenToKVPool`` constructed with ``device="cpu"``; its CPU
tensors stand for the GPU buffers. The host pool gets what the release passes it
(``conftest.host_pool_args``): the ``MHABufferInfo`` from ``get_device_pool_infos()``
in 0.5.23, the device pool itself before.
"""

from __future__ import annotations

import inspect
import math
import types

import pytest
import torch

from conftest import build_host_pool, cpu_device_pool, host_pool_args, quantizing_config
from juicefs_fixture import storage_config

PAGE = 32
HEADS = 2
HEAD_DIM = 64
LAYERS = 3


def make_cfg(kvh, **kw):
    return quantizing_config(kvh.config, **kw)


def device_pool(sgl, dtype=torch.float16, layers=LAYERS, size=512, seed=0):
    pool = cpu_device_pool(
        size=size, page_size=PAGE, heads=HEADS, head_dim=HEAD_DIM, layers=layers, dtype=dtype
    )
    g = torch.Generator().manual_seed(seed)
    for bufs in (pool.k_buffer, pool.v_buffer):
        for b in bufs:
            x = torch.randn(b.shape, generator=g) * 2.0
            # Key-like outlier channels and a far-from-zero offset in some tokens.
            x[:, :, 3] *= 12.0
            x[::7] += 40.0
            b.copy_(x.to(dtype))
    return pool


def host_pool(sgl, kvh, dev, cfg, host_size=0.004, layout="page_first", **kw):
    source, geometry = host_pool_args(dev)
    return kvh.host_pool.KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        host_size,
        PAGE,
        layout,
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
        **kw,
    )


# ----------------------------------------------------------------- oracle ---


def error_bound(x: torch.Tensor, bits, asym, axis, group, page):
    """Per-element bound ``scale/2 + 4*eps32*max(|mn|,|mx|) + ulp_out/2`` of the
    quantizer spec, computed independently from the original values; 0 where the
    format stores tokens exactly (per-channel tail after the last whole group)."""
    dtype = x.dtype
    xf = x.float()
    T, H, D = xf.shape
    n = T // page
    info = torch.finfo(dtype)
    bound = torch.zeros_like(xf)
    if axis == 0:
        g = xf.view(n, page, H, D // group, group)
        red = -1
    else:
        nq = page // group * group
        g = xf.view(n, page, H, D)[:, :nq].reshape(n, nq // group, group, H, D)
        red = 2
    mn = g.amin(red, keepdim=True)
    mx = g.amax(red, keepdim=True)
    if asym:
        s = (mx - mn) / (2**bits - 1)
        mag = torch.maximum(mn.abs(), mx.abs())
    else:
        mag = torch.maximum(mn.abs(), mx.abs())
        s = mag / (2 ** (bits - 1) - 1)
    # M_up(s): rounded up into the metadata dtype -> at most one dtype ulp above.
    s_up = s * (1 + info.eps) + info.smallest_normal * info.eps
    out_mag = mag + s_up
    ulp_out = torch.exp2(torch.floor(torch.log2(out_mag.clamp_min(info.tiny)))) * info.eps
    b = s_up / 2 + 4 * torch.finfo(torch.float32).eps * mag + ulp_out / 2
    b = b.expand_as(g)
    if axis == 0:
        bound = b.reshape(T, H, D)
    else:
        bound.view(n, page, H, D)[:, :nq] = b.reshape(n, nq, H, D)
    return bound


def blob_nbytes(page, heads, dim, itemsize, bits, asym, axis, group):
    """Blob size from quant/FORMAT.md: 64-byte header, codes, scales (+ mins), each
    section 8-aligned, then the exactly stored tail tokens."""

    def pad8(v):
        return (v + 7) // 8 * 8

    row = heads * dim
    nq = page if axis == 0 else page // group * group
    ngroups = nq * row // group
    size = pad8(64 + math.ceil(nq * row * bits / 8))
    size = pad8(size + ngroups * itemsize)
    if asym:
        size = pad8(size + ngroups * itemsize)
    return size + (page - nq) * row * itemsize


def expected_row_nbytes(cfg, layer_bits, itemsize):
    off = 64
    for kb, vb in layer_bits:
        for bits, axis in ((kb, cfg.axis_key), (vb, cfg.axis_value)):
            n = blob_nbytes(PAGE, HEADS, HEAD_DIM, itemsize, bits, cfg.asym, axis, cfg.group_size)
            off = (off + n + 63) // 64 * 64
        # The sink section: the page's first sink tokens of K and of V, exact.
        off = (off + 2 * cfg.sink_tokens * HEADS * HEAD_DIM * itemsize + 63) // 64 * 64
    # Whole rows of two 4 KiB-aligned halves (O_DIRECT storage backends), and whole tokens.
    unit = math.lcm(2 * 4096, PAGE)
    return (off + unit - 1) // unit * unit


def roundtrip(host, dev, ntok, dev_start=PAGE):
    """Back up ntok device tokens, wipe them on the device, load them back."""
    hidx = host.alloc(ntok)
    didx = torch.arange(dev_start, dev_start + ntok)
    ref_k = [b[didx].clone() for b in dev.k_buffer]
    ref_v = [b[didx].clone() for b in dev.v_buffer]
    host.backup_from_device_all_layer(dev, hidx, didx, "kernel")
    for b in (*dev.k_buffer, *dev.v_buffer):
        b[didx] = 0
    # The controller's entry point: the _physical wrapper from 0.5.21, the method before.
    load = getattr(host, "load_to_device_per_layer_physical", host.load_to_device_per_layer)
    for layer in range(len(dev.k_buffer)):
        load(dev, hidx, didx, layer, "kernel")
    got_k = [b[didx].clone() for b in dev.k_buffer]
    got_v = [b[didx].clone() for b in dev.v_buffer]
    return hidx, didx, ref_k, ref_v, got_k, got_v


# ------------------------------------------------------------------ tests ---

CONFIGS = [
    dict(),  # K4V4 asym, K per-channel / V per-token, g32
    dict(nbits_key=2, nbits_value=2),
    dict(nbits_key=8, nbits_value=8, group_size=64, axis_key=0),
    dict(asym=False, nbits_key=4, nbits_value=8),
    dict(group_size=24, axis_value=1),  # per-channel tail tokens (32 % 24) stored exactly
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "over", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "k4v4"
)
def test_backup_load_within_error_bound(sgl, kvh, kq, dtype, over):
    if over.get("axis_key") == 0 and HEAD_DIM % over.get("group_size", 32):
        pytest.skip("group does not divide head_dim")
    cfg = make_cfg(kvh, **over)
    dev = device_pool(sgl, dtype=dtype)
    host = host_pool(sgl, kvh, dev, cfg)
    _, _, ref_k, ref_v, got_k, got_v = roundtrip(host, dev, 4 * PAGE)
    for layer in range(LAYERS):
        kb, vb = host.kvtuner_plan.layer_bits[layer]
        for ref, got, bits, axis in (
            (ref_k, got_k, kb, cfg.axis_key),
            (ref_v, got_v, vb, cfg.axis_value),
        ):
            bound = error_bound(ref[layer], bits, cfg.asym, axis, cfg.group_size, PAGE)
            err = (got[layer].float() - ref[layer].float()).abs()
            worst = (err - bound).max().item()
            assert worst <= 0, (
                f"layer {layer} bits {bits} axis {axis}: error exceeds bound by {worst}"
            )
            if bits < 8:  # it really was quantized
                assert err.max().item() > 0
            if axis == 1 and PAGE % cfg.group_size:
                tail = ref[layer].view(-1, PAGE, HEADS, HEAD_DIM)[
                    :, PAGE // cfg.group_size * cfg.group_size :
                ]
                gtail = got[layer].view(-1, PAGE, HEADS, HEAD_DIM)[
                    :, PAGE // cfg.group_size * cfg.group_size :
                ]
                assert torch.equal(tail, gtail)


def test_residual_window_exact(sgl, kvh, kq):
    cfg = make_cfg(kvh, nbits_key=2, nbits_value=2, residual_length=40)  # -> 2 pages
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, cfg)
    assert host._window_pages() == 2
    hidx, didx, ref_k, ref_v, got_k, got_v = roundtrip(host, dev, 5 * PAGE)
    pages = (hidx[::PAGE] // PAGE).tolist()
    assert host.kvtuner_overlay_pages() == sorted(pages[-2:])
    w = 2 * PAGE
    for layer in range(LAYERS):
        assert torch.equal(got_k[layer][-w:], ref_k[layer][-w:])
        assert torch.equal(got_v[layer][-w:], ref_v[layer][-w:])
        assert not torch.equal(got_k[layer][:-w], ref_k[layer][:-w])
    # Storage and a second reader only ever see the quantized page.
    row = host.get_data_page(int(hidx[-1]))
    assert host.kvtuner_layout.header_mismatch(bytes(row[:64].numpy())) is None
    # Freeing the pages drops their overlay entries; a reuse is never served stale.
    host.free(hidx)
    assert host.kvtuner_overlay_pages() == []


@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8)])
def test_zero_copy_spans_suit_o_direct(sgl, kvh, kq, bits):
    # O_DIRECT backends (NIXL's file plugins by default) need every span's address and
    # length in whole 4 KiB pages: with the base aligned, both halves of every row are.
    cfg = make_cfg(kvh, nbits_key=bits[0], nbits_value=bits[1])
    host = host_pool(sgl, kvh, device_pool(sgl), cfg)
    hidx = host.alloc(3 * PAGE)
    ptrs, sizes = host.get_page_buffer_meta(hidx)
    base = host.kv_buffer.data_ptr()
    assert len(ptrs) == 6
    assert all((p - base) % 4096 == 0 for p in ptrs)
    assert all(n % 4096 == 0 for n in sizes)
    assert host.is_stride_page_aligned(4096) == (base % 4096 == 0)


def test_cpu_device_pool_is_never_pinned(sgl, kvh, kq):
    # SGLang passes pin_memory=True by default; with the device KV on the CPU there is
    # nothing to pin for (and no CUDA driver to ask): rows, overlay and scratch pages stay
    # plain host memory, and every path still works.
    cfg = make_cfg(kvh, residual_length=40)
    dev = device_pool(sgl)
    source, geometry = host_pool_args(dev)
    host = kvh.host_pool.KVTunerMHATokenToKVPoolHost(
        source, 0.0, 0.004, PAGE, "page_first_direct", True, "cpu", **geometry, kvtuner_config=cfg
    )
    assert host.pin_memory is False
    assert not host.kv_buffer.is_pinned()
    assert not host.kvtuner_overlay.buffer.is_pinned()
    hidx, _, ref_k, _, got_k, _ = roundtrip(host, dev, 3 * PAGE)
    assert torch.equal(got_k[0][-PAGE:], ref_k[0][-PAGE:])  # served from the overlay
    scratch = host.get_dummy_flat_data_page()
    assert not scratch.is_pinned()
    scratch.copy_(host.get_data_page(int(hidx[0])))
    host.set_from_flat_data_page(int(hidx[PAGE]), scratch)
    assert torch.equal(host.get_data_page(int(hidx[PAGE])), host.get_data_page(int(hidx[0])))


@pytest.mark.parametrize("sink", [0, 1, 3])
def test_sink_tokens_of_every_page_come_back_exact(sgl, kvh, kq, sink):
    """Every page keeps its first ``sink`` tokens exact, in its own bytes: an L3 copy
    loaded into a fresh pool restores them bit for bit; the other tokens stay quantized."""
    cfg = make_cfg(kvh, nbits_key=2, nbits_value=2, residual_length=0, sink_tokens=sink)
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, cfg)
    hidx, didx, ref_k, ref_v, got_k, got_v = roundtrip(host, dev, 3 * PAGE)
    fresh = host_pool(sgl, kvh, dev, cfg)
    fresh.alloc(PAGE)  # other host rows than the writer's
    fidx = fresh.alloc(3 * PAGE)
    for src, dst in zip(hidx[::PAGE], fidx[::PAGE]):
        fresh.set_from_flat_data_page(int(dst), host.get_data_page(int(src)).clone())
    for b in (*dev.k_buffer, *dev.v_buffer):
        b[didx] = 0
    for layer in range(LAYERS):
        fresh.load_to_device_per_layer(dev, fidx, didx, layer, "kernel")
    head = torch.zeros(3 * PAGE, dtype=torch.bool)
    for start in range(0, 3 * PAGE, PAGE):
        head[start : start + sink] = True
    for layer in range(LAYERS):
        for ref, got, l3 in (
            (ref_k, got_k, dev.k_buffer[layer][didx]),
            (ref_v, got_v, dev.v_buffer[layer][didx]),
        ):
            assert torch.equal(got[layer][head], ref[layer][head])
            assert torch.equal(l3, got[layer])
            assert (got[layer][~head] != ref[layer][~head]).any()
            if sink == 0:
                assert (got[layer][::PAGE] != ref[layer][::PAGE]).any()
        off, nbytes = host.kvtuner_layout.sink(layer, True)
        assert nbytes == sink * HEADS * HEAD_DIM * 2
        row = host.get_data_page(int(hidx[PAGE]))
        held = ref_v[layer][PAGE : PAGE + sink].contiguous().view(torch.uint8).reshape(-1)
        assert torch.equal(row[off : off + nbytes], held)


def test_residual_overlay_never_serves_a_refilled_row(sgl, kvh, kq):
    """A row refilled without free()/set_from_flat_data_page (a zero-copy storage
    read, a wrapper pool with its own allocator) loses its exact copy: the backup
    stamp in the page header no longer matches."""
    cfg = make_cfg(kvh, residual_length=PAGE)
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, cfg)
    ha, hb = host.alloc(PAGE), host.alloc(PAGE)
    host.backup_from_device_all_layer(dev, ha, torch.arange(PAGE, 2 * PAGE), "kernel")
    host.backup_from_device_all_layer(dev, hb, torch.arange(3 * PAGE, 4 * PAGE), "kernel")
    pa, pb = int(ha[0]) // PAGE, int(hb[0]) // PAGE
    assert host.kvtuner_overlay_pages() == sorted([pa, pb])
    # What page b decodes to from its quantized bytes alone:
    host._overlay_drop(torch.tensor([pb]))
    out = torch.arange(5 * PAGE, 6 * PAGE)
    host.load_to_device_per_layer(dev, hb, out, 0, "kernel")
    want = dev.k_buffer[0][out].clone()
    # Row a is overwritten in place with page b's stored bytes (as a zero-copy read would).
    host.kv_buffer[pa].copy_(host.kv_buffer[pb])
    assert host.kvtuner_check_pages(ha) == [True]
    host.load_to_device_per_layer(dev, ha, out, 0, "kernel")
    assert torch.equal(dev.k_buffer[0][out], want)


def test_residual_overlay_is_bounded_and_evicts_oldest(sgl, kvh, kq):
    cfg = make_cfg(kvh, residual_length=PAGE)  # one page per backup
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, cfg, host_size=0.002)
    exact = host.kvtuner_overlay.buffer
    slots = host.kvtuner_overlay.slots
    assert slots >= 1
    # The overlay lives inside the budget: quantized rows + exact slots <= host bytes.
    total = host.kv_buffer.numel() + exact.numel() * exact.element_size()
    assert total <= 0.002e9 + host.kvtuner_layout.row_nbytes
    assert exact.numel() * exact.element_size() <= total / 8 + 1
    backups = []
    for i in range(slots + 2):
        hidx = host.alloc(PAGE)
        host.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE, 2 * PAGE), "direct")
        backups.append(int(hidx[0]) // PAGE)
    assert host.kvtuner_overlay_pages() == sorted(backups[-slots:])


def test_residual_disabled(sgl, kvh, kq):
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, make_cfg(kvh, residual_length=0))
    assert host.kvtuner_overlay is None
    roundtrip(host, dev, 2 * PAGE)
    assert host.kvtuner_overlay_pages() == []


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (2, 2)])
def test_bytes_per_token_match_format(sgl, kvh, kq, bits):
    cfg = make_cfg(kvh, nbits_key=bits[0], nbits_value=bits[1], group_size=32)
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, cfg, host_size=0.01)
    row = expected_row_nbytes(cfg, [bits] * LAYERS, 2)
    assert host.kvtuner_layout.row_nbytes == row
    assert host.get_size_per_token() == host.size_per_token == row // PAGE
    assert tuple(host.kv_buffer.shape) == (host.page_num, row)
    assert host.kv_buffer.dtype == torch.uint8
    stock = 2 * HEADS * HEAD_DIM * LAYERS * 2
    assert host.stock_size_per_token() == stock
    # The same --hicache-size buys ~stock/quantized times more tokens. These test rows are
    # tiny (3 layers of 2 heads), so the pad to whole 8 KiB (at most one 8 KiB per page, a
    # fraction of a percent of a real model's row) is left out of the ratio and bounded alone.
    layout = host.kvtuner_layout
    assert 0 <= row - layout.payload_nbytes < math.lcm(8192, PAGE)
    ratio = stock * PAGE / layout.payload_nbytes
    assert ratio > {8: 1.5, 4: 2.5, 2: 4.0}[bits[0]], ratio
    assert host.size >= int(0.01e9 // host.size_per_token) - PAGE


def test_ratio_is_a_memory_ratio(sgl, kvh, kq):
    """--hicache-ratio buys the stock pool's bytes, so more tokens."""
    # 16 layers: rows long enough that their pad to whole 8 KiB is a small share, as in a model.
    dev = device_pool(sgl, size=4096, layers=16)
    source, geometry = host_pool_args(dev)
    args = (source, 2.0, 0, PAGE, "page_first")
    kwargs = dict(pin_memory=False, device="cpu", **geometry)
    stock = sgl["mha"].MHATokenToKVPoolHost(*args, **kwargs)
    ours = kvh.host_pool.KVTunerMHATokenToKVPoolHost(*args, **kwargs, kvtuner_config=make_cfg(kvh))
    stock_bytes = stock.kv_buffer.numel() * stock.kv_buffer.element_size()
    assert ours.kv_buffer.numel() <= stock_bytes + ours.kvtuner_layout.row_nbytes
    assert ours.size > 2.5 * stock.size


def test_preset_bits_per_layer(sgl, kvh, kq, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        "0: {nbits_key: 8, nbits_value: 4}\n"
        "1: {nbits_key: 4, nbits_value: 2}\n"
        "2: {nbits_key: 2, nbits_value: 2}\n"
    )
    cfg = kvh.config.config_from_args(
        types.SimpleNamespace(
            enable_kvtuner_hicache=True,
            kvtuner_hicache_layer_config=str(preset),
            kvtuner_hicache_q_group_size=32,
            kvtuner_hicache_residual_length=0,
            kvtuner_hicache_asym=True,
        )
    )
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, cfg)
    assert host.kvtuner_plan.layer_bits == ((8, 4), (4, 2), (2, 2))
    assert "mixed" in host.kvtuner_namespace_tag()
    assert host.kvtuner_layout.row_nbytes == expected_row_nbytes(
        cfg, host.kvtuner_plan.layer_bits, 2
    )
    _, _, ref_k, _, got_k, _ = roundtrip(host, dev, 2 * PAGE)
    errs = [(got_k[i].float() - ref_k[i].float()).abs().mean().item() for i in range(LAYERS)]
    assert errs[0] < errs[1] < errs[2]  # K8 < K4 < K2


def test_rejects_unsupported(sgl, kvh, kq):
    dev = device_pool(sgl)
    with pytest.raises(ValueError, match="--hicache-mem-layout 'layer_first' is not supported"):
        host_pool(sgl, kvh, dev, make_cfg(kvh), layout="layer_first")
    host = host_pool(sgl, kvh, dev, make_cfg(kvh), layout="page_first_direct")
    hidx = host.alloc(PAGE)
    with pytest.raises(ValueError, match="unsupported --hicache-io-backend 'kernel_ascend'"):
        host.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE), "kernel_ascend")
    with pytest.raises(ValueError, match="whole pages"):
        host.backup_from_device_all_layer(dev, hidx[:5], torch.arange(5), "kernel")


def test_load_refuses_foreign_blob(sgl, kvh, kq):
    """A row whose blobs were written under other bits is never decoded."""
    dev = device_pool(sgl)
    a = host_pool(sgl, kvh, dev, make_cfg(kvh, nbits_key=4))
    hidx = a.alloc(PAGE)
    a.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE), "kernel")
    # Corrupt layer 0's K blob header bits field in place.
    off, _ = a.kvtuner_layout.blob(0, False)
    page = int(hidx[0]) // PAGE
    a.kv_buffer[page, off + 8] = 2
    with pytest.raises(ValueError):
        a.load_to_device_per_layer(dev, hidx, torch.arange(PAGE), 0, "kernel")


@pytest.mark.parametrize("version", [1, 2])
def test_page_of_an_older_format_is_refused_by_name(sgl, kvh, kq, version):
    """A page stored before sink sections (format 1) or 4 KiB rows (2) is refused, not misread."""
    dev = device_pool(sgl)
    a = host_pool(sgl, kvh, dev, make_cfg(kvh))
    hidx = a.alloc(PAGE)
    a.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE), "kernel")
    old = a.get_data_page(int(hidx[0])).clone()
    old[8:10] = torch.tensor([version, 0], dtype=torch.uint8)  # format version u16 at byte 8
    with pytest.raises(ValueError, match=f"version: expected 3, got {version}"):
        a.set_from_flat_data_page(int(hidx[0]), old)


# -------------------------------------------------------------- storage L3 ---


def names_storage_by_format(sgl) -> bool:
    """0.5.22+ controllers put the pool's storage_format_tag into the model name
    storage backends key pages on; earlier ones pass the model name unchanged."""
    return hasattr(sgl["cache_controller"], "storage_model_name")


def storage(sgl, host, path, model="org/model"):
    """SGLang's file backend configured the way the release's controller does it."""
    hs = sgl["hicache_storage"]
    if names_storage_by_format(sgl):
        name = sgl["cache_controller"].storage_model_name(model, host)
    else:
        name = model
    cfg = storage_config(
        None, model=name, metrics=False, file_storage_path=str(path)
    )  # the fields this release's HiCacheStorageConfig has
    if "file_path" in inspect.signature(hs.HiCacheFile.__init__).parameters:
        return hs.HiCacheFile(cfg, file_path=str(path))  # releases taking it as an argument
    return hs.HiCacheFile(cfg)


class _Op:
    """The prefetch operation the generic read path reports to: newer controllers ask
    ``is_terminated()`` and return the pages read; older ones (0.5.16) call
    ``increment(tokens)`` per page read and return nothing."""

    request_id = "t"

    def __init__(self):
        self.tokens = 0

    @staticmethod
    def is_terminated():
        return False

    def increment(self, tokens):
        self.tokens += tokens
        return True


def generic_get(ctl, view, keys, host_indices) -> int:
    """Pages SGLang's generic storage read path brought into the host pool."""
    op = _Op()
    got = ctl._generic_page_get(view, op, keys, host_indices)
    return got if got is not None else op.tokens // PAGE


def controller_view(sgl, host, backend):
    """What HiCacheController's generic page get/set read from self (the host pool is
    ``storage_host_pool`` in newer controllers, ``mem_pool_host`` in older ones)."""
    return types.SimpleNamespace(
        storage_host_pool=host, mem_pool_host=host, storage_backend=backend, page_size=PAGE
    )


def test_l3_roundtrip_through_hicachefile(sgl, kvh, kq, tmp_path):
    ctl = sgl["cache_controller"].HiCacheController
    dev = device_pool(sgl)
    cfg = make_cfg(kvh, residual_length=0)
    a = host_pool(sgl, kvh, dev, cfg)
    hidx = a.alloc(3 * PAGE)
    a.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE, 4 * PAGE), "kernel")
    keys = [f"page{i}" for i in range(3)]
    fa = storage(sgl, a, tmp_path)
    assert ctl._generic_page_set(controller_view(sgl, a, fa), keys, hidx)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3
    if names_storage_by_format(sgl):
        assert all(a.storage_format_tag in f for f in files)
    assert all((tmp_path / f).stat().st_size == a.kvtuner_layout.row_nbytes for f in files)

    # A fresh pool with the same config reads them back through SGLang's generic path.
    dev2 = device_pool(sgl, seed=1)
    b = host_pool(sgl, kvh, dev2, cfg)
    b.alloc(PAGE)  # different host rows than the writer used
    hb = b.alloc(3 * PAGE)
    fb = storage(sgl, b, tmp_path)
    assert fb.batch_exists(keys) == 3
    assert generic_get(ctl, controller_view(sgl, b, fb), keys, hb) == 3
    for i in range(3):
        assert torch.equal(b.get_data_page(int(hb[i * PAGE])), a.get_data_page(int(hidx[i * PAGE])))
    for layer in range(LAYERS):
        a.load_to_device_per_layer(dev, hidx, torch.arange(0, 3 * PAGE), layer, "kernel")
        b.load_to_device_per_layer(dev2, hb, torch.arange(0, 3 * PAGE), layer, "kernel")
        assert torch.equal(dev.k_buffer[layer][: 3 * PAGE], dev2.k_buffer[layer][: 3 * PAGE])
        assert torch.equal(dev.v_buffer[layer][: 3 * PAGE], dev2.v_buffer[layer][: 3 * PAGE])


def test_l3_other_config_refused(sgl, kvh, kq, tmp_path):
    ctl = sgl["cache_controller"].HiCacheController
    dev = device_pool(sgl)
    # Same row size, different per-layer bits: only the config digest tells them apart.
    a = host_pool(sgl, kvh, dev, make_cfg(kvh, layer_bits=((0, (4, 4)), (1, (2, 2)), (2, (4, 4)))))
    b = host_pool(sgl, kvh, dev, make_cfg(kvh, layer_bits=((0, (2, 2)), (1, (4, 4)), (2, (4, 4)))))
    assert a.kvtuner_layout.row_nbytes == b.kvtuner_layout.row_nbytes
    assert a.kvtuner_namespace_tag() != b.kvtuner_namespace_tag()
    hidx = a.alloc(PAGE)
    a.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE), "kernel")
    fa = storage(sgl, a, tmp_path)
    assert ctl._generic_page_set(controller_view(sgl, a, fa), ["k0"], hidx)
    # 1) namespace: b's storage keys differ, so the page is simply absent (where the
    #    release's controller names storage by page format; before 0.5.22 the keys are
    #    shared and the header check below is what refuses the page).
    fb = storage(sgl, b, tmp_path)
    assert fb.batch_exists(["k0"]) == (0 if names_storage_by_format(sgl) else 1)
    # 2) header: even handed a's bytes, b refuses them (the controller counts a miss).
    hb = b.alloc(PAGE)
    with pytest.raises(ValueError, match="another quantization config"):
        b.set_from_flat_data_page(int(hb[0]), a.get_data_page(int(hidx[0])).clone())
    assert b.kvtuner_check_pages(hb) == [False]
    # Through SGLang's generic read path with a backend that ignores the namespace:
    # the refusal surfaces as ValueError, which HiCacheController._page_transfer
    # catches and counts as zero hits for the batch.
    fb_alias = storage(sgl, a, tmp_path)
    with pytest.raises(ValueError, match="another quantization config"):
        generic_get(ctl, controller_view(sgl, b, fb_alias), ["k0"], hb)


def test_dummy_pages_distinct_and_recycled(sgl, kvh, kq):
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, make_cfg(kvh))
    pages = [host.get_dummy_flat_data_page() for _ in range(4)]
    assert len({p.data_ptr() for p in pages}) == 4
    assert all(p.numel() == host.kvtuner_layout.row_nbytes for p in pages)
    hidx = host.alloc(PAGE)
    host.backup_from_device_all_layer(dev, hidx, torch.arange(PAGE), "kernel")
    pages[0].copy_(host.get_data_page(int(hidx[0])))
    host.set_from_flat_data_page(int(hidx[0]), pages[0])
    again = host.get_dummy_flat_data_page()
    assert again.data_ptr() == pages[0].data_ptr()  # recycled, not re-allocated


def test_page_buffer_meta_spans_whole_rows(sgl, kvh, kq):
    dev = device_pool(sgl)
    host = host_pool(sgl, kvh, dev, make_cfg(kvh))
    hidx = host.alloc(2 * PAGE)
    ptrs, sizes = host.get_page_buffer_meta(hidx)
    row = host.kvtuner_layout.row_nbytes
    assert len(ptrs) == 4 and sum(sizes) == 2 * row
    for i, page in enumerate((hidx[::PAGE] // PAGE).tolist()):
        start = host.kv_buffer[page].data_ptr()
        assert ptrs[2 * i] == start and ptrs[2 * i + 1] == start + sizes[2 * i]
    one_ptrs, one_sizes = host.kvtuner_page_spans(hidx)
    assert one_ptrs == ptrs[::2] and one_sizes == [row, row]


# ------------------------------------------------------------- selection ---


def test_without_flag_stock_pool_is_selected(sgl, kvh):
    dev = device_pool(sgl)
    info, _ = host_pool_args(dev)
    mha = sgl["mha"]
    stock = mha.MHATokenToKVPoolHost
    assert kvh.selection.select_mha_host_pool_cls(info, stock) is stock
    assert kvh.selection.select_mha_host_pool_cls(info, None) is None
    host = build_host_pool(mha, dev, 2.0, 0, PAGE, "page_first", pin_memory=False, device="cpu")
    assert type(host) is stock


def test_with_flag_our_pool_is_selected(sgl, kvh, monkeypatch):
    dev = device_pool(sgl)
    info, _ = host_pool_args(dev)
    monkeypatch.setattr(kvh.selection, "is_enabled", lambda: True)
    cls = kvh.selection.select_mha_host_pool_cls(info, sgl["mha"].MHATokenToKVPoolHost)
    assert cls is kvh.host_pool.KVTunerMHATokenToKVPoolHost
    assert issubclass(cls, sgl["mha"].MHATokenToKVPoolHost)
