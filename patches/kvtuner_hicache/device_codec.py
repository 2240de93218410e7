"""Device codec: kvtuner_quant's packed format written and read by Triton kernels.

The host codec (``kvtuner_quant.quantize_pages`` / ``dequantize_pages``) needs the
KV rows in host memory: a blocking device->host copy before every backup and a
host->device copy after every load. This module does the same work on the device,
enqueued on the current stream:

* backup: gather a layer's device rows by device index, quantize them exactly as
  ``quant/FORMAT.md`` says and write each page's blob (header, codes, scales, mins,
  residual, zero padding) into that page's row of the pinned host buffer, and copy the
  page's first sink tokens there exact (:func:`store_sink_tokens`);
* load: read the blobs back, dequantize and scatter to the device rows (or copy the
  exact overlay copy of a page when the residual window still holds it).

The bytes equal what ``kvtuner_quant`` writes for the same input, so pages, page
digests and storage are codec-independent. What makes that exact:

* every step of the normative math is one IEEE float32 operation rounded to nearest
  even; the quotients use ``div_rn`` (Triton's ``/`` may be approximate on the GPU),
  and the kernels are compiled with ``enable_fp_fusion=False`` so ``q * s + m`` is
  never contracted into an FMA;
* float16 conversions are Triton's round-to-nearest-even casts; bfloat16 and
  ``M_up`` (round toward +inf) are done on the bit patterns with integer ops;
* NaN results of the dequantization are written as the bit patterns the host codec
  produces (a propagated stored NaN is the canonical quiet NaN; a NaN made by an
  invalid operation is x86's negative default NaN), not the GPU's own NaN.

Kernels read and write the pinned host rows directly (the way SGLang's ``kernel``
I/O backend does; Triton's launcher maps a pinned host tensor to its device address),
so nothing is staged through pageable memory and no host thread waits: the caller
hands device tensors of page ids and device rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Tuple

import torch

from .page_format import KV_ITEMSIZE

try:
    import triton
    import triton.language as tl
except ImportError:  # the host codec still works; device_codec_unavailable() says why
    triton = None
    tl = None

_DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3}
# Integer views of the device buffers: the kernels move bit patterns, never bf16 values.
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}

_BLOCK_GROUPS = 64
# Elements of one group-stats tile: long per-channel groups (big pages) get fewer groups
# per program instead of a tile that spills registers.
_MAX_GROUP_TILE = 4096
_BLOCK_BYTES = 1024
_BLOCK_ELEMS = 1024
_BLOCK_FIXED = 128
_BLOCK_SPAN = 4096


@dataclasses.dataclass(frozen=True)
class BlobSpec:
    """One blob configuration; its geometry (section offsets, header bytes, padding) is
    ``kvtuner_quant``'s (``quant/FORMAT.md``), read through :attr:`layout`."""

    tokens: int
    heads: int
    head_dim: int
    dtype_name: str
    bits: int
    asym: bool
    axis: int
    group_size: int
    residual_length: int = 0

    @classmethod
    def of(cls, layout) -> "BlobSpec":
        """The spec of a ``kvtuner_quant.BlobLayout`` (a page format's blob)."""
        return cls(
            *layout.shape,
            layout.dtype,
            layout.bits,
            layout.asym,
            layout.axis,
            layout.group_size,
            layout.residual_length,
        )

    @functools.cached_property
    def layout(self):
        """kvtuner_quant's ``BlobLayout`` of this configuration."""
        # Imported here: the kernels' module imports without the extension, and the pool
        # checks for it (with an install hint) before it builds a codec.
        import kvtuner_quant

        return kvtuner_quant.blob_layout(
            self.tokens,
            self.heads,
            self.head_dim,
            dtype=self.dtype_name,
            bits=self.bits,
            asym=self.asym,
            axis=self.axis,
            group_size=self.group_size,
            residual_length=self.residual_length,
        )

    @property
    def levels(self) -> int:
        """Largest asymmetric code."""
        return 2**self.bits - 1

    @property
    def qmax(self) -> int:
        """Largest symmetric code magnitude."""
        return 2 ** (self.bits - 1) - 1

    @property
    def code_offset(self) -> int:
        """Stored symmetric codes are offset binary."""
        return 0 if self.asym else 2 ** (self.bits - 1)

    @property
    def row_elems(self) -> int:
        return self.heads * self.head_dim

    @property
    def itemsize(self) -> int:
        return KV_ITEMSIZE[self.dtype_name]

    @property
    def nq(self) -> int:
        """Tokens quantized; the rest are stored bit for bit."""
        return self.layout.nq

    @property
    def ngroups(self) -> int:
        return self.layout.ngroups

    @property
    def codes_off(self) -> int:
        return self.layout.codes_off

    @property
    def codes_nbytes(self) -> int:
        return self.layout.codes_nbytes

    @property
    def scales_off(self) -> int:
        return self.layout.scales_off

    @property
    def meta_nbytes(self) -> int:
        return self.layout.meta_nbytes

    @property
    def mins_off(self) -> int:
        return self.layout.mins_off

    @property
    def residual_off(self) -> int:
        return self.layout.residual_off

    @property
    def residual_nbytes(self) -> int:
        return self.layout.residual_nbytes

    @property
    def total_nbytes(self) -> int:
        return self.layout.total_nbytes

    def header(self) -> bytes:
        """The 64-byte blob header."""
        return self.layout.header

    def fixed_bytes(self) -> Tuple[Tuple[int, ...], bytes]:
        """(offsets, values) of the bytes that do not depend on the data: the
        header and the zero padding in front of each 8-aligned section."""
        header = self.layout.header
        offsets = list(range(len(header)))
        values = bytearray(header)
        for start, end in self.layout.padding:
            offsets += range(start, end)
            values += bytes(end - start)
        return tuple(offsets), bytes(values)


