"""Fleet-wide LRU eviction of a JuiceFS backend namespace between two watermarks.

Design (docs/juicefs-fleet.md): every server appends the pages it used to its own access log in the
namespace, in batches (no metadata write per read); one server at a time, the holder of a lease
file, lists the namespace, and when usage passes the high watermark deletes the least recently
used pages (latest logged use, else file mtime) down to the low watermark. The namespace's pool
namespaces (v2: ``pool-*/`` inside it) are part of it: a key's KV page and its pools' pages share
a page name, so they are counted, aged and evicted as one.

Under ``<ns>/``::

    .lru/<epoch>/<server>.log   "<unix time> <shard>/<file>" per line, appended by one server
    .lru/checkpoint             the same lines for every surviving page, folded by the evictor
    .evictor.lease              JSON {"owner", "expires"}: who evicts this namespace now
    .usage                      JSON {"bytes", "pages", "time", "owner"}: the last pass's count

Only ``*.kvp`` files in the two-hex-digit shard directories of the namespace and of its pool
namespaces are ever deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .page_file import HEADER_SIZE, PAGE_SUFFIX, TMP_PREFIX
from .volume import NAMESPACE_MARKER, POOL_DIR_PREFIX

logger = logging.getLogger(__name__)

LRU_DIR = ".lru"
CHECKPOINT = "checkpoint"
LEASE = ".evictor.lease"
USAGE = ".usage"
# A server only appends to the current epoch, so epochs two behind are closed for good.
EPOCH_SECONDS = 600
# Deletions between two checks that this server still holds the lease.
_EVICT_CHUNK = 64


def server_id() -> str:
    """Unique per backend instance; readable in logs and file names."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    return f"{host or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _is_shard(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _write_replace(path: str, data: bytes) -> None:
    """Replace ``path`` atomically: readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp.{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read() or b"null")
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _parse_lines(data: bytes, into: Dict[str, float]) -> None:
    """Merge "<time> <name>" lines, keeping each name's latest time (torn lines are skipped)."""
    for line in data.split(b"\n"):
        t, _, name = line.partition(b" ")
        if not name:
            continue
        try:
            when = float(t)
        except ValueError:
            continue
        key = name.decode("utf-8", "replace")
        if when > into.get(key, -1.0):
            into[key] = when


@dataclass
class PassResult:
    """What one eviction pass saw and did."""

    pages: int = 0  # page files found
    usage_before: int = 0
    evicted_pages: int = 0
    evicted_bytes: int = 0
    usage_after: int = 0
    folded_epochs: int = 0
    seconds: float = 0.0


class NamespaceEvictor:
    """Access logging, the evictor lease and eviction passes for one namespace directory."""

    def __init__(
        self,
        ns_dir: str,
        page_file_bytes: int,
        capacity: int,
        high: float,
        low: float,
        executor: Executor,
        *,
        resolution: float = 60.0,
        lease_seconds: float = 30.0,
        stale_tmp_age: float = 3600.0,
    ):
        self.ns_dir = ns_dir
        self.page_file_bytes = page_file_bytes
        self.capacity = capacity
        self.high_bytes = int(capacity * high)
        self.low_bytes = int(capacity * low)
        self.executor = executor
        self.resolution = resolution
        self.lease_seconds = lease_seconds
        self.stale_tmp_age = stale_tmp_age
        self.epoch_seconds = EPOCH_SECONDS
        self.owner = server_id()
        self.lru_dir = os.path.join(ns_dir, LRU_DIR)
        self.lease_path = os.path.join(ns_dir, LEASE)
        self.usage_path = os.path.join(ns_dir, USAGE)
        self._lock = threading.Lock()
        self._lease_expires = 0.0  # expiry of the lease this server last wrote
        self.last_error: Optional[OSError] = None  # of the last failed flush
        self._pending: List[bytes] = []
        self._logged: Dict[str, float] = {}  # name -> when this server last logged it
        self._pool_file_bytes: Dict[str, int] = {}  # pool namespace directory name -> bytes

    # ---------------------------------------------------------------- access log

    def note(self, name: str) -> None:
        """Record that this server used page ``name`` (``<shard>/<file>``); memory only."""
        now = time.time()
        with self._lock:
            last = self._logged.get(name)
            if last is not None and now - last < self.resolution:
                return
            if len(self._logged) > 1_000_000:  # bound memory; worst case a few more lines
                self._logged.clear()
            self._logged[name] = now
            self._pending.append(b"%.3f %s\n" % (now, name.encode("utf-8", "surrogatepass")))

    def flush(self) -> bool:
        """Append the pending records to this server's log of the current epoch."""
        with self._lock:
            lines, self._pending = self._pending, []
        if not lines:
            return True
        epoch_dir = os.path.join(self.lru_dir, str(int(time.time() // self.epoch_seconds)))
        path = os.path.join(epoch_dir, f"{self.owner}.log")
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                os.makedirs(epoch_dir, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, b"".join(lines))
            finally:
                os.close(fd)
            return True
        except OSError as e:
            self.last_error = e
            with self._lock:  # keep them for the next flush (bounded: drop the oldest)
                self._pending = (lines + self._pending)[-100_000:]
            logger.warning("juicefs backend: access log flush to %s failed: %s", path, e)
            return False

    # ---------------------------------------------------------------- lease

    def _lease_state(self) -> Tuple[Optional[str], float]:
        """(owner, expiry) of the lease file; (None, 0) when there is none."""
        info = _read_json(self.lease_path)
        if info is not None:
            return str(info.get("owner")), float(info.get("expires", 0.0))
        try:  # being written, or garbage: count it live for a lease length from its mtime
            return "", os.stat(self.lease_path).st_mtime + self.lease_seconds
        except OSError:
            return None, 0.0

    def _lease_body(self) -> bytes:
        self._lease_expires = time.time() + self.lease_seconds
        return json.dumps({"owner": self.owner, "expires": self._lease_expires}).encode()

    def _create_lease(self) -> bool:
        try:
            fd = os.open(
                self.lease_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
        except FileExistsError:
            return False
        try:
            os.write(fd, self._lease_body())
        finally:
            os.close(fd)
        return True

    def hold_lease(self) -> bool:
        """Take or renew the evictor lease; True while this server holds it."""
        try:
            owner, expires = self._lease_state()
            # Renew only a lease that has not expired by this server's own account: another
            # mount's kernel caches may still show our file after a takeover replaced it.
            if owner == self.owner and time.time() < self._lease_expires:
                _write_replace(self.lease_path, self._lease_body())
                return True
            if owner is None:
                return self._create_lease()
            if time.time() < expires:
                return False
            # Expired: move it aside (one rename of a name succeeds once), then make sure it was
            # the expired one and not a renewal that landed in between.
            stale = f"{self.lease_path}.{self.owner}.stale"
            try:
                os.rename(self.lease_path, stale)
            except FileNotFoundError:
                return False
            info = _read_json(stale)
            if info is not None and time.time() < float(info.get("expires", 0.0)):
                try:
                    os.link(stale, self.lease_path)  # give the live lease back (if still free)
                except OSError:
                    pass
                os.unlink(stale)
                return False
            os.unlink(stale)
            logger.info(
                "juicefs backend: taking over the expired evictor lease of %s in %s",
                owner,
                self.ns_dir,
            )
            return self._create_lease()
        except OSError as e:
            logger.warning("juicefs backend: evictor lease %s: %s", self.lease_path, e)
            return False

    def still_holds_lease(self) -> bool:
        return time.time() < self._lease_expires and self._lease_state()[0] == self.owner

    def release_lease(self) -> None:
        try:
            if self.still_holds_lease():
                os.unlink(self.lease_path)
                self._lease_expires = 0.0
        except OSError:
            pass

    # ---------------------------------------------------------------- usage

    def read_usage(self) -> Optional[dict]:
        """The usage the last eviction pass published (any server's)."""
        return _read_json(self.usage_path)

    def _publish_usage(self, usage: int, pages: int) -> None:
        try:
            _write_replace(
                self.usage_path,
                json.dumps(
                    {
                        "bytes": usage,
                        "pages": pages,
                        "time": time.time(),
                        "owner": self.owner,
                    }
                ).encode(),
            )
        except OSError as e:
            logger.warning("juicefs backend: could not publish usage: %s", e)

    # ---------------------------------------------------------------- passes

    def namespaces(self) -> List[Tuple[str, int]]:
        """(directory, page file bytes) of the KV namespace and of every pool namespace inside
        it (v2: the pools of every server sharing the namespace, whoever registered them)."""
        found = [(self.ns_dir, self.page_file_bytes)]
        try:
            names = sorted(n for n in os.listdir(self.ns_dir) if n.startswith(POOL_DIR_PREFIX))
        except FileNotFoundError:
            return found
        for name in names:
            directory = os.path.join(self.ns_dir, name)
            if name not in self._pool_file_bytes:
                fields = _read_json(os.path.join(directory, NAMESPACE_MARKER)) or {}
                if not isinstance(fields.get("page_bytes"), int):
                    logger.warning(
                        "juicefs backend: pool namespace %s has no readable %s; its pages are "
                        "not counted or evicted this pass",
                        directory,
                        NAMESPACE_MARKER,
                    )
                    continue
                # Every page file of a pool namespace has its size (the marker's page bytes).
                self._pool_file_bytes[name] = HEADER_SIZE + fields["page_bytes"]
            found.append((directory, self._pool_file_bytes[name]))
        return found

    def _list_shard(self, directory: str) -> List[str]:
        """Page names of one shard directory; sweeps stale temporaries on the way."""
        shard, names, now = os.path.basename(directory), [], time.time()
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.name.endswith(PAGE_SUFFIX) and not entry.name.startswith("."):
                        names.append(f"{shard}/{entry.name}")
                    elif entry.name.startswith(TMP_PREFIX):
                        try:
                            if (
                                now - entry.stat(follow_symlinks=False).st_mtime
                                > self.stale_tmp_age
                            ):
                                os.unlink(entry.path)
                        except OSError:
                            pass
        except (FileNotFoundError, NotADirectoryError):
            pass
        return names

    def list_pages(self, namespaces: List[Tuple[str, int]]) -> Dict[str, List[int]]:
        """Page names (``<shard>/<file>``) found, each with the indices in ``namespaces`` of
        the namespaces holding a file of that name (a key's KV page and its pools' pages)."""
        shards = []
        for i, (directory, _) in enumerate(namespaces):
            try:
                shards += [(i, os.path.join(directory, s)) for s in os.listdir(directory)]
            except FileNotFoundError:
                continue
        shards = [(i, d) for i, d in shards if _is_shard(os.path.basename(d))]
        pages: Dict[str, List[int]] = {}
        listed = self.executor.map(self._list_shard, [d for _, d in shards])
        for (i, _), names in zip(shards, listed):
            for name in names:
                pages.setdefault(name, []).append(i)
        return pages

    def _epochs(self) -> List[int]:
        try:
            return sorted(int(d) for d in os.listdir(self.lru_dir) if d.isdigit())
        except FileNotFoundError:
            return []

    def _closed_epochs(self, epochs: List[int]) -> List[int]:
        current = int(time.time() // self.epoch_seconds)
        return [e for e in epochs if e <= current - 2]

    def load_recency(self, epochs: List[int]) -> Dict[str, float]:
        """Latest logged use per page name: the checkpoint, then every epoch's logs."""
        recency: Dict[str, float] = {}
        files = [os.path.join(self.lru_dir, CHECKPOINT)]
        for e in epochs:
            directory = os.path.join(self.lru_dir, str(e))
            try:
                files += [
                    os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".log")
                ]
            except FileNotFoundError:
                continue

        def read(path: str) -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                return b""

        for data in self.executor.map(read, files):
            _parse_lines(data, recency)
        return recency

    @staticmethod
    def _mtime(path: str) -> Optional[float]:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None

    @staticmethod
    def _unlink(path: str) -> str:
        """Outcome: evicted; gone (deleted by someone else meanwhile); kept (an error)."""
        try:
            os.unlink(path)
            return "evicted"
        except FileNotFoundError:  # a corrupt-page drop, clear(), a second evictor
            return "gone"
        except OSError as e:
            logger.warning("juicefs backend: evicting %s failed: %s", path, e)
            return "kept"

    def run_pass(self) -> PassResult:
        """List, and when above the high watermark evict LRU pages down to the low one. A page
        name is one unit: a key's KV page and its pools' pages count, age and go together."""
        start = time.monotonic()
        spaces = self.namespaces()
        pages = self.list_pages(spaces)

        def nbytes(name: str) -> int:
            return sum(spaces[i][1] for i in pages[name])

        files = sum(len(held) for held in pages.values())
        usage = sum(nbytes(n) for n in pages)
        result = PassResult(pages=files, usage_before=usage, usage_after=usage)
        epochs = self._epochs()
        closed = self._closed_epochs(epochs)
        if usage <= self.high_bytes and len(closed) < 2:
            self._publish_usage(usage, files)
            result.seconds = time.monotonic() - start
            return result

        recency = self.load_recency(epochs)
        unknown = [n for n in pages if n not in recency]
        first_files = [os.path.join(spaces[pages[n][0]][0], n) for n in unknown]
        for name, mtime in zip(unknown, self.executor.map(self._mtime, first_files)):
            if mtime is not None:
                recency[name] = mtime
        live = [n for n in pages if n in recency]
        live.sort(key=lambda n: recency[n])
        usage = sum(nbytes(n) for n in live)

        if usage > self.high_bytes:
            victims, freed = [], 0
            for name in live:
                if usage - freed <= self.low_bytes:
                    break
                victims.append(name)
                freed += nbytes(name)
            for c in range(0, len(victims), _EVICT_CHUNK):
                if c and not self.still_holds_lease():
                    logger.warning(
                        "juicefs backend: lost the evictor lease mid-pass in %s", self.ns_dir
                    )
                    break
                doomed = [(n, i) for n in victims[c : c + _EVICT_CHUNK] for i in pages[n]]
                paths = [os.path.join(spaces[i][0], n) for n, i in doomed]
                for (name, i), outcome in zip(doomed, self.executor.map(self._unlink, paths)):
                    if outcome == "evicted":
                        result.evicted_pages += 1
                        result.evicted_bytes += spaces[i][1]
                    if outcome != "kept":
                        pages[name] = [j for j in pages[name] if j != i]
            live = [n for n in live if pages[n]]
            files = sum(len(pages[n]) for n in live)
            usage = sum(nbytes(n) for n in live)
        result.usage_after = usage
        self._publish_usage(usage, files)
        if closed:
            result.folded_epochs = self._fold(live, recency, closed)
        result.seconds = time.monotonic() - start
        if result.evicted_pages:
            logger.info(
                "juicefs backend: evicted %d pages (%d bytes) from %s: usage %d -> %d "
                "of %d bytes in %.2f s",
                result.evicted_pages,
                result.evicted_bytes,
                self.ns_dir,
                result.usage_before,
                usage,
                self.capacity,
                result.seconds,
            )
        return result

    def _fold(self, live: List[str], recency: Dict[str, float], closed: List[int]) -> int:
        """Write the recency of surviving pages to the checkpoint, then drop closed epochs."""
        body = b"".join(
            b"%.3f %s\n" % (recency[n], n.encode("utf-8", "surrogatepass")) for n in live
        )
        try:
            os.makedirs(self.lru_dir, exist_ok=True)
            _write_replace(os.path.join(self.lru_dir, CHECKPOINT), body)
        except OSError as e:
            logger.warning("juicefs backend: could not write the LRU checkpoint: %s", e)
            return 0
        for e in closed:
            shutil.rmtree(os.path.join(self.lru_dir, str(e)), ignore_errors=True)
        return len(closed)
