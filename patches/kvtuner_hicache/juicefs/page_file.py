"""One page file of the JuiceFS backend: header format, checksums, vectored I/O, write-once
publishing, and byte views of host memory. Format and guarantees: ``docs/juicefs-backend.md``."""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import struct
import uuid
import zlib
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch

try:  # xxh3 is ~10x faster than zlib's crc32; sglang's dependencies (datasets) bring it.
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

logger = logging.getLogger(__name__)

MAGIC = b"KVTJFS"
FORMAT_VERSION = 1
ALGO_CRC32 = 1
ALGO_XXH3 = 2
HEADER = struct.Struct("<6sBBQQQ")  # magic, version, algo, payload len, checksum, key tag
HEADER_SIZE = HEADER.size  # 32
PAGE_SUFFIX = ".kvp"
TMP_PREFIX = ".tmp."

# Payload byte orders: "V" = the pool's get_page_buffer_meta regions in order (v1 path);
# "F" = get_data_page(flat=True) (legacy path). Equal for page-contiguous layouts (checked at
# registration); part of the key tag so a page written in one order never loads in the other.
ORDER_META = "V"
ORDER_FLAT = "F"

_IOV_MAX = 1024


def default_algo() -> int:
    """The checksum this process writes: xxh3 when available, else crc32."""
    return ALGO_XXH3 if xxhash is not None else ALGO_CRC32


def algo_available(algo: int) -> bool:
    """Whether this process can verify a page checksummed with ``algo``."""
    return algo == ALGO_CRC32 or (algo == ALGO_XXH3 and xxhash is not None)


def digest(algo: int, views: Sequence[memoryview]) -> int:
    """The ``algo`` checksum of ``views`` in order."""
    if algo == ALGO_XXH3:
        h = xxhash.xxh3_64()
        for v in views:
            h.update(v)
        return h.intdigest()
    crc = 0
    for v in views:
        crc = zlib.crc32(v, crc)
    return crc


# --------------------------------------------------------------------------- vectored I/O


