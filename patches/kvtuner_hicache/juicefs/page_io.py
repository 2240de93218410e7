"""Reading and verifying one write-once page file, and publishing one: plain functions over a
path and byte views, whose outcome the backend acts on (counters, presence, capacity)."""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional, Sequence

from .page_file import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    Publisher,
    algo_available,
    digest,
    preadv_all,
)

logger = logging.getLogger(__name__)


class PageRead(NamedTuple):
    """What reading a page file found: ``why`` is None for a verified page, else the miss."""

    why: Optional[str] = None
    # The file contradicts itself: pages are write-once, so it stays damaged.
    corrupt: bool = False
    error: Optional[OSError] = None  # the I/O error behind the miss, for the volume watch
    missing: bool = False  # no file at all: never written, or evicted


VERIFIED = PageRead()


def read_page(path: str, views: Sequence[memoryview], tag: int) -> PageRead:
    """Read the page file at ``path`` into ``views`` and check it against its header and ``tag``."""
    expected = sum(v.nbytes for v in views)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return PageRead("no file", missing=True)
    except OSError as e:
        return PageRead(f"open: {e}", error=e)
    try:
        header, tail = bytearray(HEADER_SIZE), bytearray(1)
        # The extra byte detects files longer than a page.
        got = preadv_all(fd, [memoryview(header), *views, memoryview(tail)], 0)
    except OSError as e:
        return PageRead(f"read: {e}", error=e)
    finally:
        os.close(fd)
    # "corrupt" = the file contradicts itself (the backend drops it); a well-formed page this
    # reader cannot use (other byte order, length or key) is only a miss.
    if got < HEADER_SIZE:
        return PageRead(f"{got} bytes, shorter than a header", corrupt=True)
    magic, version, algo, length, checksum, file_tag = HEADER.unpack(header)
    if magic != MAGIC or version != FORMAT_VERSION:
        return PageRead("bad header", corrupt=True)
    if length != expected:
        return PageRead(f"page of {length} bytes, expected {expected}")
    if got != HEADER_SIZE + expected:
        return PageRead(
            f"file of {got}{'+' if got > HEADER_SIZE + expected else ''}"
            f" bytes, header says {HEADER_SIZE + expected}",
            corrupt=True,
        )
    if file_tag != tag:
        return PageRead("key tag mismatch (other namespace, key or byte order)")
    if not algo_available(algo):
        return PageRead(f"checksum algorithm {algo} unavailable")
    if digest(algo, views) != checksum:
        return PageRead("checksum mismatch", corrupt=True)
    return VERIFIED


def publish_page(
    publisher: Publisher, path: str, views: Sequence[memoryview], algo: int, tag: int
) -> str:
    """Write one page file under its header once: "new", or "exists" when a writer beat us."""
    size = sum(v.nbytes for v in views)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, algo, size, digest(algo, views), tag)
    return publisher.publish(path, [memoryview(header), *views])


def publish_once(publisher: Publisher, path: str, data: bytes) -> None:
    """Write a small file once (the namespace marker); failures only warn."""
    try:
        if not os.path.exists(path):
            publisher.publish(path, [memoryview(data)])
    except OSError as e:
        logger.warning("juicefs backend: could not write %s: %s", path, e)
