"""A real ``python -m sglang.launch_server`` on SGLang's CPU engine, started and stopped by the
caller: the live-server tests (``tests/python/test_live_server.py``), the demo of
``scripts/setup-and-run.sh`` and ``benches/live_hit_rate.py`` use it.

What the CPU engine needs (SGLang 0.5.23, facts found by running it):
- ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's ``is_cpu()`` reads only this), ``--device cpu``,
  ``--attention-backend torch_native``; HiCache with ``--hicache-io-backend direct`` and
  ``--hicache-mem-layout page_first_direct`` (the GPU defaults ``kernel`` + ``page_first``
  cannot work on CPU); pages of more than one token only from 0.5.22: older releases' paged
  allocator has only Triton kernels (``alloc_extend_kernel``), which the CPU engine cannot
  launch ("0 active drivers"), so they serve with ``--page-size 1``;
- the venv's ``bin/`` on ``PATH`` (HiCache's key hash is a C++ extension built with ninja and
  g++ on first use) and a writable ``TORCH_EXTENSIONS_DIR``, cached with the other caches, one
  per tree: the build names its sources by absolute path, so two trees sharing one directory
  rebuild it in turn. ``LiveServer.start`` builds it before the server starts: built on a
  request instead (15-20 s on 2 cores), it outlasts the storage prefetch's timeout and that
  request's storage hit is lost;
- ``sgl_kernel``: the stand-in in ``tests/live/sgl_kernel_standin`` (see its docstring);
- the stock host pool also needs ``tests/live/stock_pool_cpu`` (``stock_pool=True``); the
  quantizing pool runs without it;
- a DeepSeek (MLA) model needs ``tests/live/mla_cpu_attention`` (``mla_attention=True``):
  with ``torch_native`` SGLang's DeepSeek attention otherwise sends prefills down an MHA path
  that backend cannot serve (see its docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

LIVE = Path(__file__).resolve().parent
ROOT = LIVE.parents[1]
TEXTS = ROOT / "benches" / "texts"
SGL_KERNEL_STANDIN = LIVE / "sgl_kernel_standin"
STOCK_POOL_CPU = LIVE / "stock_pool_cpu"
MLA_CPU_ATTENTION = LIVE / "mla_cpu_attention"

# The CPU engine and a HiCache geometry it can run (see the module docstring).
CPU_ENGINE_ARGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--enable-hierarchical-cache",
    "--hicache-io-backend",
    "direct",
    "--hicache-mem-layout",
    "page_first_direct",
)
# HiCache's page: whole pages move between the pools and make up an L3 object.
PAGE_SIZE = 64


def cache_dir() -> Path:
    """The project's cache root (``KVTUNER_CACHE``, default ``~/.cache/kvtuner-patch``)."""
    return Path(os.environ.get("KVTUNER_CACHE", Path.home() / ".cache" / "kvtuner-patch"))


def free_port() -> int:
    """A loopback port nobody listens on right now, in 20000 - 32000: below the kernel's
    ephemeral range (32768 - 60999 here), so no client connection can take it as its source
    port while the server starts (a connect to a port nobody listens on yet may then connect
    to itself and read its own request back), and low enough for the ports SGLang derives from
    it (up to 0.5.13 start-up fails when port + 10000, its gRPC port, passes 65535)."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port between 20000 and 32000")


class ServerFailed(RuntimeError):
    """The server exited or never answered; the message ends with its log's tail."""


@dataclasses.dataclass
class Served:
    """One answered request: its greedy text and where its prompt's tokens came from."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    device: int
    host: int
    storage: int
    seconds: float

    @classmethod
    def from_reply(cls, reply: dict, seconds: float) -> "Served":
        meta = reply["meta_info"]
        details = meta.get("cached_tokens_details") or {}
        return cls(
            text=reply["text"],
            prompt_tokens=meta["prompt_tokens"],
            cached_tokens=meta.get("cached_tokens", 0),
            device=details.get("device", 0),
            host=details.get("host", 0),
            storage=details.get("storage", 0),
            seconds=seconds,
        )


class LiveServer:
    """One ``launch_server`` process group on a loopback port, logging to ``log_path``."""

    def __init__(
        self,
        python: str,
        sglang_tree: Optional[str],
        model: str,
        args: Sequence[str],
        log_path: Path,
        *,
        stock_pool: bool = False,
        mla_attention: bool = False,
        env: Optional[Dict[str, str]] = None,
        port: Optional[int] = None,
        page_size: int = PAGE_SIZE,
    ):
        self.python = python
        self.sglang_tree = sglang_tree
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.command = [
            python,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *CPU_ENGINE_ARGS,
            "--page-size",
            str(page_size),
            *args,
        ]
        self.env = server_env(
            python, sglang_tree, stock_pool=stock_pool, mla_attention=mla_attention, extra=env
        )
        self.proc: Optional[subprocess.Popen] = None
        self.prompt_tokens_sent = 0  # every answered request's prompt tokens

    def __enter__(self) -> "LiveServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 600.0) -> None:
        """Start the server and wait until ``/health`` answers, or raise ``ServerFailed``."""
        build_native_hash(self.python, self.sglang_tree)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends every child
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}\n{self.log_tail()}")
            if self._healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise ServerFailed(f"server did not answer within {timeout:.0f} s\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        # HTTPException: the answer was not HTTP, e.g. a TCP self-connect before the server
        # listens ("GET /health HTTP/1.1" read back as the status line): not up yet.
        except (urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException):
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generate(self, text: str, max_new_tokens: int = 8, timeout: float = 600.0) -> Served:
        """One greedy completion of ``text``."""
        body = json.dumps(
            {
                "text": text,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
            }
        ).encode()
        request = urllib.request.Request(
            f"{self.url}/generate", body, {"Content-Type": "application/json"}
        )
        start = time.monotonic()
        with urllib.request.urlopen(request, timeout=timeout) as r:
            reply = json.load(r)
        served = Served.from_reply(reply, time.monotonic() - start)
        self.prompt_tokens_sent += served.prompt_tokens
        return served

    def flush_cache(self) -> None:
        """Drop the device and host caches (``/flush_cache``); storage keeps its pages."""
        request = urllib.request.Request(f"{self.url}/flush_cache", b"", method="POST")
        with urllib.request.urlopen(request, timeout=60):
            pass

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        if self.proc is not None:
            stop_group(self.proc, grace)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def tracebacks(self) -> List[str]:
        """Every traceback in the log, each with the lines that follow it."""
        lines = self.log().splitlines()
        return ["\n".join(lines[i : i + 30]) for i, line in enumerate(lines) if "Traceback" in line]


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace`` seconds, then
    SIGKILL whatever of the group outlived its leader (detached children)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def torch_extensions_dir(sglang_tree: Optional[str]) -> Path:
    """Where a tree's JIT extensions are built (module docstring: one per tree)."""
    tree = str(Path(sglang_tree).resolve()) if sglang_tree else "installed"
    key = hashlib.sha256(tree.encode()).hexdigest()[:12]
    return cache_dir() / "torch-extensions" / key


