"""The codec interface and the layout it reads (``codec.py``, ``page_format.py``).

* ``PageLayout`` built from ``kvtuner_quant.blob_layout`` places every blob, sink section
  and row length where page format 3 put them when it was derived from ``packed_nbytes``
  alone (re-derived here), over a grid of configurations;
* pool rows keep the bytes they had before the codec interface (pinned digests), so L3
  pages of format 3 written by the earlier pool still read;
* a codec is built from explicit parts, not from a pool: a row of one part per layer (the
  shape of an MLA pool's latent) goes through both implementations, byte for byte the same.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import struct
import threading

import pytest
import torch

from conftest import cpu_device_pool, host_pool_args, quantizing_config

# Before Triton decorates the kernels: run them in the interpreter, on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def _up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def format3_row(plan, kq):
    """Page format 3 as it was derived before the layout API: (K blobs, V blobs, sink
    sections, row bytes, page header), blob sizes from ``packed_nbytes``."""
    cfg = plan.cfg
    sink = 2 * cfg.sink_tokens * plan.head_num * plan.head_dim * ITEMSIZE[plan.dtype_name]
    k, v, sinks = [], [], []
    off = 64
    for k_bits, v_bits in plan.layer_bits:
        for bits, axis, out in ((k_bits, cfg.axis_key, k), (v_bits, cfg.axis_value, v)):
            n = kq.packed_nbytes(
                plan.page_size,
                plan.head_num,
                plan.head_dim,
                dtype=plan.dtype_name,
                bits=bits,
                asym=cfg.asym,
                axis=axis,
                group_size=cfg.group_size,
            )
            out.append((off, n))
            off = _up(off + n, 64)
        sinks.append(off)
        off = _up(off + sink, 64)
    row = _up(off, math.lcm(8192, plan.page_size))
    digest = hashlib.sha256(plan.tag().encode()).digest()[:16]
    header = struct.pack(
        "<8sHHIIQ16s", b"KVTPAGE1", 3, 64, len(plan.layer_bits), plan.page_size, row, digest
    ).ljust(64, b"\0")
    return k, v, sinks, row, header


PLAN_GRID = list(
    itertools.product(
        ("float16", "bfloat16", "float32"),
        ((4, 4), (8, 2), None),  # uniform bits, or a per-layer preset
        (True, False),
        ((1, 0), (0, 1), (0, 0)),  # (axis_key, axis_value)
        (16, 32),  # group size
        (0, 1, 3),  # sink tokens
        ((32, 2, 64), (64, 8, 128), (16, 1, 32)),  # page size, heads, head_dim
    )
)


def test_page_layout_is_page_format_3(kvh, kq):
    """Every offset, size, row length and header byte of the row, over a grid."""
    for dtype, bits, asym, (axis_k, axis_v), group, sink, (page, heads, head_dim) in PLAN_GRID:
        if (axis_k or axis_v) and group > page:
            continue  # refused: per-channel groups never cross a page
        preset = bits is None
        cfg = quantizing_config(
            kvh.config,
            nbits_key=4 if preset else bits[0],
            nbits_value=4 if preset else bits[1],
            asym=asym,
            axis_key=axis_k,
            axis_value=axis_v,
            group_size=group,
            sink_tokens=sink,
            layer_bits=((0, (8, 4)), (2, (2, 2))) if preset else None,
        )
        plan = kvh.config.resolve_layer_plan(
            cfg,
            start_layer=0,
            target_layer_num=3,
            draft_layer_num=1,
            head_num=heads,
            head_dim=head_dim,
            page_size=page,
            dtype_name=dtype,
            model_layer_num=3,
        )
        lay = kvh.page_format.PageLayout(plan, kq.blob_layout)
        k, v, sinks, row, header = format3_row(plan, kq)
        where = (dtype, bits, asym, axis_k, axis_v, group, sink, page, heads, head_dim)
        assert list(zip(lay.k_offsets, lay.k_nbytes)) == k, where
        assert list(zip(lay.v_offsets, lay.v_nbytes)) == v, where
        assert lay.sink_offsets == sinks, where
        assert lay.sink_nbytes == 2 * sink * heads * head_dim * ITEMSIZE[dtype], where
        assert lay.row_nbytes == row, where
        assert lay.header == header, where
        # Written sections and gaps tile the row: every byte is one or the other.
        written = [(0, 64), *k, *v, *((s, lay.sink_nbytes // 2) for s in sinks)]
        written += [(s + lay.sink_nbytes // 2, lay.sink_nbytes // 2) for s in sinks]
        tiles = sorted([*(w for w in written if w[1]), *lay.gaps])
        assert all(a + n == b for (a, n), (b, _) in zip(tiles, tiles[1:])), where
        assert tiles[0][0] == 0 and sum(n for _, n in tiles) == row, where
        for layer in range(len(plan.layer_bits)):
            span_off, span_nbytes = lay.layer_span(layer)
            assert span_off == k[layer][0], where
            assert span_off + span_nbytes == sinks[layer] + lay.sink_nbytes, where
            for part in (0, 1):
                blob = lay.parts[layer][part].blob
                assert blob.total_nbytes == (v if part else k)[layer][1], where
                assert blob.shape == (page, heads, head_dim), where


# ------------------------------------------------------------- pinned bytes ---

PAGE, HEADS, HEAD_DIM, LAYERS = 16, 2, 32, 2

# sha256 of every byte a backup defines (stamp left out), written by the pool before the
# codec interface (host codec; the device codec writes the same bytes, test_device_codec_pool).
PINNED = {
    "k4v4-asym": (
        dict(dtype=torch.float16),
        "c8c98e5f96024a964fc4186645bcc234290967ff1e5034d9225bfdbffa39ff79",
    ),
    "k8v2-sym-axis00-sink3": (
        dict(
            dtype=torch.bfloat16,
            nbits_key=8,
            nbits_value=2,
            asym=False,
            axis_key=0,
            sink_tokens=3,
        ),
        "e9e5b62884aa3425418d90d6f460aae8ba943d4aa6fd95f978c86a8fa1ea8819",
    ),
    "preset-f32-sink0": (
        dict(dtype=torch.float32, layer_bits=((0, (2, 8)), (1, (4, 2))), sink_tokens=0),
        "1a59d190329de1a80816655b9319fd41f095abcfd4d4c982917ff0ab3dbeb2b7",
    ),
}


def _device_pool(dtype, layers=LAYERS, seed=3):
    dev = cpu_device_pool(
        size=8 * PAGE, page_size=PAGE, heads=HEADS, head_dim=HEAD_DIM, layers=layers, dtype=dtype
    )
    g = torch.Generator().manual_seed(seed)
    for b in (*dev.k_buffer, *dev.v_buffer):
        x = torch.randn(b.shape, generator=g) * 2.0
        x[:, :, 3] *= 12.0
        x[::5] += 30.0
        b.copy_(x.to(dtype))
    return dev


def _stored_digest(host, pages) -> str:
    """sha256 of the bytes a backup defines: the page header without its stamp, the blobs
    and the sink sections (padding is whatever the allocator left)."""
    lay = host.kvtuner_layout
    rows = host.kv_buffer[pages]
    spans = [rows[:, :48], rows[:, 56:64]]
    for offs, sizes in ((lay.k_offsets, lay.k_nbytes), (lay.v_offsets, lay.v_nbytes)):
        spans += [rows[:, off : off + n] for off, n in zip(offs, sizes)]
    spans += [rows[:, off : off + lay.sink_nbytes] for off in lay.sink_offsets]
    return hashlib.sha256(torch.cat(spans, dim=1).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pool_rows_keep_their_bytes(kvh, kq, name):
    over, want = PINNED[name]
    dtype = over["dtype"]
    over = {k: v for k, v in over.items() if k != "dtype"}
    cfg = quantizing_config(kvh.config, group_size=8, codec="host", **over)
    dev = _device_pool(dtype)
    source, geometry = host_pool_args(dev)
    host = kvh.host_pool.KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        0.002,
        PAGE,
        "page_first",
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
    )
    host.alloc(4 * PAGE)
    pages = torch.tensor([3, 0, 2])
    hidx = (pages[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    didx = torch.cat([torch.arange(5 * PAGE, 6 * PAGE), torch.arange(PAGE, 3 * PAGE)])
    host.backup_from_device_all_layer(dev, hidx, didx, "kernel")
    assert _stored_digest(host, pages) == want


# ------------------------------------------------------- codecs from parts ---


def _package_module(kvh, name):
    """A module of the package the suites import (patched tree or patches/)."""
    import importlib

    return importlib.import_module(f"{kvh.host_pool.__package__}.{name}")


def test_a_codec_is_built_from_parts_not_a_pool(kvh, kq):
    """One part per layer, a column slice of a wider device buffer (how an MLA pool's
    latent sits in its rows), through both codecs built from the same parts: identical
    rows (stamps included), blobs equal to kvtuner_quant's, identical loads that leave
    the other columns alone, the sink token and the residual window exact."""
    pytest.importorskip("triton")
    codec = _package_module(kvh, "codec")
    device_transfer = _package_module(kvh, "device_transfer")
    overlay = _package_module(kvh, "overlay")
    page, width, latent, layers, dtype = 16, 80, 64, 2, torch.bfloat16
    cfg = quantizing_config(kvh.config, group_size=16, axis_key=0, sink_tokens=1)
    plan = kvh.config.resolve_layer_plan(
        cfg,
        start_layer=0,
        target_layer_num=layers,
        draft_layer_num=0,
        head_num=1,
        head_dim=latent,
        page_size=page,
        dtype_name="bfloat16",
        model_layer_num=layers,
    )
    part = kvh.page_format.PartSpec
    layout = kvh.page_format.PageLayout(
        plan, kq.blob_layout, layer_parts=[(part(1, latent, 4, 0),), (part(1, latent, 2, 0),)]
    )
    g = torch.Generator().manual_seed(11)
    buffers = [(torch.randn((8 * page, width), generator=g) * 3).to(dtype) for _ in range(layers)]
    # The device buffers both codecs read and write: a latent-like column slice of each.
    work = [b.clone() for b in buffers]
    pages = torch.tensor([4, 1, 3])
    hidx = (pages[:, None] * page + torch.arange(page)).reshape(-1)
    didx = torch.cat([torch.arange(6 * page, 7 * page), torch.arange(2 * page, 4 * page)])

    def build(cls):
        ring = torch.zeros((2, 1, layers, page, 1, latent), dtype=dtype)
        parts = codec.CodecParts(
            layout=layout,
            rows=torch.zeros((6, layout.row_nbytes), dtype=torch.uint8),
            sources=([w[:, :latent] for w in work],),
            stamps=codec.StampCounter(start=5),
            backup_lock=threading.Lock(),
            overlay=overlay.ResidualOverlay(ring, page_num=6, window_pages=1),
        )
        return cls(parts)

    codecs = {"host": build(codec.HostCodec), "device": build(device_transfer.DeviceCodec)}
    for c in codecs.values():
        assert isinstance(c, codec.PageCodec)
        c.backup(hidx, didx)
    rows = {name: c.parts.rows for name, c in codecs.items()}
    assert torch.equal(rows["host"], rows["device"])
    assert codecs["host"].exact_pages() == codecs["device"].exact_pages() == [3]
    for i, p in enumerate(pages.tolist()):
        head = rows["host"][p, :64].numpy().tobytes()
        assert head[:48] == layout.header[:48]
        assert struct.unpack_from("<Q", head, 48)[0] == 5 + i
        for layer, bits in enumerate((4, 2)):
            x = buffers[layer][didx[i * page : (i + 1) * page], :latent].reshape(page, 1, latent)
            blob = bytes(kq.quantize(x, bits=bits, asym=True, axis=0, group_size=16))
            off, n = layout.blob(layer, 0)
            assert rows["host"][p, off : off + n].numpy().tobytes() == blob

    out_rows = torch.cat([torch.arange(0, page), torch.arange(5 * page, 7 * page)])
    loaded = {}
    for name, c in codecs.items():
        for w in work:
            w.fill_(7.0)
        for layer in range(layers):
            c.load(hidx, out_rows, layer)
        loaded[name] = [w.clone() for w in work]
    for a, b in zip(loaded["host"], loaded["device"]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for layer, out in enumerate(loaded["host"]):
        assert bool((out[:, latent:] == 7.0).all())  # the exact (rope-like) columns untouched
        src = buffers[layer][:, :latent]
        got = out[:, :latent]
        sink_rows = out_rows.view(3, page)[:, 0]
        assert torch.equal(got[sink_rows], src[didx.view(3, page)[:, 0]])
        # the last page of the backup is the residual window: exact from the overlay
        assert torch.equal(got[out_rows[-page:]], src[didx[-page:]])
        assert not torch.equal(got[out_rows[:page]], src[didx[:page]])
