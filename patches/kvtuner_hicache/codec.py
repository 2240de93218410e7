"""The page codec of the quantizing host pool: one interface, two implementations.

A codec moves pages between the device KV buffers and the pool's quantized host rows: a
backup packs every layer of some pages (blobs, exact sink tokens, page header with a fresh
stamp, the residual window's exact copies), a load restores one layer. It is built from
explicit parts (:class:`CodecParts`: the row layout, the host rows, the device buffers of
each part of a layer, the stamp counter, the backup lock and the residual overlay), not
from the pool, so every pool kind that lays its rows out with ``PageLayout`` can use it.

* :class:`HostCodec` (here): ``kvtuner_quant`` on the host, on copies of the device rows;
* ``DeviceCodec`` (``device_transfer.py``): the Triton kernels of ``device_codec.py``,
  enqueued on the current stream.

Both write the same bytes (``docs/host-pool.md``, "Codecs").
"""

from __future__ import annotations

import abc
import dataclasses
import os
import threading
from typing import List, Optional, Sequence

import torch

from .overlay import ResidualOverlay
from .page_format import PAGE_HEADER_NBYTES, STAMP_NBYTES, STAMP_OFFSET, PageLayout, RowPart

_STAMP_MASK = (1 << 63) - 1


def import_quant():
    """The kvtuner_quant extension, with an install hint when it is missing."""
    try:
        import kvtuner_quant
    except ImportError as e:
        raise ImportError(
            "--enable-kvtuner-hicache needs the kvtuner_quant extension "
            f"(pip install ./quant from the kvtuner-patch checkout): {e}"
        ) from None
    return kvtuner_quant


