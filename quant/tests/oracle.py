"""A plain numpy (f32) implementation of the quantizer math in FORMAT.md, used as the test oracle.

Inputs are numpy arrays: float16, float32, or uint16 holding bfloat16 bit patterns (dtype="bfloat16").
Written from the spec, independently of the Rust kernels; deliberately simple, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000}


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Exact widening of stored values (or bit patterns for bfloat16) to float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def rne(v: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to nearest-even in `dtype` (bfloat16 as uint16 bit patterns)."""
    v = np.asarray(v, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16)
    if dtype == "float32":
        return v.copy()
    b = v.view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(v), np.uint16(0x7FC0), r)


def up(v: np.ndarray, dtype: str) -> np.ndarray:
    """M_up: round float32 toward +infinity into `dtype` (values are >= 0 or NaN here)."""
    h = rne(v, dtype)
    if dtype == "float32":
        return h
    low = to_f32(h, dtype) < v
    if dtype == "float16":
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    else:
        h[low] = h[low] + np.uint16(1)  # positive finite bf16: next pattern is the next value up
    return h


def bits_u32(h: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return h.view(np.uint16).astype(np.uint32)
    if dtype == "bfloat16":
        return h.astype(np.uint32)
    return h.view(np.uint32)


@dataclass
class Ref:
    nq: int
    codes: np.ndarray  # int32, one per quantized element in natural order (symmetric codes signed)
    scale_bits: np.ndarray  # uint32 bit patterns of the stored scales, one per group
    min_bits: np.ndarray  # uint32 bit patterns of the stored mins (empty when symmetric)
    scale: np.ndarray  # float32 scales, group-shaped
    mn: np.ndarray  # float32 group minima (for the error bound)
    mx: np.ndarray  # float32 group maxima
    xhat: (
        np.ndarray
    )  # dequantized tensor in the output representation (full shape, residual included)


def quantized_tokens(tokens: int, axis: int, group_size: int, residual_length: int) -> int:
    before = tokens - min(residual_length, tokens)
    return before if axis == 0 else before // group_size * group_size


def quantize_ref(
    x: np.ndarray,
    dtype: str,
    *,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> Ref:
    T, H, D = x.shape
    G = group_size
    nq = quantized_tokens(T, axis, G, residual_length)
    xf = to_f32(x, dtype)
    if axis == 0:
        xq = xf[:nq].reshape(nq, H, D // G, G)
        red = 3
    else:
        xq = xf[:nq].reshape(nq // G, G, H, D)
        red = 1
    with np.errstate(all="ignore"):
        finite = np.isfinite(xq).all(axis=red, keepdims=True)
        mn = xq.min(axis=red, keepdims=True) if xq.size else np.zeros_like(finite, dtype=F32)
        mx = xq.max(axis=red, keepdims=True) if xq.size else np.zeros_like(finite, dtype=F32)
        if asym:
            lo, hi = F32(0), F32(2**bits - 1)
            s32 = (mx - mn) / hi + F32(0)  # + 0 turns -0.0 into +0.0
            m_store = rne(mn + F32(0), dtype)
        else:
            q = F32(2 ** (bits - 1) - 1)
            lo, hi = -q, q
            s32 = np.maximum(mx, -mn) / q + F32(0)
            m_store = None
        s_store = up(s32, dtype)
        nan = np.array(NAN_BITS[dtype], dtype=np.uint32)
        sbits = np.where(finite, bits_u32(s_store, dtype), nan)
        sf = np.where(finite, to_f32(s_store, dtype), F32(np.nan)).astype(F32)
        if asym:
            mbits = np.where(finite, bits_u32(m_store, dtype), nan)
            mf = np.where(finite, to_f32(m_store, dtype), F32(np.nan)).astype(F32)
        else:
            mbits = np.zeros((0,), np.uint32)
            mf = np.zeros_like(sf)
        t = (xq - mf) / sf
        t = np.where(np.isnan(t), F32(0), t)
        codes = np.clip(np.rint(t), lo, hi)
        codes = np.where(sf == 0, F32(0), codes).astype(F32)  # zero scale: every code 0
        xhat_q = codes * sf + mf
    out = np.empty(x.shape, dtype=x.dtype)
    out[:nq] = rne(xhat_q, dtype).reshape(nq, H, D)
    out[nq:] = x[nq:]
    return Ref(
        nq=nq,
        codes=codes.astype(np.int32).reshape(-1),
        scale_bits=sbits.reshape(-1),
        min_bits=mbits.reshape(-1),
        scale=sf,
        mn=mn,
        mx=mx,
        xhat=out,
    )


def ordered_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    """Map values to integers whose difference counts ulps (sign-magnitude -> two's complement order)."""
    if dtype == "float32":
        b = a.view(np.uint32).astype(np.int64)
        sign = 1 << 31
    else:
        b = (a.view(np.uint16) if dtype == "float16" else a).astype(np.int64)
        sign = 1 << 15
    return np.where(b & sign, -(b & (sign - 1)), b)


def ulp_diff(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """ulps between two arrays in `dtype` representation; 0 where both are NaN, huge where one is."""
    fa, fb = to_f32(a, dtype), to_f32(b, dtype)
    d = np.abs(ordered_bits(a, dtype) - ordered_bits(b, dtype))
    both_nan = np.isnan(fa) & np.isnan(fb)
    one_nan = np.isnan(fa) ^ np.isnan(fb)
    return np.where(both_nan, 0, np.where(one_nan, 1 << 40, d))