# Loads (building on first use) HiCache's key hash extension, where the release has one.
BUILD_NATIVE_HASH = """
try:
    from sglang.srt.mem_cache.cpp_utils.native_hash import _load_native_hash_module
except ImportError:
    raise SystemExit(0)
_load_native_hash_module()
"""


@functools.lru_cache(maxsize=None)
def build_native_hash(python: str, sglang_tree: Optional[str]) -> None:
    """Build the tree's key hash extension now, once per process (module docstring)."""
    subprocess.run(
        [python, "-c", BUILD_NATIVE_HASH],
        env=server_env(python, sglang_tree),
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )


def server_env(
    python: str,
    sglang_tree: Optional[str],
    *,
    stock_pool: bool = False,
    mla_attention: bool = False,
    extra: Optional[Dict[str, str]] = None,
) -> Dict[str, str]:
    """The environment a CPU-engine server needs (module docstring)."""
    if stock_pool and mla_attention:  # each is a sitecustomize: only the first would load
        raise ValueError("stock_pool and mla_attention cannot be combined")
    env = dict(os.environ)
    venv_bin = str(Path(python).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["TORCH_EXTENSIONS_DIR"] = str(torch_extensions_dir(sglang_tree))
    paths = [str(SGL_KERNEL_STANDIN)]
    if stock_pool:
        paths.append(str(STOCK_POOL_CPU))
    if mla_attention:
        paths.append(str(MLA_CPU_ATTENTION))
    if sglang_tree:
        paths.append(str(sglang_tree))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def launch_refused(
    python: str,
    sglang_tree: Optional[str],
    model: str,
    args: Sequence[str],
    timeout: float = 300.0,
) -> subprocess.CompletedProcess:
    """Run a launch that must end at start-up; returns its exit status and output."""
    command = [python, "-m", "sglang.launch_server", "--model-path", model]
    command += ["--host", "127.0.0.1", "--port", str(free_port())]
    command += [*CPU_ENGINE_ARGS, "--page-size", str(PAGE_SIZE), *args]
    proc = subprocess.Popen(
        command,
        env=server_env(python, sglang_tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc, grace=0.0)  # leftover children of a refused launch
    return subprocess.CompletedProcess(command, proc.returncode, out, None)


# ------------------------------------------------------------- workload ---


def kjv_documents(chars: int = 6000) -> List[str]:
    """Disjoint chunks of the King James texts in ``benches/texts`` (~1.4k tokens each)."""
    docs = []
    for path in sorted(TEXTS.glob("kjv-*.txt")):
        text = path.read_text()
        docs += [text[i : i + chars] for i in range(0, len(text) - chars + 1, chars)]
    return docs


def model_dir() -> str:
    """The demo model as a Hugging Face directory (converted once; scripts/demo_model.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from demo_model import converted_model_dir
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return str(converted_model_dir())


def pool_startup_line(log: str) -> Optional[str]:
    """The quantizing pool's start-up line (the MHA or the MLA pool's), if the log has one."""
    m = re.search(r"KVTuner HiCache (MLA )?host pool: .*", log)
    return m.group(0) if m else None


def pool_bytes_per_token(log: str) -> Optional[Tuple[int, int]]:
    """(quantized, stock) host bytes per token from the pool's start-up line, if logged."""
    m = re.search(r"(\d+) B/token \(stock (\d+) B/token\)", pool_startup_line(log) or "")
    return (int(m.group(1)), int(m.group(2))) if m else None