@dataclasses.dataclass(frozen=True)
class RowShape:
    """The device rows of one page of a part stored exact: what the copy kernels need of a
    ``BlobSpec`` (tokens per page, heads, head_dim)."""

    tokens: int
    heads: int
    head_dim: int

    @property
    def row_elems(self) -> int:
        return self.heads * self.head_dim


def device_codec_unavailable(device: torch.device) -> Optional[str]:
    """None when the device codec can run for device buffers on ``device``, else
    the reason it cannot."""
    if triton is None:
        return "Triton does not import"
    if device.type in ("cuda", "hip"):
        return None
    if device.type == "cpu" and interpreted():
        return None
    return f"the device KV cache is on {device.type}, not a CUDA or ROCm device"


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------- kernels ---

if triton is not None:

    @triton.jit
    def _rint(v):
        """Round half to even for |v| < 2**22: adding and removing 1.5 * 2**23
        leaves exactly the integer nearest-even to v (one IEEE rounding)."""
        magic = 12582912.0
        return (v + magic) - magic

    @triton.jit
    def _widen(raw, DTYPE: tl.constexpr):
        """Stored bit patterns (int16 / int32) -> exact float32 values."""
        if DTYPE == 1:
            return raw.to(tl.float16, bitcast=True).to(tl.float32)
        elif DTYPE == 2:
            bits = (raw.to(tl.int32) & 0xFFFF) << 16
            return bits.to(tl.float32, bitcast=True)
        else:
            return raw.to(tl.float32, bitcast=True)

    @triton.jit
    def _round_even(v, DTYPE: tl.constexpr):
        """float32 -> bit pattern (int32, low 16 bits for halves) rounded to
        nearest even; a NaN becomes the canonical quiet NaN of the dtype."""
        if DTYPE == 1:
            h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            return tl.where(v != v, 0x7E00, h)
        elif DTYPE == 2:
            b = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            h = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int32)
            return tl.where(v != v, 0x7FC0, h)
        else:
            return tl.where(v != v, 0x7FC00000, v.to(tl.int32, bitcast=True))

    @triton.jit
    def _round_up(v, DTYPE: tl.constexpr):
        """M_up for v >= +0: the smallest value of the dtype >= v, as a bit pattern.
        The next value above a non-negative half is its bit pattern plus one."""
        h = _round_even(v, DTYPE)
        if DTYPE == 3:
            return h
        else:
            return tl.where(_widen(_to_stored(h, DTYPE), DTYPE) < v, h + 1, h)

    @triton.jit
    def _to_stored(bits, DTYPE: tl.constexpr):
        """An int32 bit pattern -> the integer type of the device buffer view."""
        if DTYPE == 3:
            return bits
        else:
            return bits.to(tl.int16)

    @triton.jit
    def _element_offsets(e, C: tl.constexpr):
        return e // C, e % C

    @triton.jit
    def _group_of(e, t, c, C: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr):
        """Group number of element e = t * C + c (FORMAT.md numbering)."""
        if AXIS == 0:
            return e // G
        else:
            return (t // G) * C + c

    @triton.jit
    def _load_meta(blob, off, g, mask, DTYPE: tl.constexpr, ES: tl.constexpr):
        """Little-endian metadata element g of the section at ``off``."""
        p = blob + off + g * ES
        bits = tl.load(p, mask=mask, other=0).to(tl.int32)
        bits |= tl.load(p + 1, mask=mask, other=0).to(tl.int32) << 8
        if ES == 4:
            bits |= tl.load(p + 2, mask=mask, other=0).to(tl.int32) << 16
            bits |= tl.load(p + 3, mask=mask, other=0).to(tl.int32) << 24
        return bits

    @triton.jit
    def _store_le(p, bits, mask, ES: tl.constexpr):
        """Store an int32 bit pattern as ES little-endian bytes."""
        tl.store(p, (bits & 0xFF).to(tl.uint8), mask=mask)
        tl.store(p + 1, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)
        if ES == 4:
            tl.store(p + 2, ((bits >> 16) & 0xFF).to(tl.uint8), mask=mask)
            tl.store(p + 3, ((bits >> 24) & 0xFF).to(tl.uint8), mask=mask)

    @triton.jit
    def _quant_groups_kernel(
        src,  # device buffer, integer view [size, heads, head_dim]
        src_row_stride,
        rows,  # int64 [n_pages * T]: device row of each token, page by page
        pages,  # int64 [n_pages]: host row of each page
        dst,  # uint8 host rows [host_pages, dst_row_nbytes]
        dst_row_nbytes,
        blob_off,
        scale_out,  # float32 [n_pages, NGROUPS] scratch for the codes kernel
        min_out,
        fixed_off,  # int32 [N_FIXED]: header and padding bytes of the blob
        fixed_val,  # uint8 [N_FIXED]
        N_FIXED: tl.constexpr,
        T: tl.constexpr,
        C: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        NQ: tl.constexpr,
        NGROUPS: tl.constexpr,
        DIVISOR: tl.constexpr,
        ASYM: tl.constexpr,
        AXIS: tl.constexpr,
        DTYPE: tl.constexpr,
        ES: tl.constexpr,
        SCALES_OFF: tl.constexpr,
        MINS_OFF: tl.constexpr,
        RES_OFF: tl.constexpr,
        RES_NBYTES: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        """Per group: scale and min (stored in the blob and kept for the codes
        kernel). The programs past the groups write the fixed bytes and the
        residual tokens of the page."""
        page = tl.program_id(0)
        blk = tl.program_id(1)
        n_group_blocks = tl.cdiv(NGROUPS, BLOCK_G)
        host_page = tl.load(pages + page)
        blob = dst + host_page * dst_row_nbytes + blob_off
        if blk < n_group_blocks:
            g = blk * BLOCK_G + tl.arange(0, BLOCK_G)
            j = tl.arange(0, GP)
            gmask = g < NGROUPS
            mask = gmask[:, None] & (j[None, :] < G)
            if AXIS == 0:
                e = g[:, None] * G + j[None, :]
                t = e // C
                c = e % C
            else:
                t = (g // C)[:, None] * G + j[None, :]
                c = (g % C)[:, None] + 0 * j[None, :]
            row = tl.load(rows + page * T + t, mask=mask, other=0)
            x = _widen(tl.load(src + row * src_row_stride + c, mask=mask, other=0), DTYPE)
            finite = (x == x) & (tl.abs(x) != float("inf"))
            bad = tl.sum(tl.where(mask, tl.where(finite, 0, 1), 0), axis=1)
            mn = tl.min(tl.where(mask, x, float("inf")), axis=1)
            mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)
            divisor = tl.full(mn.shape, DIVISOR, tl.float32)
            if ASYM:
                s32 = tl.math.div_rn(mx - mn, divisor) + 0.0
                m_bits = _round_even(mn + 0.0, DTYPE)
                m = _widen(_to_stored(m_bits, DTYPE), DTYPE)
            else:
                s32 = tl.math.div_rn(tl.maximum(mx, -mn), divisor) + 0.0
                m_bits = tl.zeros(mn.shape, tl.int32)
                m = tl.zeros(mn.shape, tl.float32)
            s_bits = _round_up(s32, DTYPE)
            s = _widen(_to_stored(s_bits, DTYPE), DTYPE)
            if DTYPE == 1:
                nan_bits = 0x7E00
            elif DTYPE == 2:
                nan_bits = 0x7FC0
            else:
                nan_bits = 0x7FC00000
            ok = bad == 0
            s_bits = tl.where(ok, s_bits, nan_bits)
            s = tl.where(ok, s, float("nan"))
            _store_le(blob + SCALES_OFF + g * ES, s_bits, gmask, ES)
            if ASYM:
                m_bits = tl.where(ok, m_bits, nan_bits)
                m = tl.where(ok, m, float("nan"))
                _store_le(blob + MINS_OFF + g * ES, m_bits, gmask, ES)
            tl.store(scale_out + page * NGROUPS + g, s, mask=gmask)
            tl.store(min_out + page * NGROUPS + g, m, mask=gmask)
        elif blk == n_group_blocks:
            f = tl.arange(0, BLOCK_F)
            fmask = f < N_FIXED
            off = tl.load(fixed_off + f, mask=fmask, other=0)
            tl.store(blob + off, tl.load(fixed_val + f, mask=fmask, other=0), mask=fmask)
        else:
            # Residual tokens [NQ, T): their bytes, little-endian, in element order.
            r = (blk - n_group_blocks - 1) * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = r < RES_NBYTES
            el = r // ES
            t = NQ + el // C
            c = el % C
            row = tl.load(rows + page * T + t, mask=rmask, other=0)
            raw = tl.load(src + row * src_row_stride + c, mask=rmask, other=0).to(tl.int32)
            byte = (raw >> ((r % ES) * 8)) & 0xFF
            tl.store(blob + RES_OFF + r, byte.to(tl.uint8), mask=rmask)

    @triton.jit
    def _quant_codes_kernel(
        src,
        src_row_stride,
        rows,
        pages,
        dst,
        dst_row_nbytes,
        blob_off,
        scale_in,
        min_in,
        T: tl.constexpr,
        C: tl.constexpr,
        G: tl.constexpr,
        NQ: tl.constexpr,
        NGROUPS: tl.constexpr,
        CODES_OFF: tl.constexpr,
        CODES_NBYTES: tl.constexpr,
        BITS: tl.constexpr,
        LO: tl.constexpr,
        HI: tl.constexpr,
        CODE_OFFSET: tl.constexpr,
        AXIS: tl.constexpr,
        DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """Codes: byte b packs elements b * (8 / BITS) ..., least significant first."""
        PER: tl.constexpr = 8 // BITS
        page = tl.program_id(0)
        b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        k = tl.arange(0, PER)
        e = b[:, None] * PER + k[None, :]
        bmask = b < CODES_NBYTES
        mask = bmask[:, None] & (e < NQ * C)
        t, c = _element_offsets(e, C)
        row = tl.load(rows + page * T + t, mask=mask, other=0)
        x = _widen(tl.load(src + row * src_row_stride + c, mask=mask, other=0), DTYPE)
        grp = _group_of(e, t, c, C, G, AXIS)
        s = tl.load(scale_in + page * NGROUPS + grp, mask=mask, other=1.0)
        m = tl.load(min_in + page * NGROUPS + grp, mask=mask, other=0.0)
        q = tl.math.div_rn(x - m, s)
        q = tl.where(q != q, 0.0, q)
        # Clamping first keeps |q| small, where the rounding below is exact.
        q = tl.minimum(tl.maximum(q, LO - 1.0), HI + 1.0)
        q = _rint(q)
        q = tl.minimum(tl.maximum(q, LO), HI)
        q = tl.where(s == 0.0, 0.0, q)
        code = (q.to(tl.int32) + CODE_OFFSET) << (k[None, :] * BITS)
        code = tl.where(mask, code, 0)
        byte = tl.sum(code, axis=1)
        host_page = tl.load(pages + page)
        blob = dst + host_page * dst_row_nbytes + blob_off
        tl.store(blob + CODES_OFF + b, byte.to(tl.uint8), mask=bmask)

    @triton.jit
    def _dequant_kernel(
        src,  # uint8 rows holding the blobs: the host rows, or a device copy of them
        src_row_nbytes,
        blob_off,
        src_pages,  # int64 [n_pages]: row of each page in src
        host,  # uint8 host rows (the overlay check reads each row's stamp there)
        host_row_nbytes,
        pages,  # int64 [n_pages]: host row of each page
        out,  # device buffer, integer view
        out_row_stride,
        rows,  # int64 [n_pages * T]: device row of each token
        slot_of_page,  # int64 [host_pages]: overlay slot of each host page, -1 none
        slot_stamp,  # int64 [slots]: backup stamp of each overlay slot
        overlay,  # integer view [slots, parts, layers, T, C] of the exact copies
        ovl_layer_base,  # element offset of (part, layer) inside one slot
        ovl_slot_elems,
        T: tl.constexpr,
        C: tl.constexpr,
        G: tl.constexpr,
        NQ: tl.constexpr,
        BITS: tl.constexpr,
        CODE_OFFSET: tl.constexpr,
        ASYM: tl.constexpr,
        AXIS: tl.constexpr,
        DTYPE: tl.constexpr,
        ES: tl.constexpr,
        CODES_OFF: tl.constexpr,
        SCALES_OFF: tl.constexpr,
        MINS_OFF: tl.constexpr,
        RES_OFF: tl.constexpr,
        STAMP_OFF: tl.constexpr,
        HAS_OVERLAY: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        page = tl.program_id(0)
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = e < T * C
        blob = src + tl.load(src_pages + page) * src_row_nbytes + blob_off
        t, c = _element_offsets(e, C)
        quantized = e < NQ * C
        qmask = emask & quantized
        bit = e * BITS
        byte = tl.load(blob + CODES_OFF + bit // 8, mask=qmask, other=0).to(tl.int32)
        q = ((byte >> (bit % 8)) & ((1 << BITS) - 1)) - CODE_OFFSET
        grp = _group_of(e, t, c, C, G, AXIS)
        s_bits = _load_meta(blob, SCALES_OFF, grp, qmask, DTYPE, ES)
        s = _widen(_to_stored(s_bits, DTYPE), DTYPE)
        if ASYM:
            m_bits = _load_meta(blob, MINS_OFF, grp, qmask, DTYPE, ES)
            m = _widen(_to_stored(m_bits, DTYPE), DTYPE)
        else:
            m = tl.zeros(s.shape, tl.float32)
        prod = q.to(tl.float32) * s
        v = prod + m
        bits = _round_even(v, DTYPE)
        # x86 NaN rules, as the host codec computes: a stored NaN operand propagates
        # (canonical, positive); an invalid operation (0 * inf, inf - inf) gives the
        # negative default NaN.
        stored_nan = (s != s) | (m != m)
        if DTYPE == 1:
            neg_nan = 0xFE00
        elif DTYPE == 2:
            neg_nan = 0xFFC0
        else:
            neg_nan = -4194304  # 0xFFC00000
        bits = tl.where((v != v) & (stored_nan == 0), neg_nan, bits)
        rel = ((t - NQ) * C + c) * ES
        rmask = emask & (quantized == 0)
        raw = _load_meta(blob + RES_OFF, 0, rel // ES, rmask, DTYPE, ES)
        bits = tl.where(quantized, bits, raw)
        val = _to_stored(bits, DTYPE)
        if HAS_OVERLAY:
            host_page = tl.load(pages + page)
            slot = tl.load(slot_of_page + host_page)
            stamp_p = host + host_page * host_row_nbytes + STAMP_OFF
            row_stamp = tl.load(stamp_p).to(tl.int64)
            for i in tl.static_range(1, 8):
                row_stamp |= tl.load(stamp_p + i).to(tl.int64) << (8 * i)
            live = slot >= 0
            want = tl.load(slot_stamp + tl.maximum(slot, 0))
            exact = live & (want == row_stamp)
            ovl = tl.load(
                overlay + tl.maximum(slot, 0) * ovl_slot_elems + ovl_layer_base + e,
                mask=emask & exact,
                other=0,
            )
            val = tl.where(exact, ovl, val)
        row = tl.load(rows + page * T + t, mask=emask, other=0)
        tl.store(out + row * out_row_stride + c, val, mask=emask)

    @triton.jit
    def _page_header_kernel(
        dst,
        dst_row_nbytes,
        pages,
        header,  # uint8 [64]
        stamps,  # int64 [n_pages]
        STAMP_OFF: tl.constexpr,
    ):
        """The page header with this backup's stamp of each page."""
        page = tl.program_id(0)
        i = tl.arange(0, 64)
        host_page = tl.load(pages + page)
        stamp = tl.load(stamps + page)
        in_stamp = (i >= STAMP_OFF) & (i < STAMP_OFF + 8)
        shift = tl.where(in_stamp, 8 * (i - STAMP_OFF), 0)
        sb = ((stamp >> shift) & 0xFF).to(tl.uint8)
        val = tl.where(in_stamp, sb, tl.load(header + i))
        tl.store(dst + host_page * dst_row_nbytes + i, val)

    @triton.jit
    def _gather_spans_kernel(
        src,  # uint8 host rows
        src_row_nbytes,
        pages,  # int64 [n_pages]
        span_off,
        dst,  # uint8 [n_pages, span_nbytes] on the device
        span_nbytes,
        BLOCK: tl.constexpr,
    ):
        """One byte range of each page's host row into a dense device buffer."""
        page = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < span_nbytes
        row = src + tl.load(pages + page) * src_row_nbytes + span_off
        tl.store(dst + page * span_nbytes + i, tl.load(row + i, mask=mask), mask=mask)

    @triton.jit
    def _copy_tokens_kernel(
        src,  # device buffer, integer view
        src_row_stride,
        rows,  # int64 [n * T]: device row of each token, page by page
        dst,  # integer view of the destination rows
        dst_index,  # int64 [n]: destination row of each page
        dst_base,  # element offset of the copy inside a destination row
        dst_row_stride,
        T: tl.constexpr,
        S: tl.constexpr,
        C: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        """Exact copy of the first S of each page's T device rows into one destination
        row per page (overlay slots: S == T; host rows' sink sections: S sink tokens)."""
        page = tl.program_id(0)
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = e < S * C
        t = e // C
        c = e % C
        row = tl.load(rows + page * T + t, mask=emask, other=0)
        val = tl.load(src + row * src_row_stride + c, mask=emask, other=0)
        dst_row = tl.load(dst_index + page)
        tl.store(dst + dst_row * dst_row_stride + dst_base + e, val, mask=emask)


# ---------------------------------------------------------------- wrappers ---

_NO_FUSION = dict(enable_fp_fusion=False)


def int_view(buf: torch.Tensor) -> torch.Tensor:
    """``buf`` as the integers of its element size, so copies keep every bit (NaN payloads)."""
    return buf.view(_INT_VIEW[buf.dtype])


def _launch_options() -> dict:
    # The interpreter has no compiler options (and needs none: numpy never fuses).
    return {} if interpreted() else _NO_FUSION


def _blob_geometry(spec: BlobSpec) -> dict:
    """The blob shape and dtype as the quantize and dequantize kernels take them."""
    return dict(
        T=spec.tokens,
        C=spec.row_elems,
        G=spec.group_size,
        NQ=spec.nq,
        AXIS=spec.axis,
        DTYPE=_DTYPE_CODES[spec.dtype_name],
    )


def _blob_sections(spec: BlobSpec) -> dict:
    """Where a blob's scales, mins and residual section start, for the kernels."""
    return dict(
        ES=spec.itemsize,
        SCALES_OFF=spec.scales_off,
        MINS_OFF=spec.mins_off,
        RES_OFF=spec.residual_off,
    )


class BlobTemplate:
    """A blob configuration and, on the device, its bytes that do not depend on
    the data (header and section padding); built once per configuration."""

    def __init__(self, spec: BlobSpec, device: torch.device):
        self.spec = spec
        offsets, values = spec.fixed_bytes()
        self.n_fixed = len(offsets)
        self.fixed_off = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.fixed_val = torch.tensor(list(values), dtype=torch.uint8, device=device)


def _check_rows_buffer(buf: torch.Tensor, spec, what: str) -> int:
    """Row stride (elements) of a device buffer [size, heads, head_dim] whose rows
    are contiguous."""
    if buf.dim() == 2:
        inner_ok = buf.stride(1) == 1 and buf.shape[1] == spec.row_elems
    else:
        inner_ok = (
            buf.stride(-1) == 1
            and buf.stride(-2) == spec.head_dim
            and buf.shape[-1] * buf.shape[-2] == spec.row_elems
        )
    if not inner_ok:
        raise ValueError(f"{what}: rows of {spec.row_elems} contiguous elements expected")
    return buf.stride(0)


def quantize_pages(
    src: torch.Tensor,
    rows: torch.Tensor,
    dst: torch.Tensor,
    pages: torch.Tensor,
    blob_off: int,
    template: BlobTemplate,
    scratch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> None:
    """Quantize ``len(pages)`` pages whose tokens are the device rows ``rows`` of
    ``src`` into the blob at ``dst[pages[i], blob_off:]`` (the bytes
    ``kvtuner_quant.quantize_pages`` writes). Enqueue-only."""
    spec = template.spec
    n = pages.shape[0]
    if n == 0:
        return
    stride = _check_rows_buffer(src, spec, "quantize_pages src")
    ngroups = spec.ngroups
    if scratch is None:
        scale = torch.empty(max(n * ngroups, 1), dtype=torch.float32, device=src.device)
        mins = torch.empty_like(scale)
    else:
        scale, mins = scratch
    view = int_view(src)
    group_span = triton.next_power_of_2(spec.group_size)
    block_groups = max(1, min(_BLOCK_GROUPS, _MAX_GROUP_TILE // group_span))
    group_blocks = triton.cdiv(spec.ngroups, block_groups)
    res_blocks = triton.cdiv(spec.residual_nbytes, _BLOCK_BYTES)
    # The source rows, the destination blobs and the group parameters both kernels share.
    operands = (view, stride, rows, pages, dst, dst.stride(0), blob_off, scale, mins)
    _quant_groups_kernel[(n, group_blocks + 1 + res_blocks)](
        *operands,
        template.fixed_off,
        template.fixed_val,
        N_FIXED=template.n_fixed,
        GP=group_span,
        NGROUPS=ngroups,
        DIVISOR=float(spec.levels if spec.asym else spec.qmax),
        ASYM=spec.asym,
        RES_NBYTES=spec.residual_nbytes,
        BLOCK_G=block_groups,
        BLOCK_R=_BLOCK_BYTES,
        BLOCK_F=_BLOCK_FIXED,
        **_blob_geometry(spec),
        **_blob_sections(spec),
        **_launch_options(),
    )
    if spec.codes_nbytes:
        _quant_codes_kernel[(n, triton.cdiv(spec.codes_nbytes, _BLOCK_BYTES))](
            *operands,
            NGROUPS=ngroups,
            CODES_OFF=spec.codes_off,
            CODES_NBYTES=spec.codes_nbytes,
            BITS=spec.bits,
            LO=0.0 if spec.asym else -float(spec.qmax),
            HI=float(spec.levels if spec.asym else spec.qmax),
            CODE_OFFSET=spec.code_offset,
            BLOCK_B=_BLOCK_BYTES,
            **_blob_geometry(spec),
            **_launch_options(),
        )


@dataclasses.dataclass
class OverlayView:
    """The residual overlay as the load kernel reads it (all device-visible)."""

    slot_of_page: torch.Tensor  # int64 [host_pages]
    slot_stamp: torch.Tensor  # int64 [slots]
    exact: torch.Tensor  # [slots, parts, layers, T, heads, head_dim], device dtype
    stamp_offset: int

    def base(self, layer: int, part: int) -> Tuple[torch.Tensor, int, int]:
        """(integer view, element offset of (part, layer) in a slot, slot elements)."""
        view = int_view(self.exact)
        slot_elems = view[0].numel()
        layers = view.shape[2]
        per = view[0, 0, 0].numel()
        return view, (int(part) * layers + layer) * per, slot_elems


def gather_spans(
    src: torch.Tensor, pages: torch.Tensor, off: int, nbytes: int, device
) -> torch.Tensor:
    """``src[pages, off:off + nbytes]`` as a new device tensor: each host byte
    crosses the bus once, in wide reads, before the dequantization reads its
    metadata many times. Enqueue-only."""
    n = pages.shape[0]
    out = torch.empty((n, nbytes), dtype=torch.uint8, device=device)
    if n:
        grid = (n, triton.cdiv(nbytes, _BLOCK_SPAN))
        _gather_spans_kernel[grid](src, src.stride(0), pages, off, out, nbytes, BLOCK=_BLOCK_SPAN)
    return out


def dequantize_pages(
    src: torch.Tensor,
    pages: torch.Tensor,
    blob_off: int,
    spec: BlobSpec,
    out: torch.Tensor,
    rows: torch.Tensor,
    overlay: Optional[Tuple[OverlayView, int, int]] = None,
    staged: Optional[Tuple[torch.Tensor, int]] = None,
) -> None:
    """Dequantize the blobs at ``src[pages[i], blob_off:]`` into the device rows
    ``rows`` of ``out`` (the values ``kvtuner_quant.dequantize_pages`` gives), or
    copy a page's exact overlay copy while its slot is live. With ``staged`` =
    (:func:`gather_spans` of those rows, offset of the blob in the span) the blobs
    are read from that device copy. Enqueue-only."""
    n = pages.shape[0]
    if n == 0:
        return
    stride = _check_rows_buffer(out, spec, "dequantize_pages out")
    if staged is None:
        blob_src, blob_pages, blob_start = src, pages, blob_off
    else:
        blob_src, blob_start = staged
        blob_pages = torch.arange(n, dtype=torch.int64, device=blob_src.device)
    view = int_view(out)
    if overlay is not None:
        ovl, layer, part = overlay
        ovl_view, ovl_base, ovl_slot = ovl.base(layer, part)
        slot_of_page, slot_stamp, stamp_off = ovl.slot_of_page, ovl.slot_stamp, ovl.stamp_offset
    else:
        ovl_view, ovl_base, ovl_slot = view, 0, 0
        slot_of_page, slot_stamp, stamp_off = pages, pages, 0
    grid = (n, triton.cdiv(spec.tokens * spec.row_elems, _BLOCK_ELEMS))
    _dequant_kernel[grid](
        blob_src,
        blob_src.stride(0),
        blob_start,
        blob_pages,
        src,
        src.stride(0),
        pages,
        view,
        stride,
        rows,
        slot_of_page,
        slot_stamp,
        ovl_view,
        ovl_base,
        ovl_slot,
        BITS=spec.bits,
        CODE_OFFSET=spec.code_offset,
        ASYM=spec.asym,
        CODES_OFF=spec.codes_off,
        STAMP_OFF=stamp_off,
        HAS_OVERLAY=overlay is not None,
        BLOCK_E=_BLOCK_ELEMS,
        **_blob_geometry(spec),
        **_blob_sections(spec),
        **_launch_options(),
    )


def write_page_headers(
    dst: torch.Tensor,
    pages: torch.Tensor,
    header: torch.Tensor,
    stamps: torch.Tensor,
    stamp_off: int,
) -> None:
    """Page header plus each page's backup stamp into rows ``pages`` of ``dst``."""
    if pages.shape[0]:
        _page_header_kernel[(pages.shape[0],)](
            dst, dst.stride(0), pages, header, stamps, STAMP_OFF=stamp_off
        )


def _copy_tokens(
    src: torch.Tensor,
    rows: torch.Tensor,
    dst: torch.Tensor,
    dst_index: torch.Tensor,
    dst_base: int,
    dst_row_stride: int,
    tokens: int,
    spec,
) -> None:
    """The first ``tokens`` device rows of each page (``spec``: a ``BlobSpec`` or
    ``RowShape``), bit for bit, into row ``dst_index[i]`` of the integer view ``dst`` from
    element ``dst_base`` on."""
    n = dst_index.shape[0]
    if n == 0 or tokens == 0:
        return
    stride = _check_rows_buffer(src, spec, "copied device rows")
    grid = (n, triton.cdiv(tokens * spec.row_elems, _BLOCK_ELEMS))
    _copy_tokens_kernel[grid](
        int_view(src),
        stride,
        rows,
        dst,
        dst_index,
        dst_base,
        dst_row_stride,
        T=spec.tokens,
        S=tokens,
        C=spec.row_elems,
        BLOCK_E=_BLOCK_ELEMS,
    )


def copy_exact_pages(
    src: torch.Tensor,
    rows: torch.Tensor,
    overlay: OverlayView,
    slots: torch.Tensor,
    layer: int,
    part: int,
    spec: BlobSpec,
) -> None:
    """The device rows of ``len(slots)`` pages, bit for bit, into overlay slots."""
    view, base, slot_elems = overlay.base(layer, part)
    _copy_tokens(src, rows, view, slots, base, slot_elems, spec.tokens, spec)


def store_sink_tokens(
    src: torch.Tensor,
    rows: torch.Tensor,
    dst: torch.Tensor,
    pages: torch.Tensor,
    sink_off: int,
    sink_tokens: int,
    spec,
) -> None:
    """The first ``sink_tokens`` device rows of each page (``spec``: a ``BlobSpec`` or
    ``RowShape``), bit for bit, into the exact section at ``dst[pages[i], sink_off:]``
    (uint8 host rows; an exact part's section holds every token). Enqueue-only."""
    es = src.element_size()
    # The kernel moves whole elements: the host rows seen as the device buffer's integers.
    if sink_off % es or dst.stride(0) % es:
        raise ValueError(f"sink section at byte {sink_off} is not {es}-byte aligned")
    view = dst.view(_INT_VIEW[src.dtype])
    _copy_tokens(src, rows, view, pages, sink_off // es, view.stride(0), sink_tokens, spec)


__all__ = [
    "BlobTemplate",
    "BlobSpec",
    "OverlayView",
    "RowShape",
    "copy_exact_pages",
    "device_codec_unavailable",
    "dequantize_pages",
    "gather_spans",
    "int_view",
    "interpreted",
    "quantize_pages",
    "store_sink_tokens",
    "write_page_headers",
]
