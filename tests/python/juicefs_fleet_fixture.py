"""Pytest fixtures for a JuiceFS fleet: a real Redis server as the metadata engine and one
volume mounted several times, each mount standing for one SGLang server.

    from juicefs_fleet_fixture import fleet, make_fleet

Redis is Debian's ``redis-server`` (installed with apt-get when absent and this user is root),
started by the fixture on a free loopback port with ``maxmemory-policy noeviction`` (what
JuiceFS requires) and an append-only file, so a stopped server comes back with its metadata.
Everything is stopped by PID and unmounted afterwards, pass or fail. Where FUSE or Redis cannot
work here the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from juicefs_fixture import (
    MOUNT_OPTIONS,
    _fuse_unavailable,
    destroyed_after,
    each_destroyed_after,
    is_juicefs_mount,
    juicefs_binary,
    mount_juicefs,
    storage_config,
    unmount_juicefs,
)


def redis_server_binary() -> str:
    """Debian's redis-server; installed with apt-get when absent (root only), else skip."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"redis-server could not be installed: {proc.stderr.strip()[-400:]}")
    found = shutil.which("redis-server")
    if not found:
        pytest.skip("redis-server still missing after apt-get install")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1, owned (and stopped) by the test."""

    binary: str
    workdir: Path
    port: int = 0
    proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/1"

    def start(self) -> None:
        if self.proc is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the free port may be taken between probe and bind
            port = self.port or free_port()
            proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--protected-mode",
                    "yes",
                    "--dir",
                    str(self.workdir),
                    "--maxmemory-policy",
                    "noeviction",
                    "--save",
                    "",
                    # The append-only file brings the metadata back after stop() / start().
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--logfile",
                    str(self.workdir / "redis.log"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if redis_ping(port):
                    self.port, self.proc = port, proc
                    return
                time.sleep(0.05)
            proc.kill()
            proc.wait()
        log = self.workdir / "redis.log"
        raise RuntimeError(
            f"redis-server did not start: {log.read_text()[-600:] if log.exists() else ''}"
        )

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: the append-only file is flushed); same port on restart."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass
class Mount:
    """One FUSE mount of the fleet's volume: one server's view."""

    binary: str
    meta: str
    path: str
    cache: str
    log: str
    options: List[str] = field(default_factory=list)

    def mount(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        mount_juicefs(self.binary, self.meta, self.path, self.cache, self.log, self.options)

    def umount(self) -> None:
        unmount_juicefs(self.binary, self.path)
        if is_juicefs_mount(self.path):  # last resort: lazy kernel unmount
            self.lazy_umount()

    def lazy_umount(self) -> None:
        """``umount -l``: the mount point is detached at once; its daemon exits when idle."""
        subprocess.run(["umount", "-l", self.path], capture_output=True, timeout=60)
        for _ in range(50):
            if not is_juicefs_mount(self.path):
                break
            time.sleep(0.1)


@dataclass
class Fleet:
    """A JuiceFS volume on Redis metadata, mounted once per server."""

    binary: str
    base: Path
    redis: RedisServer
    mounts: List[Mount] = field(default_factory=list)

    @property
    def mnts(self) -> List[str]:
        return [m.path for m in self.mounts]

    def destroy(self) -> None:
        for m in self.mounts:
            try:
                m.umount()
            except Exception:  # keep going: the rest must still be unmounted
                m.lazy_umount()
        self.redis.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def create_fleet(
    name: str = "kvfleet", servers: int = 2, options: Optional[List[str]] = None
) -> Fleet:
    """Start Redis, format a volume on it (trash off) and mount it ``servers`` times."""
    reason = _fuse_unavailable()
    if reason:
        pytest.skip(reason)
    binary = juicefs_binary()
    redis_bin = redis_server_binary()
    base = Path(tempfile.mkdtemp(prefix="kvtuner-jfsfleet-"))
    fleet = Fleet(binary, base, RedisServer(redis_bin, base / "redis"))
    try:
        fleet.redis.start()
        proc = subprocess.run(
            [
                binary,
                "format",
                "--storage",
                "file",
                "--bucket",
                f"{base}/bucket/",
                "--trash-days",
                "0",
                fleet.redis.url,
                name,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"juicefs format failed: {proc.stderr.strip()[-600:]}")
        for i in range(servers):
            server = chr(ord("a") + i)
            fleet.mounts.append(
                Mount(
                    binary,
                    fleet.redis.url,
                    str(base / f"mnt-{server}"),
                    str(base / f"cache-{server}"),
                    str(base / f"{server}.log"),
                    list(options if options is not None else MOUNT_OPTIONS),
                )
            )
            fleet.mounts[-1].mount()
    except RuntimeError as e:
        fleet.destroy()
        if "mount failed" in str(e):
            pytest.skip(f"FUSE unavailable: {e}")
        raise
    except BaseException:
        fleet.destroy()
        raise
    return fleet


@pytest.fixture(scope="session")
def fleet():
    """Two servers' mounts of one Redis-backed volume for the session; tests use their own
    root_dir. Destroyed afterwards, pass, fail or SIGTERM."""
    yield from destroyed_after(lambda: create_fleet("kvfleet", 2))


@pytest.fixture
def make_fleet():
    """Factory for private fleets (tests that stop Redis or unmount); destroyed after the test."""
    yield from each_destroyed_after(
        lambda name="kvprivfleet", servers=2, options=None: create_fleet(name, servers, options)
    )


# --------------------------------------------------------------------------- pages


def fleet_server(mount, pool, root_dir: str, **options):
    """One server's ``JuiceFSStorage`` on its own mount, registered with its host pool (the
    ``dynamic`` construction form)."""
    from kvtuner_hicache.juicefs import JuiceFSStorage  # patches/ is on sys.path (pytest.ini)

    backend = JuiceFSStorage(storage_config(mount, root_dir=root_dir, **options), {})
    backend.register_mem_pool_host(pool)
    return backend


def fill_random(pool, seed: int = 0) -> None:
    """Random bytes in every host page of ``pool``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def page_bytes(pool, page: int) -> bytes:
    import torch

    flat = pool.get_data_page(page * pool.page_size, flat=True)
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def indices(pool, pages):
    """Host token indices of whole pages, the shape batch_get_v1 / batch_set_v1 take."""
    import torch

    ps = pool.page_size
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages])


def keys_for(prefix: str, n: int) -> List[str]:
    """Page keys shaped like SGLang's (SHA-256 hex)."""
    import hashlib

    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]
