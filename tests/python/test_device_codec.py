"""The device codec's Triton kernels against the host codec (``kvtuner_quant``).

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below)
on CPU tensors standing for the device buffers and the pinned host rows. For every
configuration the pool accepts: host rows written by the kernels equal the host
codec's byte for byte (padding between blobs included), and loads give the same
device rows bit for bit. Page ids are unsorted and non-contiguous, device rows are
scattered, and the data holds constant, zero, NaN, +-Inf and subnormal groups.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

# Before Triton decorates the kernels: run them in the interpreter, on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvtuner_hicache import device_codec as dc  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# (page tokens, heads, head_dim, group size): two page sizes x two head shapes;
# the third shape leaves a per-channel tail (24 % 16) stored exactly.
SHAPES = [(16, 2, 16, 8), (32, 1, 32, 16), (24, 2, 16, 16)]
HOST_PAGES = 7
PAGES = torch.tensor([5, 0, 3], dtype=torch.int64)  # unsorted, with gaps
DEVICE_ROWS = 200


def blob_spec(shape, dtype, bits, asym, axis, residual_length=0):
    tokens, heads, head_dim, group = shape
    return dc.BlobSpec(tokens, heads, head_dim, dtype, bits, asym, axis, group, residual_length)


def device_buffer(spec: dc.BlobSpec, seed: int) -> torch.Tensor:
    """[rows, heads, head_dim] of random data with special groups planted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((DEVICE_ROWS, spec.heads, spec.head_dim), generator=g) * 3.0
    x[:, :, 1] *= 20.0  # an outlier channel
    x[7] = 2.5  # a constant token (constant per-token groups)
    x[9] = 0.0
    x[11, 0, : spec.group_size] = -0.0
    x[:, 0, 2] = 1.0  # a constant channel (constant per-channel groups)
    x[13, 1 % spec.heads, 3] = float("nan")
    x[17, 0, 5] = float("inf")
    x[19, 0, 6] = float("-inf")
    x[23, 0, 4] = 1e-7  # subnormal in fp16
    x[21, 0, 7] = 1e-39  # subnormal in float32 and bf16
    return x.to(DTYPES[spec.dtype_name])


def scattered_rows(spec: dc.BlobSpec, seed: int) -> torch.Tensor:
    """Device rows of each page's tokens: a random subset, so pages gather from
    everywhere, and rows 7-23 (the planted values) always included."""
    g = torch.Generator().manual_seed(seed + 1)
    need = len(PAGES) * spec.tokens
    planted = torch.arange(7, 24)
    rest = torch.randperm(DEVICE_ROWS, generator=g)
    rest = rest[(rest < 7) | (rest >= 24)][: need - len(planted)]
    rows = torch.cat([planted, rest])
    return rows[torch.randperm(need, generator=g)].to(torch.int64)


def host_rows(row_nbytes: int, seed: int) -> torch.Tensor:
    """Pinned-host-row stand-in filled with junk, so only written bytes can match."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, 256, (HOST_PAGES, row_nbytes), generator=g, dtype=torch.uint8)


def kq_kwargs(spec: dc.BlobSpec) -> dict:
    return dict(
        bits=spec.bits,
        asym=spec.asym,
        axis=spec.axis,
        group_size=spec.group_size,
        residual_length=spec.residual_length,
    )


CASES = [
    (shape, dtype, bits, asym, axis)
    for shape, dtype, bits, asym, axis in itertools.product(
        SHAPES, DTYPES, (2, 4, 8), (False, True), (0, 1)
    )
    # Trim the grid: the per-channel tail shape runs per-channel only, float32
    # (the device KV dtype of no real deployment) the first shape only.
    if not (shape[0] % shape[3] and axis == 0) and (dtype != "float32" or shape == SHAPES[0])
]


def test_layout_matches_kvtuner_quant(kq):
    """Section offsets, sizes and header bytes equal kvtuner_quant's blobs."""
    for shape, dtype, bits, asym, axis in CASES:
        for residual in (0, 5, 64):
            spec = blob_spec(shape, dtype, bits, asym, axis, residual)
            dims = (spec.tokens, spec.heads, spec.head_dim)
            packed = kq.packed_nbytes(*dims, dtype=dtype, **kq_kwargs(spec))
            assert spec.total_nbytes == packed, spec
            x = torch.zeros(dims, dtype=DTYPES[dtype])
            blob = bytes(kq.quantize(x, **kq_kwargs(spec)))
            assert blob[: kq.HEADER_NBYTES] == spec.header(), spec


