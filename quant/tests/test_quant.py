"""kvtuner_quant against the numpy oracle (tests/oracle.py): codes and metadata bit for bit, x_hat
within one ulp, residual tokens exact; packed format, pages, threads and every error message."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest

import kvtuner_quant as kq
import oracle
from kvtuner_quant import _native

try:
    import torch
except ImportError:  # the sglang venv has torch; a bare dev venv may not
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

BITS = [2, 4, 8]
DTYPES = ["float16", "bfloat16", "float32"]


LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2}


@pytest.fixture(params=list(LEVELS))
def path(request):
    """Run a test on every kernel family (they must give identical codes and metadata)."""
    want = LEVELS[request.param]
    got = _native._set_max_simd_level(want)
    try:
        if got != want:
            pytest.skip(f"this CPU has no {request.param} kernels")
        yield request.param
    finally:
        _native._set_max_simd_level(2)


def make(dtype: str, shape, seed=0, scale=3.0, specials=True):
    """Random input in `dtype` storage (bfloat16 as uint16 bits) with special groups planted."""
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(shape) * scale).astype(np.float32)
    if shape[-1] > 1:
        v[..., 1] *= 20  # an outlier channel, as real keys have
    if specials and shape[0] >= 12:
        v[2] = 1.25  # constant token (axis 0 groups constant)
        v[3] = 0.0
        v[:, 0, 2] = -0.75  # constant channel (axis 1 groups constant)
        v[5, 0, 3] = np.nan
        v[7, 1 % shape[1], 0] = np.inf
        v[9, 0, 5] = -np.inf
        v[10, 0, 6] = -0.0
    return oracle.rne(v, dtype)


def as_input(a: np.ndarray, dtype: str):
    """numpy for float16/float32; a torch bfloat16 tensor (or skip) for bfloat16."""
    if dtype != "bfloat16":
        return a
    if torch is None:
        pytest.skip("bfloat16 input needs torch")
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def as_storage(y, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return y.view(torch.int16).numpy().view(np.uint16)
    return y


def check(x: np.ndarray, dtype: str, **cfg):
    ref = oracle.quantize_ref(x, dtype, **cfg)
    q = kq.quantize(as_input(x, dtype), **cfg)
    codes, sbits, mbits = q._unpack()
    np.testing.assert_array_equal(np.frombuffer(codes, np.int32), ref.codes, err_msg=f"codes {cfg}")
    np.testing.assert_array_equal(
        np.frombuffer(sbits, np.uint32), ref.scale_bits, err_msg=f"scales {cfg}"
    )
    np.testing.assert_array_equal(
        np.frombuffer(mbits, np.uint32), ref.min_bits, err_msg=f"mins {cfg}"
    )
    assert q.quantized_tokens == ref.nq
    y = as_storage(kq.dequantize(q), dtype)
    assert y.shape == x.shape
    d = oracle.ulp_diff(y, ref.xhat, dtype)
    assert d.max(initial=0) <= 1, f"x_hat off by {d.max()} ulp {cfg}"
    # residual tokens bit for bit
    np.testing.assert_array_equal(y[ref.nq :].view(np.uint8), x[ref.nq :].view(np.uint8))
    return q, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("axis,group_size", [(0, 32), (0, 64), (0, 16), (0, 3), (1, 32), (1, 7)])
@pytest.mark.parametrize("residual_length", [0, 13, 100])
def test_matches_oracle(path, dtype, bits, asym, axis, group_size, residual_length):
    hd = 48 if group_size == 3 else 64
    x = make(dtype, (77, 3, hd), seed=bits * 7 + axis)
    check(
        x,
        dtype,
        bits=bits,
        asym=asym,
        axis=axis,
        group_size=group_size,
        residual_length=residual_length,
    )


def test_version_is_the_installed_distributions():
    import importlib.metadata

    assert kq.__version__ == importlib.metadata.version("kvtuner_quant")


def test_ties_round_half_even():
    # asym 2-bit group [0, 3]: scale 1, quotients 0.5, 1.5, 2.5 are exact ties -> 0, 2, 2
    x = np.array([0, 0.5, 1.5, 2.5, 3, 0, 0, 0], np.float32).reshape(1, 1, 8)
    q = kq.quantize(x, bits=2, asym=True, axis=0, group_size=8)
    assert list(np.frombuffer(q._unpack()[0], np.int32)) == [0, 0, 2, 2, 3, 0, 0, 0]


def test_constant_nan_inf_groups():
    x = np.ones((4, 1, 32), np.float16) * np.float16(0.3)
    x[1, 0, 3] = np.nan
    x[2, 0, 0] = np.inf
    x[3] = 0
    q = kq.quantize(x, bits=4, asym=True, axis=0, group_size=32)
    y = kq.dequantize(q)
    np.testing.assert_array_equal(y[0], x[0])  # constant group exact
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    np.testing.assert_array_equal(y[3], x[3])
    scales = np.frombuffer(q._unpack()[1], np.uint32)
    assert list(scales[1:3]) == [0x7E00, 0x7E00]
    qs = kq.quantize(x, bits=4, asym=False, axis=0, group_size=32)
    ys = kq.dequantize(qs)
    np.testing.assert_array_equal(ys[3], 0)
    assert np.isnan(ys[1]).all()


def test_largest_element_never_clamps():
    # M_up: the scale is rounded up, so the max maps to a code <= 2^b - 1 and x_hat(max) is within scale/2
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 2, 64)).astype(np.float16)
    for bits in BITS:
        q, ref = check(x, "float16", bits=bits, asym=True, axis=0, group_size=64)
        s = ref.scale.reshape(256, 2, 1, 1)
        t = (ref.mx.reshape(256, 2, 1, 1) - ref.mn.reshape(256, 2, 1, 1)) / s
        assert (t <= 2**bits - 1).all()


def test_packed_bytes_and_header():
    x = make("float16", (40, 2, 64), specials=False)
    q = kq.quantize(x, bits=4, asym=True, axis=1, group_size=16, residual_length=5)
    b = bytes(q)
    assert len(b) == q.nbytes == len(q)
    assert b[:4] == b"KVQT"
    magic, version, hn, bits, asym, axis, dt, g, r = struct.unpack_from("<4sHHBBBBII", b)
    assert (version, hn, bits, asym, axis, dt, g, r) == (1, kq.HEADER_NBYTES, 4, 1, 1, 1, 16, 5)
    assert struct.unpack_from("<QIIQ", b, 24) == (40, 2, 64, len(b))
    assert q.nbytes == kq.packed_nbytes(
        40, 2, 64, dtype="float16", bits=4, asym=True, axis=1, group_size=16, residual_length=5
    )
    assert q.nbytes == kq.packed_nbytes(
        40, 2, 64, dtype=np.float16, bits=4, asym=True, axis=1, group_size=16, residual_length=5
    )
    # 40 tokens, window 5 -> 35 before -> 2 groups of 16; tokens 32..39 stored exactly
    assert q.quantized_tokens == 32
    # zero-copy buffer view
    mv = memoryview(q)
    assert mv.readonly and mv.nbytes == q.nbytes and bytes(mv) == b
    a = np.frombuffer(q, np.uint8)
    assert a.tobytes() == b
    # from_bytes round trip, attributes
    q2 = kq.QuantizedTensor.from_bytes(b)
    assert q2 == q
    assert (q2.shape, q2.dtype, q2.bits, q2.asym, q2.axis, q2.group_size, q2.residual_length) == (
        (40, 2, 64),
        "float16",
        4,
        True,
        1,
        16,
        5,
    )
    np.testing.assert_array_equal(kq.dequantize(q2), kq.dequantize(q))
    assert kq.QuantizedTensor.from_bytes(bytearray(b)) == q
    assert kq.QuantizedTensor.from_bytes(np.frombuffer(b, np.uint8)) == q
    assert "bits=4" in repr(q)


def _format_md_layout(tokens, heads, head_dim, itemsize, bits, asym, axis, group, residual):
    """FORMAT.md's section table, read independently of the crate: name -> (offset, length)."""

    def up8(n):
        return (n + 7) // 8 * 8

    c = heads * head_dim
    before = tokens - min(residual, tokens)
    nq = before if axis == 0 else before // group * group
    codes = (nq * c * bits + 7) // 8
    meta = nq * c // group * itemsize
    scales_off = up8(64 + codes)
    mins_off = up8(scales_off + meta)
    residual_off = up8(mins_off + meta) if asym else mins_off
    return dict(
        nq=nq,
        codes=(64, codes),
        scales=(scales_off, meta),
        mins=(mins_off, meta if asym else 0),
        residual=(residual_off, (tokens - nq) * c * itemsize),
    )


