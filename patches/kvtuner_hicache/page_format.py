"""Byte layout of one quantized host page row, the unit backups, loads and storage backends
move: a 64-byte page header, then per layer one ``kvtuner_quant`` blob for K, one for V and the
sink section (the page's first ``sink_tokens`` tokens of K and of V, exact, in the KV dtype).
Field by field: ``docs/host-pool.md`` ("Page row format").
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import List, Tuple

PAGE_MAGIC = b"KVTPAGE1"
PAGE_FORMAT_VERSION = 3
PAGE_HEADER_NBYTES = 64
BLOB_ALIGN = 64
DIRECT_IO_ALIGN = 4096
# magic, version, header size, layers, page size, row bytes, config digest
_HEADER_STRUCT = struct.Struct("<8sHHIIQ16s")
_HEADER_FIELDS = (
    "magic",
    "version",
    "header size",
    "layers",
    "page size",
    "row bytes",
    "config digest",
)
# The per-backup stamp: inside the header, outside the bytes the config check compares.
STAMP_OFFSET = 48
STAMP_NBYTES = 8


def _round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return (n + m - 1) // m * m


# Bytes per element of each KV dtype the pool stores (sink sections, device-codec blobs).
KV_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


class PageLayout:
    """Offsets of every blob and sink section inside a row, computed once per pool from the
    plan."""

    def __init__(self, plan, packed_nbytes) -> None:
        """Lay out ``plan``'s blobs; ``packed_nbytes`` is kvtuner_quant's blob size function."""
        # Passed in rather than imported, so this module does not need the extension.
        self.plan = plan
        cfg = plan.cfg
        self.k_offsets: List[int] = []
        self.v_offsets: List[int] = []
        self.k_nbytes: List[int] = []
        self.v_nbytes: List[int] = []
        self.sink_offsets: List[int] = []
        # One layer's sink section: K of the page's first sink_tokens tokens, then V.
        self.sink_tokens = cfg.sink_tokens
        self.sink_token_nbytes = plan.head_num * plan.head_dim * KV_ITEMSIZE[plan.dtype_name]
        self.sink_nbytes = 2 * self.sink_tokens * self.sink_token_nbytes
        off = PAGE_HEADER_NBYTES
        for k_bits, v_bits in plan.layer_bits:
            for bits, axis, offs, sizes in (
                (k_bits, cfg.axis_key, self.k_offsets, self.k_nbytes),
                (v_bits, cfg.axis_value, self.v_offsets, self.v_nbytes),
            ):
                n = int(
                    packed_nbytes(
                        plan.page_size,
                        plan.head_num,
                        plan.head_dim,
                        dtype=plan.dtype_name,
                        bits=bits,
                        asym=cfg.asym,
                        axis=axis,
                        group_size=cfg.group_size,
                        residual_length=0,
                    )
                )
                offs.append(off)
                sizes.append(n)
                off = _round_up(off + n, BLOB_ALIGN)
            self.sink_offsets.append(off)
            off = _round_up(off + self.sink_nbytes, BLOB_ALIGN)
        self.payload_nbytes = off
        # Rows of whole tokens and of two 4 KiB-aligned halves: zero-copy backends move a row
        # as two spans (the K and V slots of an MHA key), and O_DIRECT ones (NIXL's file
        # plugins, by default) refuse a span whose address or length is not whole 4 KiB pages.
        self.row_nbytes = _round_up(off, math.lcm(2 * DIRECT_IO_ALIGN, plan.page_size))
        self.tag = plan.tag()
        self.digest = hashlib.sha256(self.tag.encode()).digest()[:16]
        self.header = _HEADER_STRUCT.pack(
            PAGE_MAGIC,
            PAGE_FORMAT_VERSION,
            PAGE_HEADER_NBYTES,
            len(plan.layer_bits),
            plan.page_size,
            self.row_nbytes,
            self.digest,
        ).ljust(PAGE_HEADER_NBYTES, b"\0")

    @property
    def bytes_per_token(self) -> int:
        """Row bytes per token: what the pool reports as ``get_size_per_token()``."""
        return self.row_nbytes // self.plan.page_size

    def blob(self, layer: int, is_value: bool) -> Tuple[int, int]:
        """(offset, nbytes) of one layer's K or V blob inside the row."""
        if is_value:
            return self.v_offsets[layer], self.v_nbytes[layer]
        return self.k_offsets[layer], self.k_nbytes[layer]

    def sink(self, layer: int, is_value: bool) -> Tuple[int, int]:
        """(offset, nbytes) of one layer's exact K or V sink tokens inside the row."""
        half = self.sink_nbytes // 2
        return self.sink_offsets[layer] + (half if is_value else 0), half

    def layer_span(self, layer: int) -> Tuple[int, int]:
        """(offset, nbytes) of everything one layer holds: K blob, V blob and sink section."""
        start = self.k_offsets[layer]
        return start, self.sink_offsets[layer] + self.sink_nbytes - start

    def header_mismatch(self, got: bytes) -> str | None:
        """None when ``got`` starts with this layout's header, else the first field that differs."""
        got = bytes(got[:PAGE_HEADER_NBYTES])
        if len(got) < PAGE_HEADER_NBYTES:
            return f"page holds {len(got)} bytes, less than the {PAGE_HEADER_NBYTES}-byte header"
        if self.config_bytes(got) == self.config_bytes(self.header):
            return None
        want = _HEADER_STRUCT.unpack_from(self.header)
        have = _HEADER_STRUCT.unpack_from(got)
        for name, w, h in zip(_HEADER_FIELDS, want, have):
            if w != h:
                if name == "config digest":
                    return (
                        "written under another quantization config (config digest "
                        f"{h.hex()} != {w.hex()} of {self.tag})"
                    )
                return f"{name}: expected {w!r}, got {h!r}"
        return "padding after the header is not zero"

    @staticmethod
    def config_bytes(header: bytes) -> bytes:
        """The header without its backup stamp: what must match for a page to be read."""
        return header[:STAMP_OFFSET] + header[STAMP_OFFSET + STAMP_NBYTES : PAGE_HEADER_NBYTES]