class StampCounter:
    """Backup stamps of one pool: a random 63-bit base plus a counter (one per page and backup)."""

    def __init__(self, start: Optional[int] = None):
        if start is None:
            start = int.from_bytes(os.urandom(8), "little") >> 1
        self._next = start & _STAMP_MASK
        self._lock = threading.Lock()

    def take(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The next ``n`` stamps as int64 on ``device`` (made there: nothing is copied)."""
        with self._lock:
            start = self._next
            self._next = (start + n) & _STAMP_MASK
        return (torch.arange(n, dtype=torch.int64, device=device) + start) & _STAMP_MASK


@dataclasses.dataclass(frozen=True)
class CodecParts:
    """What a codec is built from."""

    layout: PageLayout
    # uint8 [host pages, layout.row_nbytes]
    rows: torch.Tensor
    # sources[part][layer]: the device buffer holding that part of the layer (MHA: K, V), any
    # tensor whose rows are a part's heads x head_dim elements (a column slice of a wider
    # buffer too).
    sources: Sequence[Sequence[torch.Tensor]]
    stamps: StampCounter
    # One backup at a time: ring slots and stamps are taken in backup order.
    backup_lock: threading.Lock
    overlay: Optional[ResidualOverlay] = None

    @property
    def page_size(self) -> int:
        return self.layout.plan.page_size

    @property
    def layer_num(self) -> int:
        return len(self.layout.parts)

    @property
    def device(self) -> torch.device:
        """Where the device buffers live."""
        return torch.device(self.sources[0][0].device)


def host_pages(host_indices: torch.Tensor, page_size: int) -> torch.Tensor:
    """Page-aligned host token indices -> CPU int64 page ids."""
    idx = host_indices.cpu() if host_indices.device.type != "cpu" else host_indices
    if idx.numel() % page_size:
        raise ValueError(
            f"KVTuner host pool moves whole pages: got {idx.numel()} host indices "
            f"for page_size {page_size}"
        )
    starts = idx[::page_size].to(torch.int64)
    if bool((starts % page_size != 0).any()):
        raise ValueError("KVTuner host pool: host indices are not page-aligned")
    return starts // page_size


class PageCodec(abc.ABC):
    """Packs pages of the device buffers into host rows and reads them back."""

    name: str

    def __init__(self, parts: CodecParts):
        self.parts = parts

    @abc.abstractmethod
    def backup(self, host_indices: torch.Tensor, device_indices: torch.Tensor) -> None:
        """Every layer of the pages into their host rows, then the page headers."""

    @abc.abstractmethod
    def load(self, host_indices: torch.Tensor, device_indices: torch.Tensor, layer: int) -> None:
        """One layer of the pages into the device rows."""

    @abc.abstractmethod
    def drop(self, pages: torch.Tensor) -> None:
        """Forget the exact copies of host pages (freed, rewritten or refilled rows)."""

    @abc.abstractmethod
    def exact_pages(self) -> List[int]:
        """Host pages the residual overlay serves exactly (tests, metrics)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget every exact copy."""


def _gather_to_cpu(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows of a device KV buffer, copied to host memory for the codec."""
    x = buffer.index_select(0, rows)
    return x if x.device.type == "cpu" else x.to("cpu")


class HostCodec(PageCodec):
    """``kvtuner_quant`` on the host: gathers the device rows into host memory and packs
    them there (multi-threaded, GIL released); loads decode on the host and copy back."""

    name = "host"

    def __init__(self, parts: CodecParts):
        super().__init__(parts)
        self._kq = import_quant()
        self._header = torch.frombuffer(bytearray(parts.layout.header), dtype=torch.uint8)

    def _device_rows(self, device_indices: torch.Tensor) -> torch.Tensor:
        """Device token indices as int64 on the device the KV buffers live on."""
        device = self.parts.device
        if device_indices.device != device:
            device_indices = device_indices.to(device)
        return device_indices.to(torch.int64)

    def _columns(self, off: int, nbytes: int) -> torch.Tensor:
        """The byte columns ``[off, off + nbytes)`` of every host row."""
        return self.parts.rows[:, off : off + nbytes]

    def backup(self, host_indices: torch.Tensor, device_indices: torch.Tensor) -> None:
        p = self.parts
        pages = host_pages(host_indices, p.page_size)
        n = len(pages)
        if n == 0:
            return
        rows = self._device_rows(device_indices)
        page_ids = pages.numpy()
        ps = p.page_size
        with p.backup_lock:
            overlay = p.overlay
            window = overlay.reserve(pages) if overlay is not None else None
            for layer in range(p.layer_num):
                for part, row_part in enumerate(p.layout.parts[layer]):
                    x = _gather_to_cpu(p.sources[part][layer], rows)
                    self._store_exact(pages, row_part, x)
                    if row_part.blob is None:
                        continue
                    self._kq.quantize_pages(
                        x.view(-1, *row_part.blob.shape[1:]),
                        self._columns(row_part.blob_off, row_part.blob_nbytes),
                        page_ids,
                        page_tokens=ps,
                        **row_part.blob.codec_kwargs(),
                    )
                    if window is not None:
                        slots, first = window
                        overlay.store(slots, part, layer, x[first * ps :])
            stamps = self._write_headers(pages)
            if window is not None:
                slots, first = window
                overlay.publish(pages[first:], slots, stamps[first:])

    def load(self, host_indices: torch.Tensor, device_indices: torch.Tensor, layer: int) -> None:
        p = self.parts
        pages = host_pages(host_indices, p.page_size)
        n = len(pages)
        if n == 0:
            return
        rows = self._device_rows(device_indices).view(n, p.page_size)
        dev = [buffers[layer] for buffers in p.sources]
        quantized = torch.arange(n)
        if p.overlay is not None:

            def write_exact(positions, *exact):
                dst_rows = rows[positions.to(rows.device)].reshape(-1)
                for buf, src in zip(dev, exact):
                    buf[dst_rows] = src.reshape(-1, *buf.shape[1:]).to(
                        buf.device, non_blocking=False
                    )

            quantized = p.overlay.load_layer(pages, self._row_stamps, layer, write_exact)
        if quantized.numel():
            self._dequantize(pages[quantized], rows[quantized.to(rows.device)], layer)
        self._load_exact(pages, rows, layer)

    def _store_exact(self, pages: torch.Tensor, row_part: RowPart, x: torch.Tensor) -> None:
        """Keep the part's exact tokens of each page of ``x`` (gathered device rows): the
        first sink tokens of a quantized part, every token of an exact one."""
        tokens = row_part.exact_tokens
        if tokens:
            head = x.view(len(pages), self.parts.page_size, -1)[:, :tokens]
            self._columns(row_part.sink_off, row_part.sink_nbytes)[pages] = (
                head.contiguous().view(torch.uint8).view(len(pages), -1)
            )

    def _load_exact(self, pages: torch.Tensor, rows: torch.Tensor, layer: int) -> None:
        """Write each page's exact tokens over their decoded values ([pages, page_size])."""
        p = self.parts
        for buffers, row_part in zip(p.sources, p.layout.parts[layer]):
            if not row_part.exact_tokens:
                continue
            buf = buffers[layer]
            dst_rows = rows[:, : row_part.exact_tokens].reshape(-1)
            held = self._columns(row_part.sink_off, row_part.sink_nbytes)[pages]
            buf[dst_rows] = held.view(buf.dtype).view(-1, *buf.shape[1:]).to(buf.device)

    def _dequantize(self, pages: torch.Tensor, rows: torch.Tensor, layer: int) -> None:
        """Decode one layer of ``pages`` into the device rows ``rows`` ([pages, page_size])."""
        p = self.parts
        dst_rows = rows.reshape(-1)
        page_ids = pages.numpy()
        for buffers, row_part in zip(p.sources, p.layout.parts[layer]):
            if row_part.blob is None:
                continue
            buf = buffers[layer]
            out = torch.empty((len(pages) * p.page_size, *row_part.blob.shape[1:]), dtype=buf.dtype)
            self._kq.dequantize_pages(
                self._columns(row_part.blob_off, row_part.blob_nbytes),
                page_ids,
                out,
                **row_part.blob.codec_kwargs(),
            )
            buf[dst_rows] = out.view(-1, *buf.shape[1:]).to(buf.device)

    def _write_headers(self, pages: torch.Tensor) -> torch.Tensor:
        """Write the page header with a fresh backup stamp into each page; returns the stamps."""
        n = len(pages)
        rows = self.parts.rows
        rows[pages, :PAGE_HEADER_NBYTES] = self._header
        stamps = self.parts.stamps.take(n)
        stamp_bytes = stamps.view(torch.uint8).view(n, STAMP_NBYTES)
        rows[pages, STAMP_OFFSET : STAMP_OFFSET + STAMP_NBYTES] = stamp_bytes
        return stamps

    def _row_stamps(self, pages: torch.Tensor) -> torch.Tensor:
        """The backup stamp each of ``pages`` carries in its header."""
        cols = self._columns(STAMP_OFFSET, STAMP_NBYTES)[pages]
        return cols.contiguous().view(torch.int64).reshape(-1)

    def drop(self, pages: torch.Tensor) -> None:
        if self.parts.overlay is not None:
            self.parts.overlay.drop(pages)

    def exact_pages(self) -> List[int]:
        return [] if self.parts.overlay is None else self.parts.overlay.pages()

    def clear(self) -> None:
        if self.parts.overlay is not None:
            self.parts.overlay.clear()
