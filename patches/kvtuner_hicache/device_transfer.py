"""Backup and load of the quantizing host pool through the device codec: the pool's
rows, page header, stamps and residual overlay ring, filled and read by the kernels of
:mod:`.device_codec`, enqueued on the current stream (the transfer stream the release
made current). Nothing here waits for the device or reads device memory on the host;
page ids are computed from the host indices on the device, and the overlay's maps live
on the device (``docs/host-pool.md``, "Codecs")."""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch

from . import device_codec as dc
from .page_format import STAMP_OFFSET

CODEC_CHOICES = ("auto", "device", "host")
_STAMP_MASK = (1 << 63) - 1


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


class DeviceTransfers:
    """The device-codec data path of one ``KVTunerMHATokenToKVPoolHost``."""

    def __init__(self, pool) -> None:
        plan = pool.kvtuner_plan
        cfg = plan.cfg
        self.pool = pool
        self.device = torch.device(pool.device_k_buffers[0].device)
        self.page_size = plan.page_size
        self.sink_tokens = pool.kvtuner_layout.sink_tokens
        self.specs: Dict[Tuple[int, bool], dc.BlobSpec] = {}
        self.templates: Dict[Tuple[int, bool], dc.BlobTemplate] = {}
        templates: Dict[dc.BlobSpec, dc.BlobTemplate] = {}
        for layer, (k_bits, v_bits) in enumerate(plan.layer_bits):
            for is_value, bits, axis in (
                (False, k_bits, cfg.axis_key),
                (True, v_bits, cfg.axis_value),
            ):
                spec = dc.BlobSpec(
                    plan.page_size,
                    plan.head_num,
                    plan.head_dim,
                    plan.dtype_name,
                    bits,
                    cfg.asym,
                    axis,
                    cfg.group_size,
                )
                if not dc.spec_total_matches(spec, pool._kq.packed_nbytes):
                    raise RuntimeError(f"device codec layout differs from kvtuner_quant for {spec}")
                if spec not in templates:
                    templates[spec] = dc.BlobTemplate(spec, self.device)
                self.specs[(layer, is_value)] = spec
                self.templates[(layer, is_value)] = templates[spec]
        self.max_groups = max(spec.ngroups for spec in self.specs.values())
        self.header = pool._kvt_header.to(self.device)
        self.overlay: Optional[DeviceOverlayMaps] = None
        if pool.kvtuner_overlay is not None:
            self.overlay = DeviceOverlayMaps(pool.kvtuner_overlay, pool.page_num, self.device)

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
        """Forget the overlay entries of host pages (freed or refilled rows)."""
        if self.overlay is not None and pages.numel():
            self.overlay.drop(_on_device(pages, self.device))

    def overlay_pages(self) -> List[int]:
        return [] if self.overlay is None else self.overlay.pages()

    def clear(self) -> None:
        if self.overlay is not None:
            self.overlay.clear()

    def backup(self, host_indices: torch.Tensor, device_indices: torch.Tensor) -> None:
        """Every layer's K and V of the pages into their host rows (and the window
        into the overlay), then the page headers with fresh stamps."""
        pool = self.pool
        n, pages = self._pages(host_indices)
        if n == 0:
            return
        rows = _on_device(device_indices, self.device)
        scratch = torch.empty(max(n * self.max_groups, 1), dtype=torch.float32, device=self.device)
        scratch = (scratch, torch.empty_like(scratch))
        with pool._backup_lock:
            window = self.overlay.reserve(pages, n) if self.overlay is not None else None
            for layer in range(pool.layer_num):
                for is_value, buffers in (
                    (False, pool.device_k_buffers),
                    (True, pool.device_v_buffers),
                ):
                    key = (layer, is_value)
                    off, _ = pool.kvtuner_layout.blob(layer, is_value)
                    dc.quantize_pages(
                        buffers[layer],
                        rows,
                        pool.kv_buffer,
                        pages,
                        off,
                        self.templates[key],
                        scratch,
                    )
                    sink_off, _ = pool.kvtuner_layout.sink(layer, is_value)
                    dc.store_sink_tokens(
                        buffers[layer],
                        rows,
                        pool.kv_buffer,
                        pages,
                        sink_off,
                        self.sink_tokens,
                        self.specs[key],
                    )
                    if window is not None:
                        slots, first = window
                        dc.copy_exact_pages(
                            buffers[layer],
                            rows[first * self.page_size :],
                            self.overlay.view,
                            slots,
                            layer,
                            is_value,
                            self.specs[key],
                        )
            stamps = self._stamps(n)
            dc.write_page_headers(pool.kv_buffer, pages, self.header, stamps, STAMP_OFFSET)
            if window is not None:
                slots, first = window
                self.overlay.publish(pages[first:], slots, stamps[first:])

    def _stamps(self, n: int) -> torch.Tensor:
        """The pool's next ``n`` backup stamps, made on the device."""
        pool = self.pool
        with pool._stamp_lock:
            start = pool._stamp_next
            pool._stamp_next = (start + n) & _STAMP_MASK
        return (torch.arange(n, dtype=torch.int64, device=self.device) + start) & _STAMP_MASK

    def load(self, host_indices: torch.Tensor, device_indices: torch.Tensor, layer: int) -> None:
        """One layer's K and V of the pages into the device rows."""
        pool = self.pool
        n, pages = self._pages(host_indices)
        if n == 0:
            return
        rows = _on_device(device_indices, self.device)
        # K blob, V blob and sink section of a layer are neighbours in the row: one span
        # crosses the bus.
        span_off, span_nbytes = pool.kvtuner_layout.layer_span(layer)
        span = dc.gather_spans(pool.kv_buffer, pages, span_off, span_nbytes, self.device)
        for is_value, buffers in ((False, pool.device_k_buffers), (True, pool.device_v_buffers)):
            off, _ = pool.kvtuner_layout.blob(layer, is_value)
            overlay = None if self.overlay is None else (self.overlay.view, layer, is_value)
            dc.dequantize_pages(
                pool.kv_buffer,
                pages,
                off,
                self.specs[(layer, is_value)],
                buffers[layer],
                rows,
                overlay,
                staged=(span, off - span_off),
            )
        self._load_sink(span, span_off, rows.view(n, self.page_size), layer)

    def _load_sink(self, span: torch.Tensor, span_off: int, rows: torch.Tensor, layer: int) -> None:
        """Each page's exact sink tokens from the staged span over its decoded device rows."""
        # Same stream as the dequantize kernels, so these writes land after theirs.
        sink = self.sink_tokens
        if not sink:
            return
        pool = self.pool
        n = rows.shape[0]
        dst_rows = rows[:, :sink].reshape(-1)
        for is_value, buffers in ((False, pool.device_k_buffers), (True, pool.device_v_buffers)):
            off, nbytes = pool.kvtuner_layout.sink(layer, is_value)
            ints = dc.int_view(buffers[layer])
            held = span[:, off - span_off : off - span_off + nbytes].view(ints.dtype)
            ints[dst_rows] = held.reshape(n * sink, *ints.shape[1:])
