"""The residual window of the quantizing host pool: exact copies of the newest pages of each
backup, in a ring carved from the pool's own byte budget. Design: ``docs/host-pool.md``."""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple

import torch

# Share of the host pool's bytes the exact overlay may take.
OVERLAY_BUDGET_FRACTION = 1 / 8


def window_pages(residual_length: int, page_size: int) -> int:
    """Pages of each backup kept exact: ``ceil(residual_length / page_size)``, 0 when off."""
    return 0 if residual_length <= 0 else -(-residual_length // page_size)


def carve_slots(
    page_num: int, row_nbytes: int, exact_page_nbytes: int, window: int, residual_length: int
) -> Tuple[int, int]:
    """(exact slots, quantized rows they replace) for a pool of ``page_num`` rows."""
    budget = page_num * row_nbytes
    slots = int(budget * OVERLAY_BUDGET_FRACTION) // exact_page_nbytes
    if slots < window:
        raise ValueError(
            f"--kvtuner-hicache-residual-length {residual_length} "
            f"needs {window} exact pages ({window * exact_page_nbytes / 1e6:.1f} MB) but the "
            f"overlay may use only {OVERLAY_BUDGET_FRACTION:.3f} of the "
            f"{budget / 1e9:.3f} GB host pool; raise --hicache-size/--hicache-ratio "
            "or lower (0 disables) the residual length"
        )
    return slots, -(-(slots * exact_page_nbytes) // row_nbytes)


class ResidualOverlay:
    """A ring of exact page slots: which host page each slot holds, and the backup stamp of
    the row it was copied with (a refilled row no longer carries it)."""

    def __init__(self, buffer: torch.Tensor, page_num: int, window_pages: int):
        # buffer: [slots, parts (MHA: K, V), layers, page_size, heads, head_dim], KV dtype.
        self.buffer = buffer
        self.slots = int(buffer.shape[0])
        self.window_pages = window_pages
        self._slot_of_page = torch.full((page_num,), -1, dtype=torch.int64)
        self._page_of_slot = torch.full((self.slots,), -1, dtype=torch.int64)
        self._slot_stamp = torch.zeros((self.slots,), dtype=torch.int64)
        self._next = 0
        self._lock = threading.Lock()

    def reserve(self, pages: torch.Tensor) -> Optional[Tuple[torch.Tensor, int]]:
        """Reserve ring slots for the window of a backup: (slots, first position) or None."""
        # The entries of the pages about to be rewritten are dropped first.
        with self._lock:
            self._drop_locked(pages)
            w = min(self.window_pages, len(pages), self.slots)
            if w == 0:
                return None
            slots = (self._next + torch.arange(w)) % self.slots
            self._next = int((self._next + w) % self.slots)
            evicted = self._page_of_slot[slots]
            self._slot_of_page[evicted[evicted >= 0]] = -1
            self._page_of_slot[slots] = -1
        return slots, len(pages) - w

    def store(self, slots: torch.Tensor, part: int, layer: int, rows: torch.Tensor) -> None:
        """Copy one layer's rows of a part (MHA: K or V) of the reserved window into its slots."""
        _, _, _, page_size, heads, head_dim = self.buffer.shape
        self.buffer[slots, int(part), layer] = rows.view(-1, page_size, heads, head_dim)

    def publish(self, pages: torch.Tensor, slots: torch.Tensor, stamps: torch.Tensor) -> None:
        """Make the stored window visible to loads, bound to the rows' backup stamps."""
        with self._lock:
            self._page_of_slot[slots] = pages
            self._slot_of_page[pages] = slots
            self._slot_stamp[slots] = stamps

    def load_layer(
        self,
        pages: torch.Tensor,
        row_stamps: Callable[[torch.Tensor], torch.Tensor],
        layer: int,
        write: Callable[..., None],
    ) -> torch.Tensor:
        """Copy out the exact ``layer`` of the pages still held; returns the positions to decode."""
        # write(positions, *parts) (MHA: k, v) runs under the lock, so no backup reuses a slot
        # meanwhile.
        with self._lock:
            slots = self._slot_of_page[pages]
            mapped = slots >= 0
            if bool(mapped.any()):
                # Only while the row still holds the page the copy was made from.
                live = self._slot_stamp[slots.clamp_min(0)] == row_stamps(pages)
                slots = torch.where(mapped & live, slots, torch.full_like(slots, -1))
            exact = (slots >= 0).nonzero().squeeze(1)
            if exact.numel() == 0:
                return torch.arange(len(pages))
            held = slots[exact]
            write(exact, *(self.buffer[held, p, layer] for p in range(self.buffer.shape[1])))
            return (slots < 0).nonzero().squeeze(1)

    def drop(self, pages: torch.Tensor) -> None:
        """Forget the exact copies of ``pages`` (freed, rewritten or refilled)."""
        if pages.numel() == 0:
            return
        with self._lock:
            self._drop_locked(pages)

    def _drop_locked(self, pages: torch.Tensor) -> None:
        """``drop`` with the lock already held."""
        old = self._slot_of_page[pages]
        self._page_of_slot[old[old >= 0]] = -1
        self._slot_of_page[pages] = -1

    def clear(self) -> None:
        """Forget every exact copy."""
        with self._lock:
            self._slot_of_page.fill_(-1)
            self._page_of_slot.fill_(-1)
            self._next = 0

    def pages(self) -> List[int]:
        """Host pages currently served exactly."""
        with self._lock:
            return sorted(int(p) for p in self._page_of_slot[self._page_of_slot >= 0])