@pytest.mark.parametrize("shape,dtype,bits,asym,axis", CASES)
def test_rows_and_loads_equal_host_codec(kq, shape, dtype, bits, asym, axis):
    spec = blob_spec(shape, dtype, bits, asym, axis)
    seed = hash((shape, dtype, bits, asym, axis)) & 0xFFFF
    src = device_buffer(spec, seed)
    rows = scattered_rows(spec, seed)
    blob_off = 128  # a blob behind another one, as in a pool row
    row_nbytes = blob_off + (spec.total_nbytes + 63) // 64 * 64 + 64

    ours = host_rows(row_nbytes, seed)
    theirs = ours.clone()
    dc.quantize_pages(src, rows, ours, PAGES, blob_off, dc.BlobTemplate(spec, src.device))
    kq.quantize_pages(
        src[rows].contiguous(),
        theirs[:, blob_off : blob_off + spec.total_nbytes],
        PAGES.numpy(),
        page_tokens=spec.tokens,
        **kq_kwargs(spec),
    )
    diff = (ours != theirs).nonzero()
    assert diff.numel() == 0, (
        f"{len(diff)} bytes differ, first at (page row, byte) {diff[:4].tolist()}"
    )

    # Load: dequantize into other scattered device rows; untouched rows keep their junk.
    out_rows = scattered_rows(spec, seed + 7)
    expect = torch.empty((len(PAGES) * spec.tokens, spec.heads, spec.head_dim), dtype=src.dtype)
    kq.dequantize_pages(
        theirs[:, blob_off : blob_off + spec.total_nbytes], PAGES.numpy(), expect, **kq_kwargs(spec)
    )
    theirs_out = torch.full_like(src, 7.0)
    theirs_out[out_rows] = expect
    # Straight from the host rows, and through a device copy of a wider span.
    span = dc.gather_spans(ours, PAGES, blob_off - 64, spec.total_nbytes + 64, src.device)
    for staged in (None, (span, 64)):
        ours_out = torch.full_like(src, 7.0)
        dc.dequantize_pages(ours, PAGES, blob_off, spec, ours_out, out_rows, staged=staged)
        same = ours_out.view(dc._INT_VIEW[src.dtype]) == theirs_out.view(dc._INT_VIEW[src.dtype])
        assert bool(same.all()), (
            f"{int((~same).sum())} loaded elements differ (staged: {staged is not None})"
        )


@pytest.mark.parametrize("group", [128, 256])
def test_long_per_channel_groups(kq, group):
    """Groups longer than one stats tile holds at the default block (fewer groups per
    program), as with big pages and per-channel keys."""
    spec = blob_spec((group, 1, 8, group), "bfloat16", 4, True, 1)
    src = torch.randn((4 * group, 1, 8)).to(torch.bfloat16)
    rows = torch.randperm(4 * group)[: len(PAGES) * group].to(torch.int64)
    ours = host_rows(spec.total_nbytes, group)
    theirs = ours.clone()
    dc.quantize_pages(src, rows, ours, PAGES, 0, dc.BlobTemplate(spec, src.device))
    kq.quantize_pages(
        src[rows].contiguous(), theirs, PAGES.numpy(), page_tokens=group, **kq_kwargs(spec)
    )
    assert torch.equal(ours, theirs)


def test_residual_section_matches(kq):
    """A blob with a residual window (a format feature the pool does not use)."""
    for axis in (0, 1):
        spec = blob_spec((16, 2, 16, 8), "bfloat16", 4, True, axis, residual_length=5)
        src = device_buffer(spec, 3)
        rows = scattered_rows(spec, 3)
        ours = host_rows(spec.total_nbytes, 3)
        theirs = ours.clone()
        dc.quantize_pages(src, rows, ours, PAGES, 0, dc.BlobTemplate(spec, src.device))
        kq.quantize_pages(
            src[rows].contiguous(), theirs, PAGES.numpy(), page_tokens=16, **kq_kwargs(spec)
        )
        assert torch.equal(ours, theirs)