LAYOUT_GRID = [
    (tokens, heads, head_dim, dtype, bits, asym, axis, group, residual)
    for tokens, heads, head_dim in [(16, 2, 16), (64, 8, 128), (24, 1, 40), (0, 2, 16), (1, 1, 8)]
    for dtype in DTYPES
    for bits in BITS
    for asym in (False, True)
    for axis, group in [(0, 8), (1, 16), (1, 5)]
    for residual in (0, 5, 64)
    if axis == 1 or head_dim % group == 0
]


def test_blob_layout_is_format_md_and_the_bytes_written():
    """blob_layout (the geometry the device codec and the page format read) against an
    independent reading of FORMAT.md, and against the header and padding quantize writes."""
    for tokens, heads, head_dim, dtype, bits, asym, axis, group, residual in LAYOUT_GRID:
        cfg = dict(bits=bits, asym=asym, axis=axis, group_size=group, residual_length=residual)
        lay = kq.blob_layout(tokens, heads, head_dim, dtype=dtype, **cfg)
        itemsize = 4 if dtype == "float32" else 2
        want = _format_md_layout(
            tokens, heads, head_dim, itemsize, bits, asym, axis, group, residual
        )
        where = (tokens, heads, head_dim, dtype, cfg)
        assert lay.nq == want["nq"], where
        assert (lay.codes_off, lay.codes_nbytes) == want["codes"], where
        assert (lay.scales_off, lay.meta_nbytes) == want["scales"], where
        assert lay.mins_off == want["mins"][0], where
        assert (lay.residual_off, lay.residual_nbytes) == want["residual"], where
        assert lay.total_nbytes == sum(want["residual"]), where
        assert lay.ngroups * itemsize == lay.meta_nbytes, where
        assert (lay.shape, lay.dtype, lay.itemsize) == ((tokens, heads, head_dim), dtype, itemsize)
        assert lay.codec_kwargs() == cfg
        assert lay.total_nbytes == kq.packed_nbytes(tokens, heads, head_dim, dtype=dtype, **cfg)
        x = make(dtype, (tokens, heads, head_dim), seed=tokens, specials=False)
        blob = bytes(kq.quantize(as_input(x, dtype), **cfg))
        assert blob[: kq.HEADER_NBYTES] == lay.header, where
        magic, version, hn, b, a, ax, dt, g, r = struct.unpack_from("<4sHHBBBBII", lay.header)
        assert (magic, version, hn, b, a, ax, g, r) == (
            b"KVQT",
            1,
            64,
            bits,
            asym,
            axis,
            group,
            residual,
        )
        assert struct.unpack_from("<QIIQ", lay.header, 24) == (tokens, heads, head_dim, len(blob))
        # Padding: exactly the gaps between the sections FORMAT.md lists, and zero in the blob.
        sections = [want["codes"], want["scales"], want["mins"], want["residual"]]
        gaps = [(o + n, nxt) for (o, n), (nxt, _) in zip(sections, sections[1:]) if nxt > o + n]
        assert lay.padding == gaps, where
        assert all(blob[start:end] == bytes(end - start) for start, end in lay.padding), where
    lay = kq.blob_layout(16, 2, 16, dtype=np.float16, bits=4, asym=True, axis=0, group_size=8)
    assert lay == kq.blob_layout(
        16, 2, 16, dtype="float16", bits=4, asym=True, axis=0, group_size=8
    )
    assert (
        len(
            {
                lay,
                kq.blob_layout(16, 2, 16, dtype="float16", bits=4, asym=True, axis=0, group_size=8),
            }
        )
        == 1
    )
    assert lay != kq.blob_layout(
        16, 2, 16, dtype="float16", bits=2, asym=True, axis=0, group_size=8
    )
    assert "total_nbytes=" in repr(lay)
    with pytest.raises(ValueError, match="group_size must divide head_dim"):
        kq.blob_layout(16, 2, 16, dtype="float16", bits=4, asym=True, axis=0, group_size=5)
    with pytest.raises(ValueError, match="bits"):
        kq.blob_layout(16, 2, 16, dtype="float16", bits=3, asym=True, axis=0, group_size=8)


