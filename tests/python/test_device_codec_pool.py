"""The quantizing host pool with the device codec against the host codec.

SGLang's real ``MHATokenToKVPool`` on CPU stands for the GPU pool; the device codec's
Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below), which
``--kvtuner-hicache-codec device`` accepts on CPU for tests. Both codecs back up the
same scattered pages: stored bytes, overlay pages and loads must be identical, pages
written by one codec must load through the other, and the device path must never
synchronize with the host.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from conftest import cpu_device_pool, host_pool_args, quantizing_config

# Before Triton decorates the kernels: run them in the interpreter, on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


POOL_PAGE, POOL_HEADS, POOL_HEAD_DIM, POOL_LAYERS = 16, 2, 32, 2
# Pool grid: every bits value, both symmetries, every axis pair, both dtypes, the
# residual overlay on and off, a per-layer preset.
POOL_CASES = [
    dict(dtype=torch.float16, nbits_key=4, nbits_value=2, asym=True, residual_length=0),
    dict(
        dtype=torch.bfloat16,
        nbits_key=8,
        nbits_value=4,
        asym=False,
        axis_key=0,
        residual_length=POOL_PAGE,
    ),
    dict(
        dtype=torch.float16,
        nbits_key=2,
        nbits_value=8,
        asym=False,
        axis_value=1,
        residual_length=2 * POOL_PAGE,
    ),
    dict(
        dtype=torch.bfloat16,
        asym=True,
        layer_bits=((0, (8, 2)), (1, (2, 4))),
        residual_length=POOL_PAGE,
    ),
]


def pool_cfg(kvh, codec, **over):
    """The suites' quantizing config with group 8 and the given codec."""
    over = {k: v for k, v in over.items() if k != "dtype"}
    return quantizing_config(kvh.config, group_size=8, codec=codec, **over)


def make_device_pool(dtype, seed=0):
    pool = cpu_device_pool(
        size=16 * POOL_PAGE,
        page_size=POOL_PAGE,
        heads=POOL_HEADS,
        head_dim=POOL_HEAD_DIM,
        layers=POOL_LAYERS,
        dtype=dtype,
    )
    g = torch.Generator().manual_seed(seed)
    for b in (*pool.k_buffer, *pool.v_buffer):
        x = torch.randn(b.shape, generator=g) * 2.0
        x[:, :, 3] *= 12.0
        x[5] = 0.5
        b.copy_(x.to(dtype))
    return pool


def make_host_pool(kvh, dev, cfg):
    source, geometry = host_pool_args(dev)
    return kvh.host_pool.KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        0.004,
        POOL_PAGE,
        "page_first",
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
    )


def stored_bytes(host, hidx) -> torch.Tensor:
    """Every byte a backup defines: the page header without its stamp, the blobs and the
    sink sections."""
    lay = host.kvtuner_layout
    pages = hidx[::POOL_PAGE] // POOL_PAGE
    rows = host.kv_buffer[pages]
    spans = [rows[:, :48], rows[:, 56:64]]
    for offs, sizes in ((lay.k_offsets, lay.k_nbytes), (lay.v_offsets, lay.v_nbytes)):
        spans += [rows[:, off : off + n] for off, n in zip(offs, sizes)]
    spans += [rows[:, off : off + lay.sink_nbytes] for off in lay.sink_offsets]
    return torch.cat(spans, dim=1)


def load_all(host, dev, hidx, didx):
    load = getattr(host, "load_to_device_per_layer_physical", host.load_to_device_per_layer)
    for layer in range(POOL_LAYERS):
        load(dev, hidx, didx, layer, "kernel")
    return [b[didx].view(torch.int16).clone() for b in (*dev.k_buffer, *dev.v_buffer)]


# Unsorted, non-contiguous pages of device rows; the backup writes 4 pages.
BACKUP_ROWS = torch.cat(
    [
        torch.arange(9 * POOL_PAGE, 10 * POOL_PAGE),
        torch.arange(POOL_PAGE, 2 * POOL_PAGE),
        torch.arange(5 * POOL_PAGE, 7 * POOL_PAGE),
    ]
)
LOAD_ROWS = torch.cat(
    [
        torch.arange(12 * POOL_PAGE, 13 * POOL_PAGE),
        torch.arange(3 * POOL_PAGE, 4 * POOL_PAGE),
        torch.arange(14 * POOL_PAGE, 15 * POOL_PAGE),
        torch.arange(0, POOL_PAGE),
    ]
)


def host_indices(host):
    """Four pages of the pool in a scattered order (not what alloc hands out)."""
    host.alloc(8 * POOL_PAGE)  # claim pages, then use some of them out of order
    pages = torch.tensor([6, 1, 4, 2])
    return (pages[:, None] * POOL_PAGE + torch.arange(POOL_PAGE)).reshape(-1)


def assert_sink_exact(loads, dev, sink):
    """The first sink tokens of every loaded page are the backed-up device rows, bit for bit."""
    backed_up = BACKUP_ROWS.view(-1, POOL_PAGE)[:, :sink]
    for loaded, buf in zip(loads, (*dev.k_buffer, *dev.v_buffer)):
        want = buf[backed_up.reshape(-1)].view(torch.int16)
        got = loaded.view(-1, POOL_PAGE, POOL_HEADS, POOL_HEAD_DIM)[:, :sink]
        assert torch.equal(got.reshape(want.shape), want)