def test_huge_bf16_groups_match(kq):
    """bf16 groups whose range overflows float32 (an infinite scale) and whose
    dequantized values are NaN by invalid operations: the host codec's NaN bits."""
    spec = blob_spec((16, 1, 16, 16), "bfloat16", 4, True, 1)
    src = torch.zeros((DEVICE_ROWS, 1, 16), dtype=torch.bfloat16)
    src[:16, 0, :4] = 3.0e38
    src[:8, 0, :4] = -3.0e38
    rows = torch.arange(48, dtype=torch.int64)
    ours = host_rows(spec.total_nbytes, 5)
    theirs = ours.clone()
    dc.quantize_pages(src, rows, ours, PAGES, 0, dc.BlobTemplate(spec, src.device))
    kq.quantize_pages(
        src[rows].contiguous(), theirs, PAGES.numpy(), page_tokens=16, **kq_kwargs(spec)
    )
    assert torch.equal(ours, theirs)
    out = torch.zeros_like(src)
    dc.dequantize_pages(ours, PAGES, 0, spec, out, rows)
    expect = torch.empty((48, 1, 16), dtype=torch.bfloat16)
    kq.dequantize_pages(theirs, PAGES.numpy(), expect, **kq_kwargs(spec))
    assert torch.equal(out[:48].view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("sink", [0, 1, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sink_tokens_land_in_their_section(dtype, sink):
    """Each page's first sink tokens, bit for bit, at the sink offset of its host row;
    every other byte keeps its junk."""
    spec = blob_spec(SHAPES[0], dtype, 4, True, 1)
    src = device_buffer(spec, 5)
    rows = scattered_rows(spec, 5)
    sink_off, row_nbytes = 192, 640
    ours = host_rows(row_nbytes, 5)
    expect = ours.clone()
    head = src[rows].view(len(PAGES), spec.tokens, -1)[:, :sink]
    nbytes = sink * spec.row_elems * spec.itemsize
    expect[PAGES, sink_off : sink_off + nbytes] = (
        head.contiguous().view(torch.uint8).view(len(PAGES), -1)
    )
    dc.store_sink_tokens(src, rows, ours, PAGES, sink_off, sink, spec)
    assert torch.equal(ours, expect)


def test_a_changed_byte_is_seen(kq):
    """The comparison above can fail: one flipped code bit changes the rows."""
    spec = blob_spec((16, 2, 16, 8), "float16", 4, False, 0)
    src = device_buffer(spec, 11)
    rows = scattered_rows(spec, 11)
    ours = host_rows(spec.total_nbytes, 11)
    theirs = ours.clone()
    dc.quantize_pages(src, rows, ours, PAGES, 0, dc.BlobTemplate(spec, src.device))
    plain = next(r for r in rows.tolist() if r >= 24)  # a row without planted NaN / Inf
    src[plain, 0, 0] = 1000.0
    kq.quantize_pages(
        src[rows].contiguous(), theirs, PAGES.numpy(), page_tokens=16, **kq_kwargs(spec)
    )
    assert not torch.equal(ours, theirs)


def test_codec_choice():
    """auto: the device codec for CUDA/ROCm KV with pinned rows, else the host codec;
    an explicit 'device' that cannot run is an error naming why."""
    from kvtuner_hicache.device_transfer import choose_codec

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_codec("auto", cuda, True)[0] == "device"
    assert choose_codec("auto", cuda, False) == (
        "host",
        "auto: the host rows are not pinned (kernels write them directly)",
    )
    assert choose_codec("auto", cpu, False) == ("host", "auto: the device KV cache is on the CPU")
    assert choose_codec("host", cuda, True)[0] == "host"
    assert choose_codec("device", cpu, False)[0] == "device"  # the interpreter runs it
    with pytest.raises(ValueError, match="not pinned"):
        choose_codec("device", cuda, False)
    with pytest.raises(ValueError, match="is not one of"):
        choose_codec("gpu", cuda, True)