def test_sizes_are_sub_byte():
    # int4 g64 with fp16 scale+min: 4.5 bits per element (+ header, padding)
    n = kq.packed_nbytes(1024, 8, 128, dtype="float16", bits=4, asym=True, axis=0, group_size=64)
    assert n == kq.HEADER_NBYTES + 1024 * 8 * 128 * 4.5 / 8
    n2 = kq.packed_nbytes(1024, 8, 128, dtype="float16", bits=2, asym=True, axis=0, group_size=32)
    assert n2 == kq.HEADER_NBYTES + 1024 * 8 * 128 * 3 / 8


@pytest.mark.parametrize(
    "field,offset,value,msg",
    [
        ("magic", 0, b"XXXX", "magic"),
        ("version", 4, struct.pack("<H", 2), "version: expected 1, got 2"),
        ("bits", 8, b"\x03", "bits must be 2, 4 or 8, got 3"),
        ("asym", 9, b"\x05", "asym: expected 0 or 1, got 5"),
        ("axis", 10, b"\x07", "axis must be 0"),
        ("dtype", 11, b"\x09", "dtype: expected 1, 2 or 3, got 9"),
        ("group_size", 12, struct.pack("<I", 5), "group_size must divide head_dim (64)"),
        ("tokens", 24, struct.pack("<Q", 41), "total_nbytes"),
        ("reserved", 50, b"\x01", "reserved"),
    ],
)
def test_from_bytes_rejects_bad_headers(field, offset, value, msg):
    q = kq.quantize(
        make("float16", (40, 2, 64), specials=False), bits=4, asym=True, axis=0, group_size=32
    )
    b = bytearray(bytes(q))
    b[offset : offset + len(value)] = value
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        kq.QuantizedTensor.from_bytes(bytes(b))


