"""kvtuner_quant: group-wise 2/4/8-bit quantization of KV-cache tensors ``[tokens, heads, head_dim]``.

A thin layer over the Rust module ``_native``: it turns numpy arrays and CPU torch tensors (bfloat16
included) into zero-copy buffers and allocates outputs. All checks on shapes, strides and headers
happen in the native code; the math and the packed format are specified in FORMAT.md.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import _native
from ._native import (
    FORMAT_VERSION,
    HEADER_NBYTES,
    BlobLayout,
    QuantizedTensor,
    __version__,
    get_num_threads,
    set_num_threads,
)

__all__ = [
    "__version__",
    "HEADER_NBYTES",
    "FORMAT_VERSION",
    "QuantizedTensor",
    "BlobLayout",
    "blob_layout",
    "quantize",
    "dequantize",
    "packed_nbytes",
    "quantize_pages",
    "dequantize_pages",
    "set_num_threads",
    "get_num_threads",
]

_NAMES = ("float16", "bfloat16", "float32")


def _torch():
    # Only a tensor from an already imported torch can reach us, so never import it just to check.
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def dtype_name(dtype: Any) -> str:
    """'float16' | 'bfloat16' | 'float32' from a str, numpy dtype or torch dtype; TypeError otherwise."""
    name = None
    if isinstance(dtype, str):
        name = dtype
    else:
        t = _torch()
        if t is not None and isinstance(dtype, t.dtype):
            name = str(dtype).removeprefix("torch.")
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = None
    if name not in _NAMES:
        raise TypeError(f"dtype must be one of 'float16', 'bfloat16', 'float32', got {dtype!r}")
    return name


def _float_view(x: Any, arg: str) -> tuple[Any, str]:
    """(buffer-protocol view sharing x's memory, dtype name). bfloat16 travels as its uint16 bits."""
    if _is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{arg} must be a CPU tensor, got device {x.device}")
        name = str(x.dtype).removeprefix("torch.")
        if name not in _NAMES:
            raise TypeError(f"{arg} must have dtype float16, bfloat16 or float32, got {x.dtype}")
        t = x.detach()
        if name == "bfloat16":
            t = t.view(_torch().int16)
        return t.numpy(), name
    if isinstance(x, np.ndarray):
        name = x.dtype.name
        if name not in _NAMES:
            raise TypeError(f"{arg} must have dtype float16, bfloat16 or float32, got {x.dtype}")
        if (
            name == "bfloat16"
        ):  # ml_dtypes.bfloat16: numpy cannot export it through the buffer protocol
            x = x.view(np.uint16)
        return x, name
    raise TypeError(f"{arg} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def _bytes_view(x: Any, arg: str) -> Any:
    if _is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{arg} must be a CPU tensor, got device {x.device}")
        if x.dtype != _torch().uint8:
            raise TypeError(f"{arg} must have dtype uint8, got {x.dtype}")
        return x.detach().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise TypeError(f"{arg} must have dtype uint8, got {x.dtype}")
        return x
    raise TypeError(
        f"{arg} must be a 2-D uint8 numpy array or CPU torch tensor, got {type(x).__name__}"
    )


def _ids_view(ids: Any) -> Any:
    if _is_tensor(ids):
        if ids.dtype != _torch().int64:
            raise TypeError(f"page_ids must have dtype int64, got {ids.dtype}")
        return ids.detach().cpu().contiguous().numpy()
    if isinstance(ids, np.ndarray):
        if ids.dtype != np.int64:
            raise TypeError(f"page_ids must have dtype int64, got {ids.dtype}")
        return np.ascontiguousarray(ids)
    if isinstance(ids, (list, tuple, range)):
        return np.asarray(ids, dtype=np.int64)
    raise TypeError(
        f"page_ids must be a 1-D int64 numpy array or torch tensor, got {type(ids).__name__}"
    )


def quantize(
    x: Any, *, bits: int, asym: bool, axis: int, group_size: int, residual_length: int = 0
) -> QuantizedTensor:
    """Quantize a C-contiguous ``[tokens, heads, head_dim]`` array (numpy f16/f32, CPU torch f16/bf16/f32)."""
    view, name = _float_view(x, "x")
    return _native.quantize(
        view,
        name,
        bits=bits,
        asym=asym,
        axis=axis,
        group_size=group_size,
        residual_length=residual_length,
    )


def _empty(shape: tuple[int, int, int], name: str) -> tuple[Any, Any]:
    """(array to return, buffer view of it) for a fresh output."""
    if name != "bfloat16":
        a = np.empty(shape, dtype=name)
        return a, a
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.empty(shape, dtype=torch.bfloat16)
        return t, t.view(torch.int16).numpy()
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "dequantizing bfloat16 needs torch or ml_dtypes installed, or an out= buffer"
        ) from None
    a = np.empty(shape, dtype=ml_dtypes.bfloat16)
    return a, a.view(np.uint16)


def dequantize(q: QuantizedTensor, out: Any = None) -> Any:
    """Reconstruct the tensor: same shape and dtype as the input. float16/float32 give a numpy array,
    bfloat16 a torch tensor (or ml_dtypes array without torch). If ``out`` is given it is filled and returned."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if out is None:
        result, view = _empty(q.shape, q.dtype)
    else:
        view, name = _float_view(out, "out")
        if name != q.dtype:
            raise TypeError(f"out must have dtype {q.dtype}, got {name}")
        result = out
    _native.dequantize_into(q, view)
    return result


def packed_nbytes(
    tokens: int,
    heads: int,
    head_dim: int,
    *,
    dtype: Any,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> int:
    """Size in bytes of one packed blob, header included."""
    return _native.packed_nbytes(
        tokens,
        heads,
        head_dim,
        dtype=dtype_name(dtype),
        bits=bits,
        asym=asym,
        axis=axis,
        group_size=group_size,
        residual_length=residual_length,
    )


def blob_layout(
    tokens: int,
    heads: int,
    head_dim: int,
    *,
    dtype: Any,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> BlobLayout:
    """Section offsets, header bytes and padding of one blob (FORMAT.md), from the Rust core."""
    return BlobLayout(
        tokens,
        heads,
        head_dim,
        dtype=dtype_name(dtype),
        bits=bits,
        asym=asym,
        axis=axis,
        group_size=group_size,
        residual_length=residual_length,
    )


def quantize_pages(
    x: Any,
    dst: Any,
    page_ids: Any,
    *,
    page_tokens: int,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> None:
    """Quantize ``len(page_ids)`` pages of ``page_tokens`` tokens each: page i of ``x`` becomes one blob
    (identical to ``bytes(quantize(page))``) at ``dst[page_ids[i], :blob_nbytes]``. GIL released, pages in parallel."""
    view, name = _float_view(x, "x")
    _native.quantize_pages(
        view,
        name,
        _bytes_view(dst, "dst"),
        _ids_view(page_ids),
        page_tokens=page_tokens,
        bits=bits,
        asym=asym,
        axis=axis,
        group_size=group_size,
        residual_length=residual_length,
    )


def dequantize_pages(
    src: Any,
    page_ids: Any,
    out: Any,
    *,
    bits: int,
    asym: bool,
    axis: int,
    group_size: int,
    residual_length: int = 0,
) -> None:
    """Dequantize the blobs at rows ``page_ids`` of ``src`` into ``out`` ``[n*page_tokens, heads, head_dim]``.
    Every header is checked (config, dtype, shape) before anything is written."""
    view, name = _float_view(out, "out")
    _native.dequantize_pages(
        _bytes_view(src, "src"),
        _ids_view(page_ids),
        view,
        name,
        bits=bits,
        asym=asym,
        axis=axis,
        group_size=group_size,
        residual_length=residual_length,
    )