def _advance(bufs: List[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from ``bufs``."""
    while n and bufs:
        size = bufs[0].nbytes
        if n >= size:
            n -= size
            bufs.pop(0)
        else:
            bufs[0] = bufs[0][n:]
            n = 0


def preadv_all(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Fill ``bufs`` from ``offset``; returns bytes read (less than asked only at end of file)."""
    todo, total = list(bufs), 0
    while todo:
        n = os.preadv(fd, todo[:_IOV_MAX], offset + total)
        if n == 0:
            break
        total += n
        _advance(todo, n)
    return total


def pwritev_all(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Write all of ``bufs`` at ``offset``; returns the bytes written."""
    todo, total = list(bufs), 0
    while todo:
        n = os.pwritev(fd, todo[:_IOV_MAX], offset + total)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        total += n
        _advance(todo, n)
    return total


# --------------------------------------------------------------------------- publishing

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _load_renameat2():
    """glibc's ``renameat2``, or None where the C library lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # old glibc: fall back to link + unlink
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class Publisher:
    """Write-once files: a temporary file next to the target, moved into place without ever
    replacing an existing file (``renameat2(RENAME_NOREPLACE)``, else ``link`` + ``unlink``,
    else ``os.replace``: each fallback is taken once the file system refuses the one before)."""

    def __init__(self, fsync: bool):
        self.fsync = fsync
        self.mode = "renameat2" if _renameat2 is not None else "link"

    def publish(self, path: str, views: Sequence[memoryview]) -> str:
        """Write ``views`` as ``path`` unless it exists: "new" or "exists" (OSError otherwise)."""
        directory = os.path.dirname(path)
        tmp = os.path.join(
            directory, f"{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # first page in this shard (or namespace) on this volume
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        try:
            try:
                total = sum(v.nbytes for v in views)
                if pwritev_all(fd, views, 0) != total:
                    raise OSError(errno.EIO, "short write")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)  # JuiceFS reports upload/flush errors here
            return self._move_into_place(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _move_into_place(self, tmp: str, path: str) -> str:
        """Move ``tmp`` to ``path`` without replacing a file already there."""
        if self.mode == "renameat2":
            if (
                _renameat2(
                    _AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE
                )
                == 0
            ):
                return "new"
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                os.unlink(tmp)
                return "exists"
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise OSError(err, os.strerror(err), path)
            logger.info("juicefs backend: RENAME_NOREPLACE unsupported here; using link+unlink")
            self.mode = "link"
        if self.mode == "link":
            try:
                os.link(tmp, path)
                os.unlink(tmp)
                return "new"
            except FileExistsError:
                os.unlink(tmp)
                return "exists"
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                logger.warning(
                    "juicefs backend: hard links unsupported here; publishing with "
                    "os.replace (a concurrent writer may replace an equal page)"
                )
                self.mode = "replace"
        os.replace(tmp, path)
        return "new"


# --------------------------------------------------------------------------- host memory


def raw_view(ptr: int, size: int) -> memoryview:
    """Writable byte view over host memory the pool owns (zero-copy)."""
    return memoryview((ctypes.c_ubyte * size).from_address(ptr)).cast("B")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Byte view of a contiguous CPU tensor (zero-copy)."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def meta_views(pool, host_indices: torch.Tensor, n: int, page_bytes: int) -> List[List[memoryview]]:
    """Writable byte views of each of ``n`` pages' ``get_page_buffer_meta`` regions."""
    ptrs, sizes = pool.get_page_buffer_meta(host_indices)
    per = len(ptrs) // n if n else 0
    if per == 0 or per * n != len(ptrs) or len(sizes) != len(ptrs):
        raise ValueError(f"{len(ptrs)} buffer regions for {n} pages")
    views = [raw_view(p, s) for p, s in zip(ptrs, sizes)]
    pages = [views[i * per : (i + 1) * per] for i in range(n)]
    if any(sum(v.nbytes for v in page) != page_bytes for page in pages):
        raise ValueError("page regions do not add up to the registered page size")
    return pages


def flat_views(key: str, value: Any, flat_bytes: Optional[int]) -> Optional[List[memoryview]]:
    """Bytes of a flat page tensor (None, logged, when it is not one page)."""
    try:
        data = value.detach().reshape(-1).contiguous().cpu()
    except Exception as e:
        logger.error("juicefs backend: cannot take bytes of page %s: %s", key, e)
        return None
    if data.numel() * data.element_size() != flat_bytes:
        logger.error(
            "juicefs backend: page %s has %d bytes, expected %s",
            key,
            data.numel() * data.element_size(),
            flat_bytes,
        )
        return None
    return [tensor_bytes(data)]  # the view keeps `data` alive


def merge_runs(runs: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Adjacent (address, size) runs merged."""
    merged: List[List[int]] = []
    for start, size in runs:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += size
        else:
            merged.append([start, size])
    return [(a, b) for a, b in merged]


def tensor_runs(t: torch.Tensor, limit: int = 1 << 16) -> Optional[List[Tuple[int, int]]]:
    """Byte runs (address, size) of ``t`` in row-major order, i.e. the bytes flatten() yields."""
    shape, stride, item = list(t.shape), list(t.stride()), t.element_size()
    block, d = 1, len(shape)
    while d and (shape[d - 1] == 1 or stride[d - 1] == block):
        block *= shape[d - 1]
        d -= 1
    count = 1
    for s in shape[:d]:
        count *= s
    if count > limit:
        return None
    base = t.data_ptr()
    runs = [
        (base + sum(i * s for i, s in zip(idx, stride[:d])) * item, block * item)
        for idx in itertools.product(*(range(s) for s in shape[:d]))
    ]
    return merge_runs(runs)


class PageShape(NamedTuple):
    """A host pool's page as bytes: its sizes, the regions v1 reads into, payload byte orders."""

    page_size: int  # tokens
    page_bytes: int  # payload of a page file
    flat_bytes: Optional[int]  # get_data_page(flat=True); None: the pool has no flat pages
    meta_regions: Optional[int]  # regions per page when get_page_buffer_meta works
    flat_template: Optional[Tuple[torch.dtype, int]]  # dtype and numel of a flat page
    v1_order: str
    flat_order: str


def page_shape(pool) -> PageShape:
    """Page bytes and payload byte orders, from the pool's meta regions and flat pages."""
    page_size = int(pool.page_size)
    meta_regions = flat_template = flat_bytes = page_bytes = None
    try:
        template = pool.get_dummy_flat_data_page()
        flat_template = (template.dtype, template.numel())
        flat_bytes = template.numel() * template.element_size()
    except Exception:  # pools without a flat page form only support v1
        pass
    try:
        ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page_size, dtype=torch.int64))
        if ptrs and len(ptrs) == len(sizes):
            meta_regions = len(ptrs)
            page_bytes = int(sum(sizes))
    except Exception as e:  # e.g. pools that only expose flat pages
        logger.info(
            "juicefs backend: %s has no usable get_page_buffer_meta (%s); "
            "v1 I/O goes through flat pages",
            type(pool).__name__,
            e,
        )
    if page_bytes is None and flat_bytes is None:
        raise ValueError(
            f"juicefs backend: host pool {type(pool).__name__} exposes neither "
            "get_page_buffer_meta nor flat data pages"
        )
    flat_order = ORDER_FLAT
    if meta_regions and flat_bytes == page_bytes and _flat_matches_meta(pool, page_size):
        flat_order = ORDER_META
    return PageShape(
        page_size,
        page_bytes if page_bytes is not None else flat_bytes,
        flat_bytes,
        meta_regions,
        flat_template,
        ORDER_META if meta_regions else ORDER_FLAT,
        flat_order,
    )


def _flat_matches_meta(pool, page_size: int) -> bool:
    """True when get_data_page(flat=True) yields the meta regions' bytes in the same order."""
    try:
        view = pool.get_data_page(0, flat=False)
        ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page_size, dtype=torch.int64))
        runs = tensor_runs(view)
        return runs is not None and runs == merge_runs(list(zip(ptrs, sizes)))
    except Exception:
        return False
