"""The device implementation of the page codec (:mod:`.codec`): host rows, page headers,
stamps and the residual overlay ring, filled and read by the kernels of
:mod:`.device_codec`, enqueued on the current stream (the transfer stream the release
made current). Nothing here waits for the device or reads device memory on the host;
page ids are computed from the host indices on the device, and the overlay's maps live
on the device (``docs/host-pool.md``, "Codecs")."""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch

from . import device_codec as dc
from .codec import CodecParts, HostCodec, PageCodec
from .page_format import STAMP_OFFSET

CODEC_CHOICES = ("auto", "device", "host")


def choose_codec(requested: str, device: torch.device, host_rows_pinned: bool) -> Tuple[str, str]:
    """(codec, why) for device buffers on ``device``; raises ValueError when
    ``device`` was asked for and cannot run."""
    if requested not in CODEC_CHOICES:
        raise ValueError(
            f"--kvtuner-hicache-codec={requested!r} is not one of {', '.join(CODEC_CHOICES)}"
        )
    if requested == "host":
        return "host", "--kvtuner-hicache-codec host"
    problem = dc.device_codec_unavailable(device)
    if problem is None and device.type != "cpu" and not host_rows_pinned:
        problem = "the host rows are not pinned (kernels write them directly)"
    if requested == "device":
        if problem is not None:
            raise ValueError(f"--kvtuner-hicache-codec device cannot run: {problem}")
        return "device", "--kvtuner-hicache-codec device"
    if problem is not None:
        return "host", f"auto: {problem}"
    if device.type == "cpu":
        return "host", "auto: the device KV cache is on the CPU"
    return "device", f"auto: device KV on {device}, Triton {dc.triton.__version__}"


