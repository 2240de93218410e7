"""Byte layout of one quantized host page row, the unit backups, loads and storage backends
move: a 64-byte page header, then per layer one ``kvtuner_quant`` blob per part (the MHA pool's
parts: K, V) and the sink section (the page's first ``sink_tokens`` tokens of each part, exact,
in the KV dtype). Blob geometry comes from ``kvtuner_quant.blob_layout``. Field by field:
``docs/host-pool.md`` ("Page row format").
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from typing import Any, List, Optional, Tuple

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


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """One part of a layer's page (MHA: K or V; MLA: the latent or the rope keys): the shape
    of its device rows and how the row stores it."""

    heads: int
    head_dim: int
    # None: stored exact (every token, bit for bit, in the KV dtype).
    bits: Optional[int]
    axis: int = 0

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclasses.dataclass(frozen=True)
class RowPart:
    """Where one layer's share of one device buffer (MHA: its K or its V) lies in a row."""

    spec: PartSpec
    blob_off: int
    # kvtuner_quant.BlobLayout of the part's page (section offsets, header bytes, padding);
    # None for an exact part.
    blob: Any
    # The part's exact tokens (the page's first sink tokens; every token of an exact part),
    # inside the layer's exact section.
    sink_off: int
    sink_nbytes: int
    exact_tokens: int

    @property
    def blob_nbytes(self) -> int:
        return 0 if self.blob is None else self.blob.total_nbytes


def mha_row_parts(plan) -> List[Tuple[PartSpec, ...]]:
    """Each layer's parts for a dense MHA plan: K, then V, both quantized."""
    cfg = plan.cfg
    return [
        (
            PartSpec(plan.head_num, plan.head_dim, k, cfg.axis_key),
            PartSpec(plan.head_num, plan.head_dim, v, cfg.axis_value),
        )
        for k, v in plan.layer_bits
    ]


def mla_row_parts(plan) -> List[Tuple[PartSpec, ...]]:
    """Each layer's parts for an MLA plan: the latent, quantized with the key flags (it is
    both keys and values), then the rope keys, exact."""
    cfg = plan.cfg
    return [
        (
            PartSpec(1, plan.head_dim, k, cfg.axis_key),
            PartSpec(1, plan.rope_dim, None),
        )
        for k, _ in plan.layer_bits
    ]


# Row kind -> (page format version, parts of each layer). Format 4 is format 3 plus exact parts.
ROW_KINDS = {
    "mha": (PAGE_FORMAT_VERSION, mha_row_parts),
    "mla": (4, mla_row_parts),
}


def _gaps(spans: List[Tuple[int, int]], total: int) -> List[Tuple[int, int]]:
    """(offset, nbytes) of the bytes of ``[0, total)`` no span covers."""
    gaps, at = [], 0
    for off, nbytes in sorted(spans):
        if off > at:
            gaps.append((at, off - at))
        at = max(at, off + nbytes)
    if total > at:
        gaps.append((at, total - at))
    return gaps