def test_from_bytes_rejects_wrong_size():
    b = bytes(
        kq.quantize(np.zeros((4, 1, 32), np.float16), bits=2, asym=True, axis=0, group_size=32)
    )
    with pytest.raises(ValueError, match="total_nbytes"):
        kq.QuantizedTensor.from_bytes(b[:-1])
    with pytest.raises(ValueError, match="expected exactly total_nbytes"):
        kq.QuantizedTensor.from_bytes(b + b"\0")
    with pytest.raises(ValueError, match="at least the 64-byte header"):
        kq.QuantizedTensor.from_bytes(b"KVQT")


def test_argument_errors():
    x = np.zeros((8, 2, 64), np.float16)
    cfg = dict(bits=4, asym=True, axis=0, group_size=32)
    with pytest.raises(
        TypeError, match="x must have dtype float16, bfloat16 or float32, got int32"
    ):
        kq.quantize(x.astype(np.int32), **cfg)
    with pytest.raises(
        TypeError, match="x must have dtype float16, bfloat16 or float32, got float64"
    ):
        kq.quantize(x.astype(np.float64), **cfg)
    with pytest.raises(TypeError, match="x must be a numpy array or a CPU torch tensor, got list"):
        kq.quantize([[[1.0]]], **cfg)
    with pytest.raises(ValueError, match=r"x must be C-contiguous"):
        kq.quantize(np.zeros((2, 8, 64), np.float16).transpose(1, 0, 2), **cfg)
    with pytest.raises(ValueError, match=r"x must be 3-D \[tokens, heads, head_dim\], got 2-D"):
        kq.quantize(np.zeros((8, 64), np.float16), **cfg)
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8, got 3"):
        kq.quantize(x, **{**cfg, "bits": 3})
    with pytest.raises(
        ValueError, match=r"group_size must divide head_dim \(64\) for axis 0, got 48"
    ):
        kq.quantize(x, **{**cfg, "group_size": 48})
    with pytest.raises(ValueError, match="group_size must be a positive integer, got 0"):
        kq.quantize(x, **{**cfg, "group_size": 0})
    with pytest.raises(ValueError, match="axis must be 0 .per-token. or 1 .per-channel., got 2"):
        kq.quantize(x, **{**cfg, "axis": 2})
    with pytest.raises(ValueError, match="residual_length must be >= 0, got -1"):
        kq.quantize(x, **{**cfg, "residual_length": -1})
    q = kq.quantize(x, **cfg)
    with pytest.raises(TypeError, match="out must have dtype float16, got float32"):
        kq.dequantize(q, out=np.zeros((8, 2, 64), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(8, 2, 64\), got \(8, 2, 32\)"):
        kq.dequantize(q, out=np.zeros((8, 2, 32), np.float16))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        kq.dequantize(q, out=np.zeros((8, 2, 128), np.float16)[:, :, ::2])
    with pytest.raises(TypeError, match="out must be a writable array"):
        ro = np.zeros((8, 2, 64), np.float16)
        ro.flags.writeable = False
        kq.dequantize(q, out=ro)
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        kq.dequantize(b"abc")
    with pytest.raises(TypeError, match="dtype must be one of"):
        kq.packed_nbytes(1, 1, 32, dtype="int8", bits=4, asym=True, axis=0, group_size=32)


def test_dequantize_out_is_filled_in_place():
    x = make("float32", (20, 2, 32), specials=False)
    q = kq.quantize(x, bits=8, asym=False, axis=1, group_size=4)
    out = np.full_like(x, 7.0)
    r = kq.dequantize(q, out=out)
    assert r is out
    np.testing.assert_array_equal(out, kq.dequantize(q))


@needs_torch
def test_torch_inputs_zero_copy_and_outputs():
    t = torch.randn(33, 3, 64).to(torch.bfloat16)
    q = kq.quantize(t, bits=4, asym=True, axis=1, group_size=8, residual_length=4)
    assert q.dtype == "bfloat16"
    y = kq.dequantize(q)
    assert (
        isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and tuple(y.shape) == (33, 3, 64)
    )
    bits = t.view(torch.int16).numpy().view(np.uint16)
    ref = oracle.quantize_ref(
        bits, "bfloat16", bits=4, asym=True, axis=1, group_size=8, residual_length=4
    )
    assert (
        oracle.ulp_diff(y.view(torch.int16).numpy().view(np.uint16), ref.xhat, "bfloat16").max()
        <= 1
    )
    out = torch.empty(33, 3, 64, dtype=torch.bfloat16)
    assert kq.dequantize(q, out=out) is out
    assert torch.equal(out, y)
    # float16 / float32 tensors, requires_grad is fine (no copy, no autograd)
    for dt in (torch.float16, torch.float32):
        tt = torch.randn(16, 2, 64, dtype=dt, requires_grad=dt == torch.float32)
        qa = kq.quantize(tt, bits=8, asym=True, axis=0, group_size=64)
        qb = kq.quantize(tt.detach().numpy(), bits=8, asym=True, axis=0, group_size=64)
        assert bytes(qa) == bytes(qb)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        kq.quantize(torch.randn(64, 2, 16).transpose(0, 2), bits=4, asym=True, axis=1, group_size=8)
    with pytest.raises(
        TypeError, match="x must have dtype float16, bfloat16 or float32, got torch.int32"
    ):
        kq.quantize(
            torch.zeros(4, 1, 32, dtype=torch.int32), bits=4, asym=True, axis=0, group_size=32
        )
    assert kq.packed_nbytes(
        8, 1, 64, dtype=torch.bfloat16, bits=2, asym=False, axis=0, group_size=32
    ) == kq.packed_nbytes(8, 1, 64, dtype="bfloat16", bits=2, asym=False, axis=0, group_size=32)


PAGE_CFG = [
    dict(bits=4, asym=True, axis=0, group_size=64),
    dict(bits=2, asym=True, axis=1, group_size=32, residual_length=0),
    dict(bits=8, asym=False, axis=1, group_size=16, residual_length=8),
    dict(bits=2, asym=False, axis=0, group_size=32, residual_length=3),
]


@pytest.mark.parametrize("cfg", PAGE_CFG)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pages_equal_single_blobs_strided_dst(cfg, dtype):
    P, n, H, D = 64, 6, 3, 64
    x = make(dtype, (n * P, H, D), seed=11)
    blob = kq.packed_nbytes(P, H, D, dtype=dtype, **cfg)
    big = np.full((10, 3 * blob + 100), 0xAB, np.uint8)
    dst = big[:, blob + 7 : 2 * blob + 20]  # a column slice: row stride > row length
    ids = np.array([3, 0, 9, 5, 1, 7], np.int64)
    kq.quantize_pages(as_input(x, dtype), dst, ids, page_tokens=P, **cfg)
    for i, pid in enumerate(ids):
        one = bytes(kq.quantize(as_input(x[i * P : (i + 1) * P], dtype), **cfg))
        assert dst[pid, :blob].tobytes() == one, f"page {i}"
        assert (dst[pid, blob:] == 0xAB).all()
    untouched = [r for r in range(10) if r not in ids]
    assert (big[untouched] == 0xAB).all()
    assert (big[:, : blob + 7] == 0xAB).all()
    # read back: equal to per-page dequantize
    out = np.zeros_like(x) if dtype != "bfloat16" else None
    if dtype == "bfloat16":
        out_t = torch.zeros(n * P, H, D, dtype=torch.bfloat16)
        kq.dequantize_pages(dst, ids, out_t, **cfg)
        out = as_storage(out_t, dtype)
    else:
        kq.dequantize_pages(dst, ids, out, **cfg)
    for i, pid in enumerate(ids):
        q = kq.QuantizedTensor.from_bytes(dst[pid, :blob].tobytes())
        np.testing.assert_array_equal(
            out[i * P : (i + 1) * P].view(np.uint8),
            as_storage(kq.dequantize(q), dtype).view(np.uint8),
        )


@needs_torch
def test_pages_torch_buffers():
    P, n, H, D = 32, 4, 2, 64
    cfg = dict(bits=4, asym=True, axis=1, group_size=32)
    x = torch.randn(n * P, H, D).to(torch.bfloat16)
    blob = kq.packed_nbytes(P, H, D, dtype=torch.bfloat16, **cfg)
    buf = torch.zeros(8, blob * 2, dtype=torch.uint8)
    dst = buf[:, blob // 2 : blob // 2 + blob]
    ids = torch.tensor([6, 2, 0, 4])
    kq.quantize_pages(x, dst, ids, page_tokens=P, **cfg)
    out = torch.empty_like(x)
    kq.dequantize_pages(dst, ids, out, **cfg)
    for i in range(n):
        q = kq.quantize(x[i * P : (i + 1) * P], **cfg)
        assert bytes(dst[int(ids[i])].numpy()) == bytes(q)
        assert torch.equal(out[i * P : (i + 1) * P], kq.dequantize(q))


def test_pages_errors_and_no_partial_success():
    P, n, H, D = 16, 3, 2, 32
    cfg = dict(bits=4, asym=True, axis=0, group_size=32)
    x = make("float16", (n * P, H, D), specials=False)
    blob = kq.packed_nbytes(P, H, D, dtype="float16", **cfg)
    dst = np.zeros((5, blob), np.uint8)
    ids = np.array([4, 1, 2], np.int64)
    with pytest.raises(
        ValueError, match=r"page_ids\[1\] = 5 is out of range: expected 0 <= id < 5"
    ):
        kq.quantize_pages(x, dst, np.array([4, 5, 2]), page_tokens=P, **cfg)
    with pytest.raises(ValueError, match=r"page_ids\[2\] = -1 is out of range"):
        kq.quantize_pages(x, dst, np.array([4, 1, -1]), page_tokens=P, **cfg)
    with pytest.raises(ValueError, match=r"page_ids\[2\] = 4 is repeated"):
        kq.quantize_pages(x, dst, np.array([4, 1, 4]), page_tokens=P, **cfg)
    with pytest.raises(TypeError, match="page_ids must have dtype int64, got int32"):
        kq.quantize_pages(x, dst, ids.astype(np.int32), page_tokens=P, **cfg)
    with pytest.raises(
        ValueError, match=r"x must have len\(page_ids\) \* page_tokens = 3 \* 8 tokens, got 48"
    ):
        kq.quantize_pages(x, dst, ids, page_tokens=8, **cfg)
    with pytest.raises(
        ValueError,
        match=f"dst rows hold {blob - 1} bytes, expected at least packed_nbytes = {blob}",
    ):
        kq.quantize_pages(x, np.zeros((5, blob - 1), np.uint8), ids, page_tokens=P, **cfg)
    with pytest.raises(TypeError, match="dst must have dtype uint8, got int8"):
        kq.quantize_pages(x, dst.view(np.int8), ids, page_tokens=P, **cfg)
    with pytest.raises(ValueError, match="dst must be 2-D"):
        kq.quantize_pages(x, dst.reshape(-1), ids, page_tokens=P, **cfg)
    with pytest.raises(ValueError, match=r"dst rows must be contiguous \(column stride 1\)"):
        kq.quantize_pages(x, np.zeros((5, 2 * blob), np.uint8)[:, ::2], ids, page_tokens=P, **cfg)
    with pytest.raises(TypeError, match="dst must be a writable array"):
        ro = dst.copy()
        ro.flags.writeable = False
        kq.quantize_pages(x, ro, ids, page_tokens=P, **cfg)
    kq.quantize_pages(x, dst, ids, page_tokens=P, **cfg)
    # a page written under another configuration (2-bit) -> named page and field, out untouched
    other = kq.quantize(x[:P], **{**cfg, "bits": 2})
    dst[2, : other.nbytes] = np.frombuffer(other, np.uint8)
    out = np.full_like(x, 9)
    with pytest.raises(
        ValueError, match=r"page 2 \(page id 2\): header field bits: expected 4, got 2"
    ):
        kq.dequantize_pages(dst, ids, out, **cfg)
    assert (out == 9).all()
    with pytest.raises(
        ValueError, match=r"page 0 \(page id 4\): header field group_size: expected 16, got 32"
    ):
        kq.dequantize_pages(dst, ids, out, **{**cfg, "group_size": 16})
    with pytest.raises(ValueError, match=r"page 1 \(page id 0\): magic"):
        kq.dequantize_pages(dst, np.array([4, 0, 1]), out, **cfg)
    with pytest.raises(
        ValueError, match=r"page 0 \(page id 4\): header field dtype: expected float32, got float16"
    ):
        kq.dequantize_pages(dst, ids, np.zeros(x.shape, np.float32), **cfg)
    with pytest.raises(
        ValueError, match=r"header field shape: expected \[8, 2, 32\], got \[16, 2, 32\]"
    ):
        kq.dequantize_pages(dst, np.array([4, 1, 2, 0, 3, 1]), out, **cfg)
    with pytest.raises(
        ValueError, match=r"out has 48 tokens, expected a multiple of len\(page_ids\) = 5"
    ):
        kq.dequantize_pages(dst, np.array([4, 1, 2, 0, 3]), out, **cfg)
    with pytest.raises(ValueError, match="out has 48 tokens but page_ids is empty"):
        kq.dequantize_pages(dst, np.array([], np.int64), out, **cfg)
    assert (out == 9).all()
    with pytest.raises(ValueError, match="must not share memory"):
        kq.quantize_pages(x, x.view(np.uint8).reshape(n * P, -1)[:5], ids, page_tokens=P, **cfg)


def test_threads_knob_and_parallel_equality():
    x = make("float16", (4096, 4, 128), seed=3, specials=False)
    before = kq.get_num_threads()
    try:
        kq.set_num_threads(1)
        assert kq.get_num_threads() == 1
        a = bytes(kq.quantize(x, bits=4, asym=True, axis=0, group_size=64))
        kq.set_num_threads(4)
        assert kq.get_num_threads() == 4
        b = bytes(kq.quantize(x, bits=4, asym=True, axis=0, group_size=64))
        assert a == b
        with pytest.raises(ValueError, match="n must be >= 1, got 0"):
            kq.set_num_threads(0)
    finally:
        kq.set_num_threads(before)


def test_gil_released_concurrent_calls():
    # calls from several Python threads run concurrently and stay correct
    x = make("float16", (2048, 4, 128), seed=4, specials=False)
    want = bytes(kq.quantize(x, bits=2, asym=True, axis=1, group_size=32))
    got = []

    def work():
        for _ in range(3):
            got.append(bytes(kq.quantize(x, bits=2, asym=True, axis=1, group_size=32)) == want)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [True] * 12


def test_empty_and_tiny_shapes():
    for T in (0, 1, 5):
        x = make("float32", (T, 1, 8), specials=False)
        for axis in (0, 1):
            check(x, "float32", bits=2, asym=True, axis=axis, group_size=4)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=150, deadline=None)
    @given(
        dtype=st.sampled_from(DTYPES[::2] if torch is None else DTYPES),
        bits=st.sampled_from(BITS),
        asym=st.booleans(),
        axis=st.integers(0, 1),
        g=st.integers(1, 40),
        mult=st.integers(1, 4),
        tokens=st.integers(0, 70),
        heads=st.integers(1, 3),
        res=st.integers(0, 80),
        seed=st.integers(0, 2**32 - 1),
        scale=st.sampled_from([1e-6, 1.0, 100.0, 3e4]),
    )
    def test_hypothesis_against_oracle(
        dtype, bits, asym, axis, g, mult, tokens, heads, res, seed, scale
    ):
        hd = g * mult if axis == 0 else 8 * mult
        x = make(
            dtype, (tokens, heads, hd), seed=seed, scale=scale, specials=tokens >= 12 and hd >= 8
        )
        check(x, dtype, bits=bits, asym=asym, axis=axis, group_size=g, residual_length=res)


def test_ml_dtypes_bfloat16_numpy():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits16 = make("bfloat16", (40, 2, 64), seed=9)
    x = bits16.view(ml_dtypes.bfloat16)
    q = kq.quantize(x, bits=4, asym=True, axis=1, group_size=16, residual_length=3)
    assert q.dtype == "bfloat16"
    ref = oracle.quantize_ref(
        bits16, "bfloat16", bits=4, asym=True, axis=1, group_size=16, residual_length=3
    )
    np.testing.assert_array_equal(np.frombuffer(q._unpack()[1], np.uint32), ref.scale_bits)
    out = np.empty(x.shape, ml_dtypes.bfloat16)
    kq.dequantize(q, out=out)
    assert oracle.ulp_diff(out.view(np.uint16), ref.xhat, "bfloat16").max() <= 1
