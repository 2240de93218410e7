"""Reading, verifying and publishing the write-once page files of a ``JuiceFSStorage``."""

from __future__ import annotations

import errno
import logging
import os
from typing import List, Optional, Sequence

from .page_file import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    algo_available,
    digest,
    preadv_all,
)

logger = logging.getLogger(__name__)


class PageIOMixin:
    """One page file read into host memory, or a batch published, with its header checked."""

    def _read_page(self, key: str, views: Sequence[memoryview], order: str) -> bool:
        """Read one page into ``views`` and verify it; False (a miss) on any problem."""
        expected = sum(v.nbytes for v in views)
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(key)
            self.counters["get_misses"] += 1
            return False
        except OSError as e:
            self._io_failed(e)
            return self._read_failed(key, f"open: {e}")
        try:
            header, tail = bytearray(HEADER_SIZE), bytearray(1)
            # The extra byte detects files longer than a page.
            got = preadv_all(fd, [memoryview(header), *views, memoryview(tail)], 0)
        except OSError as e:
            self._io_failed(e)
            return self._read_failed(key, f"read: {e}")
        finally:
            os.close(fd)
        # "corrupt" = the file contradicts itself (dropped, see _read_failed); a well-formed
        # page this reader cannot use (other byte order, length or key) is only a miss.
        if got < HEADER_SIZE:
            return self._read_failed(key, f"{got} bytes, shorter than a header", corrupt=True)
        magic, version, algo, length, checksum, tag = HEADER.unpack(header)
        if magic != MAGIC or version != FORMAT_VERSION:
            return self._read_failed(key, "bad header", corrupt=True)
        if length != expected:
            return self._read_failed(key, f"page of {length} bytes, expected {expected}")
        if got != HEADER_SIZE + expected:
            return self._read_failed(
                key,
                f"file of {got}{'+' if got > HEADER_SIZE + expected else ''}"
                f" bytes, header says {HEADER_SIZE + expected}",
                corrupt=True,
            )
        if tag != self._key_tag(key, order):
            return self._read_failed(key, "key tag mismatch (other namespace, key or byte order)")
        if not algo_available(algo):
            return self._read_failed(key, f"checksum algorithm {algo} unavailable")
        if digest(algo, views) != checksum:
            return self._read_failed(key, "checksum mismatch", corrupt=True)
        self._remember(key)
        self._used(key)
        self.counters["get_hits"] += 1
        return True

    def _read_failed(self, key: str, why: str, corrupt: bool = False) -> bool:
        """Count and log a read that is a miss; drop a file that contradicts its header."""
        self._known.pop(key, None)
        self.counters["corrupt" if corrupt else "io_errors"] += 1
        self.counters["get_misses"] += 1
        logger.warning("juicefs backend: page %s is a miss: %s", key, why)
        if corrupt and self.is_writer:
            # Pages are write-once, so a damaged file stays damaged: drop it so a later backup
            # can publish the key again (at worst this drops a good page a racing writer just
            # published, which is a miss, never bad data).
            try:
                os.unlink(self._path(key))
            except OSError:
                pass
        return False

    def _present(self, key: str) -> bool:
        """Write-once: a key whose file exists is not written again."""
        if self._known_present(key):
            return True
        try:
            if os.path.exists(self._path(key)):
                self._remember(key)
                return True
        except OSError:
            pass
        return False

    def _write_batch(
        self, keys: Sequence[str], pages: Sequence[Optional[Sequence[memoryview]]], order: str
    ) -> List[bool]:
        """Publish pages write-once; per key, True when it holds a valid page afterwards."""
        # Capacity is granted in key order and stops at the first page that does not fit: SGLang
        # only ever uses a prefix of a sequence's pages, so pages behind a refused one would waste
        # space.
        present = list(self._executor.map(self._present, keys))
        results = list(present)
        admitted, full = [], False
        for i, (ok, views) in enumerate(zip(present, pages)):
            if ok:
                self.counters["set_existing"] += 1
                self._used(keys[i])  # backed up again: the prefix is in use
            elif views is not None and not full:
                if self._reserve(HEADER_SIZE + sum(v.nbytes for v in views)):
                    admitted.append(i)
                else:
                    full = True
            elif full:
                self.counters["set_refused"] += 1
        done = self._executor.map(lambda i: self._publish_page(keys[i], pages[i], order), admitted)
        for i, ok in zip(admitted, done):
            results[i] = ok
        return results

    def _publish_page(self, key: str, views: Sequence[memoryview], order: str) -> bool:
        """Write one page whose capacity is already reserved (released unless it is new)."""
        size = sum(v.nbytes for v in views)
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.algo,
            size,
            digest(self.algo, views),
            self._key_tag(key, order),
        )
        try:
            if self.mount.unanswering:  # found out during this batch: skip another long wait
                raise OSError(errno.EIO, "volume not answering")
            outcome = self._publisher.publish(self._path(key), [memoryview(header), *views])
        except OSError as e:
            outcome = None
            self._io_failed(e)
            logger.warning("juicefs backend: writing page %s failed: %s", key, e)
        if outcome != "new":
            self._release(HEADER_SIZE + size)
        if outcome is None:
            self.counters["set_errors"] += 1
            return False
        self.counters["set_pages" if outcome == "new" else "set_existing"] += 1
        self._remember(key)
        self._used(key)
        return True

    def _publish_bytes(self, path: str, data: bytes) -> None:
        """Write a small file once (the namespace marker); failures only warn."""
        try:
            if not os.path.exists(path):
                self._publisher.publish(path, [memoryview(data)])
        except OSError as e:
            logger.warning("juicefs backend: could not write %s: %s", path, e)