class PageLayout:
    """Offsets of every blob and sink section inside a row, computed once per pool from the
    plan."""

    def __init__(self, plan, blob_layout, layer_parts=None) -> None:
        """Lay out ``plan``'s parts: ``layer_parts[layer]`` gives each part's ``PartSpec``
        (default: the plan's row kind's, ``ROW_KINDS``), ``blob_layout`` is
        ``kvtuner_quant.blob_layout``."""
        # Passed in rather than imported, so this module does not need the extension.
        self.plan = plan
        cfg = plan.cfg
        format_version, kind_parts = ROW_KINDS[plan.kind]
        if layer_parts is None:
            layer_parts = kind_parts(plan)
        itemsize = KV_ITEMSIZE[plan.dtype_name]
        # A layer's quantized parts keep their first sink_tokens tokens exact too.
        self.sink_tokens = cfg.sink_tokens
        self.sink_token_nbytes = plan.head_num * plan.head_dim * itemsize
        self.parts: List[Tuple[RowPart, ...]] = []
        off = PAGE_HEADER_NBYTES
        for specs in layer_parts:
            blobs = []
            for spec in specs:
                if not spec.quantized:
                    blobs.append((off, None))
                    continue
                blob = blob_layout(
                    plan.page_size,
                    spec.heads,
                    spec.head_dim,
                    dtype=plan.dtype_name,
                    bits=spec.bits,
                    asym=cfg.asym,
                    axis=spec.axis,
                    group_size=cfg.group_size,
                    residual_length=0,
                )
                blobs.append((off, blob))
                off = _round_up(off + blob.total_nbytes, BLOB_ALIGN)
            # The layer's exact section: each part's exact tokens, part after part.
            row_parts = []
            for spec, (blob_off, blob) in zip(specs, blobs):
                tokens = self.sink_tokens if spec.quantized else plan.page_size
                nbytes = tokens * spec.heads * spec.head_dim * itemsize
                row_parts.append(RowPart(spec, blob_off, blob, off, nbytes, tokens))
                off += nbytes
            self.parts.append(tuple(row_parts))
            off = _round_up(off, BLOB_ALIGN)
        self.payload_nbytes = off
        # Rows of whole tokens and of two 4 KiB-aligned halves: zero-copy backends move a row
        # as two spans (the K and V slots of an MHA key), and O_DIRECT ones (NIXL's file
        # plugins, by default) refuse a span whose address or length is not whole 4 KiB pages.
        self.row_nbytes = _round_up(off, math.lcm(2 * DIRECT_IO_ALIGN, plan.page_size))
        self.format_version = format_version
        self.gaps = _gaps(
            [(0, PAGE_HEADER_NBYTES)]
            + [(p.blob_off, p.blob_nbytes) for parts in self.parts for p in parts]
            + [(p.sink_off, p.sink_nbytes) for parts in self.parts for p in parts],
            self.row_nbytes,
        )
        self.tag = plan.tag()
        self.digest = hashlib.sha256(self.tag.encode()).digest()[:16]
        self.header = _HEADER_STRUCT.pack(
            PAGE_MAGIC,
            format_version,
            PAGE_HEADER_NBYTES,
            len(self.parts),
            plan.page_size,
            self.row_nbytes,
            self.digest,
        ).ljust(PAGE_HEADER_NBYTES, b"\0")

    @property
    def quantized_parts(self) -> int:
        """Parts per layer that are quantized (they come first; the residual overlay holds
        exact copies of these only)."""
        return sum(part.spec.quantized for part in self.parts[0]) if self.parts else 0

    # Per-part lists of the MHA row (K = part 0, V = part 1), as tests and benchmarks read them.

    @property
    def k_offsets(self) -> List[int]:
        return [parts[0].blob_off for parts in self.parts]

    @property
    def v_offsets(self) -> List[int]:
        return [parts[1].blob_off for parts in self.parts]

    @property
    def k_nbytes(self) -> List[int]:
        return [parts[0].blob_nbytes for parts in self.parts]

    @property
    def v_nbytes(self) -> List[int]:
        return [parts[1].blob_nbytes for parts in self.parts]

    @property
    def sink_offsets(self) -> List[int]:
        return [parts[0].sink_off for parts in self.parts]

    @property
    def sink_nbytes(self) -> int:
        """Bytes of one layer's sink section (every part's sink tokens)."""
        return sum(part.sink_nbytes for part in self.parts[0]) if self.parts else 0

    @property
    def bytes_per_token(self) -> int:
        """Row bytes per token: what the pool reports as ``get_size_per_token()``."""
        return self.row_nbytes // self.plan.page_size

    def blob(self, layer: int, part: int) -> Tuple[int, int]:
        """(offset, nbytes) of one layer's blob of a part (MHA: ``is_value``) inside the row."""
        p = self.parts[layer][part]
        return p.blob_off, p.blob_nbytes

    def sink(self, layer: int, part: int) -> Tuple[int, int]:
        """(offset, nbytes) of one layer's exact sink tokens of a part inside the row."""
        p = self.parts[layer][part]
        return p.sink_off, p.sink_nbytes

    def layer_span(self, layer: int) -> Tuple[int, int]:
        """(offset, nbytes) of everything one layer holds: its blobs and its sink section."""
        parts = self.parts[layer]
        start = parts[0].blob_off
        return start, parts[-1].sink_off + parts[-1].sink_nbytes - start

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