def _case_id(case) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items() if k != "layer_bits")


# The default sink (1 token) on the whole grid; none and several on two cases, overlay
# off and on.
SINK_CASES = [(case, None) for case in POOL_CASES] + [
    (case, sink) for sink in (0, 3) for case in (POOL_CASES[0], POOL_CASES[1])
]


@pytest.mark.parametrize(
    "case,sink",
    SINK_CASES,
    ids=[f"{_case_id(c)},sink={'default' if s is None else s}" for c, s in SINK_CASES],
)
def test_pool_device_codec_equals_host_codec(kvh, kq, case, sink):
    """Same stored bytes, same loads (overlay included), exact sink tokens, and pages
    written by one codec load through the other."""
    dtype = case["dtype"]
    dev = make_device_pool(dtype)
    if sink is not None:
        case = dict(case, sink_tokens=sink)
    pools = {
        codec: make_host_pool(kvh, dev, pool_cfg(kvh, codec, **case))
        for codec in ("device", "host")
    }
    sink = pools["device"].kvtuner_layout.sink_tokens
    assert sink == case.get("sink_tokens", 1)  # the config default keeps one token
    assert pools["device"].kvtuner_codec == "device"
    assert pools["host"].kvtuner_codec == "host"
    hidx = {codec: host_indices(pool) for codec, pool in pools.items()}
    for codec, pool in pools.items():
        pool.backup_from_device_all_layer(dev, hidx[codec], BACKUP_ROWS, "kernel")
    assert torch.equal(
        stored_bytes(pools["device"], hidx["device"]), stored_bytes(pools["host"], hidx["host"])
    )
    assert pools["device"].kvtuner_overlay_pages() == pools["host"].kvtuner_overlay_pages()

    loads = {codec: load_all(pool, dev, hidx[codec], LOAD_ROWS) for codec, pool in pools.items()}
    for a, b in zip(loads["device"], loads["host"]):
        assert torch.equal(a, b)
    assert_sink_exact(loads["device"], dev, sink)
    if case["residual_length"]:  # the window pages came back exact
        window = -POOL_PAGE
        exact = dev.k_buffer[0][BACKUP_ROWS[window:]].view(torch.int16)
        assert torch.equal(loads["device"][0][window:], exact)

    # Cross-codec: each pool's stored page through the other pool's storage path.
    for src, dst in (("device", "host"), ("host", "device")):
        for i in range(0, len(hidx[src]), POOL_PAGE):
            page = pools[src].get_data_page(int(hidx[src][i])).clone()
            pools[dst].set_from_flat_data_page(int(hidx[dst][i]), page)
    cross = {codec: load_all(pool, dev, hidx[codec], LOAD_ROWS) for codec, pool in pools.items()}
    for a, b in zip(cross["device"], cross["host"]):
        assert torch.equal(a, b)


def test_auto_codec_keeps_cpu_pools_on_the_host_codec(kvh, kq):
    dev = make_device_pool(torch.float16)
    host = make_host_pool(kvh, dev, pool_cfg(kvh, "auto"))
    assert host.kvtuner_codec == "host"
    with pytest.raises(ValueError, match="codec"):
        make_host_pool(kvh, dev, pool_cfg(kvh, "gpu"))


_SYNC_METHODS = ("cpu", "numpy", "item", "tolist", "__bool__", "__int__", "__float__")


def _from_package(depth: int = 2) -> bool:
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name.startswith(("kvtuner_hicache", "sglang.srt.mem_cache.kvtuner_hicache"))


@contextlib.contextmanager
def host_syncs_raise(monkeypatch):
    """Inside: every host-synchronizing call the package's own code makes raises (Triton's
    interpreter itself runs on the host and may); yields the names of those seen."""
    seen = []

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            if _from_package():
                seen.append(name)
                raise AssertionError(f"host sync in the device codec path: Tensor.{name}")
            return original(self, *args, **kwargs)

        return wrapper

    def guarded_to(original):
        def to(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if _from_package() and out.device != self.device and not kwargs.get("non_blocking"):
                raise AssertionError(f"blocking copy {self.device} -> {out.device}")
            return out

        return to

    def no_sync(*args, **kwargs):
        if _from_package():
            raise AssertionError("synchronize() in the device codec path")

    with monkeypatch.context() as m:
        for name in _SYNC_METHODS:
            m.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        m.setattr(torch.Tensor, "to", guarded_to(torch.Tensor.to))
        m.setattr(torch.cuda, "synchronize", no_sync)
        yield seen


def test_device_codec_never_syncs(kvh, kq, monkeypatch):
    """Backup and load with every host-synchronizing call raising when the pool's
    own code makes it."""
    dev = make_device_pool(torch.bfloat16)
    host = make_host_pool(kvh, dev, pool_cfg(kvh, "device", residual_length=2 * POOL_PAGE))
    hidx = host_indices(host)
    with host_syncs_raise(monkeypatch) as seen:
        host.backup_from_device_all_layer(dev, hidx, BACKUP_ROWS, "kernel")
        for layer in range(POOL_LAYERS):
            host.load_to_device_per_layer(dev, hidx, LOAD_ROWS, layer, "kernel")
    assert seen == []
    # The guard is live: the same calls from the package raise.
    with host_syncs_raise(monkeypatch), pytest.raises(AssertionError, match="tolist"):
        host.kvtuner_overlay_pages()