def build_codec(requested: str, parts: CodecParts) -> Tuple[PageCodec, str]:
    """The codec ``--kvtuner-hicache-codec`` picks for ``parts``, built, and why it runs."""
    device = parts.device
    pinned = device.type != "cpu" and parts.rows.is_pinned()
    name, why = choose_codec(requested, device, pinned)
    codec_cls = DeviceCodec if name == "device" else HostCodec
    return codec_cls(parts), why


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as int64 on ``device`` without blocking the host."""
    if t.device != device:
        if t.device.type == "cpu" and device.type != "cpu" and not t.is_pinned():
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    return t.to(torch.int64)


class DeviceOverlayMaps:
    """The residual ring's bookkeeping on the device, for the device codec.

    The ring's next slot is host state (it depends only on how many pages a backup
    writes), so reserving slots needs no device value. A load takes a page's exact
    copy only while its slot carries the stamp its host row carries (the kernel reads
    the row's stamp itself); stamps are unique per page and backup, so that check
    alone decides correctness, and dropping entries only saves work.
    """

    def __init__(self, overlay, page_num: int, device: torch.device):
        self.overlay = overlay  # the pool's ResidualOverlay: its buffer holds the copies
        self.slots = overlay.slots
        self.window_pages = overlay.window_pages
        # One spare entry past the end of each map absorbs writes for "none".
        self.slot_of_page = torch.full((page_num + 1,), -1, dtype=torch.int64, device=device)
        self.page_of_slot = torch.full((self.slots + 1,), -1, dtype=torch.int64, device=device)
        self.slot_stamp = torch.full((self.slots,), -1, dtype=torch.int64, device=device)
        self.view = dc.OverlayView(self.slot_of_page, self.slot_stamp, overlay.buffer, STAMP_OFFSET)
        self._next = 0
        self._lock = threading.Lock()
        self.device = device

    def drop(self, pages: torch.Tensor) -> None:
        """Forget the entries of ``pages`` (device int64)."""
        old = self.slot_of_page[pages]
        self.page_of_slot[torch.where(old >= 0, old, self.slots)] = -1
        self.slot_of_page[pages] = -1

    def reserve(self, pages: torch.Tensor, n: int) -> Optional[Tuple[torch.Tensor, int]]:
        """Drop the entries of pages about to be rewritten and take ring slots for the
        window (the last pages of this backup): (slots, first window position)."""
        self.drop(pages)
        w = min(self.window_pages, n, self.slots)
        if w == 0:
            return None
        with self._lock:
            first = self._next
            self._next = (first + w) % self.slots
        slots = (torch.arange(w, device=self.device) + first) % self.slots
        evicted = self.page_of_slot[slots]
        self.slot_of_page[torch.where(evicted >= 0, evicted, self.slot_of_page.shape[0] - 1)] = -1
        return slots, n - w

    def publish(self, pages: torch.Tensor, slots: torch.Tensor, stamps: torch.Tensor) -> None:
        self.page_of_slot[slots] = pages
        self.slot_of_page[pages] = slots
        self.slot_stamp[slots] = stamps

    def pages(self) -> List[int]:
        """Host pages served exactly (reads the device; tests, metrics)."""
        mapped = self.page_of_slot[:-1]
        return sorted(int(p) for p in mapped[mapped >= 0].tolist())

    def clear(self) -> None:
        self.slot_of_page.fill_(-1)
        self.page_of_slot.fill_(-1)
        with self._lock:
            self._next = 0


class DeviceCodec(PageCodec):
    """The device codec: the kernels of :mod:`.device_codec`, enqueued on the current
    stream, reading the device rows and writing the pinned host rows directly."""

    name = "device"

    def __init__(self, parts: CodecParts) -> None:
        super().__init__(parts)
        self.device = parts.device
        self.page_size = parts.page_size
        # Per (layer, part): the rows' shape, and for a quantized part its blob spec and
        # template (header and padding bytes on the device), one per distinct blob layout.
        self.shapes: Dict[Tuple[int, int], object] = {}
        self.specs: Dict[Tuple[int, int], dc.BlobSpec] = {}
        self.templates: Dict[Tuple[int, int], dc.BlobTemplate] = {}
        templates: Dict[dc.BlobSpec, dc.BlobTemplate] = {}
        for layer, row_parts in enumerate(parts.layout.parts):
            for part, row_part in enumerate(row_parts):
                if row_part.blob is None:
                    spec = row_part.spec
                    self.shapes[(layer, part)] = dc.RowShape(
                        self.page_size, spec.heads, spec.head_dim
                    )
                    continue
                spec = dc.BlobSpec.of(row_part.blob)
                if spec not in templates:
                    templates[spec] = dc.BlobTemplate(spec, self.device)
                self.specs[(layer, part)] = spec
                self.shapes[(layer, part)] = spec
                self.templates[(layer, part)] = templates[spec]
        self.max_groups = max((spec.ngroups for spec in self.specs.values()), default=1)
        self.header = torch.tensor(list(parts.layout.header), dtype=torch.uint8, device=self.device)
        self.overlay: Optional[DeviceOverlayMaps] = None
        if parts.overlay is not None:
            self.overlay = DeviceOverlayMaps(parts.overlay, parts.rows.shape[0], self.device)

    def _pages(self, host_indices: torch.Tensor) -> Tuple[int, torch.Tensor]:
        """(page count, device int64 page ids) of page-aligned host token indices."""
        ps = self.page_size
        if host_indices.numel() % ps:
            raise ValueError(
                f"KVTuner host pool moves whole pages: got {host_indices.numel()} host indices "
                f"for page_size {ps}"
            )
        n = host_indices.numel() // ps
        idx = _on_device(host_indices, self.device)
        return n, idx.view(n, ps)[:, 0] // ps

    def drop(self, pages: torch.Tensor) -> None:
        if self.overlay is not None and pages.numel():
            self.overlay.drop(_on_device(pages, self.device))

    def exact_pages(self) -> List[int]:
        return [] if self.overlay is None else self.overlay.pages()

    def clear(self) -> None:
        if self.overlay is not None:
            self.overlay.clear()

    def backup(self, host_indices: torch.Tensor, device_indices: torch.Tensor) -> None:
        """Every layer of the pages into their host rows (and the window into the
        overlay), then the page headers with fresh stamps."""
        p = self.parts
        n, pages = self._pages(host_indices)
        if n == 0:
            return
        rows = _on_device(device_indices, self.device)
        scratch = torch.empty(max(n * self.max_groups, 1), dtype=torch.float32, device=self.device)
        scratch = (scratch, torch.empty_like(scratch))
        with p.backup_lock:
            window = self.overlay.reserve(pages, n) if self.overlay is not None else None
            for layer, row_parts in enumerate(p.layout.parts):
                for part, row_part in enumerate(row_parts):
                    src = p.sources[part][layer]
                    dc.store_sink_tokens(
                        src,
                        rows,
                        p.rows,
                        pages,
                        row_part.sink_off,
                        row_part.exact_tokens,
                        self.shapes[(layer, part)],
                    )
                    if row_part.blob is None:
                        continue
                    dc.quantize_pages(
                        src,
                        rows,
                        p.rows,
                        pages,
                        row_part.blob_off,
                        self.templates[(layer, part)],
                        scratch,
                    )
                    if window is not None:
                        slots, first = window
                        dc.copy_exact_pages(
                            src,
                            rows[first * self.page_size :],
                            self.overlay.view,
                            slots,
                            layer,
                            part,
                            self.specs[(layer, part)],
                        )
            stamps = p.stamps.take(n, self.device)
            dc.write_page_headers(p.rows, pages, self.header, stamps, STAMP_OFFSET)
            if window is not None:
                slots, first = window
                self.overlay.publish(pages[first:], slots, stamps[first:])

    def load(self, host_indices: torch.Tensor, device_indices: torch.Tensor, layer: int) -> None:
        """One layer of the pages into the device rows."""
        p = self.parts
        n, pages = self._pages(host_indices)
        if n == 0:
            return
        rows = _on_device(device_indices, self.device)
        # A layer's blobs and sink section are neighbours in the row: one span crosses the bus.
        span_off, span_nbytes = p.layout.layer_span(layer)
        span = dc.gather_spans(p.rows, pages, span_off, span_nbytes, self.device)
        for part, row_part in enumerate(p.layout.parts[layer]):
            if row_part.blob is None:
                continue
            overlay = None if self.overlay is None else (self.overlay.view, layer, part)
            dc.dequantize_pages(
                p.rows,
                pages,
                row_part.blob_off,
                self.specs[(layer, part)],
                p.sources[part][layer],
                rows,
                overlay,
                staged=(span, row_part.blob_off - span_off),
            )
        self._load_sink(span, span_off, rows.view(n, self.page_size), layer)

    def _load_sink(self, span: torch.Tensor, span_off: int, rows: torch.Tensor, layer: int) -> None:
        """Each page's exact tokens from the staged span over its decoded device rows."""
        # Same stream as the dequantize kernels, so these writes land after theirs.
        n = rows.shape[0]
        for buffers, row_part in zip(self.parts.sources, self.parts.layout.parts[layer]):
            tokens = row_part.exact_tokens
            if not tokens:
                continue
            dst_rows = rows[:, :tokens].reshape(-1)
            ints = dc.int_view(buffers[layer])
            off = row_part.sink_off - span_off
            held = span[:, off : off + row_part.sink_nbytes].view(ints.dtype)
            ints[dst_rows] = held.reshape(n * tokens, *ints.shape[1:])
