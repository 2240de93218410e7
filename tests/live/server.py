"""A real ``python -m sglang.launch_server`` on SGLang's CPU engine, started and stopped by the
caller: the live-server tests (``tests/python/test_live_server.py``), the demo of
``scripts/setup-and-run.sh`` and ``benches/live_hit_rate.py`` use it.

What the CPU engine needs (SGLang 0.5.23, facts found by running it):
- ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's ``is_cpu()`` reads only this), ``--device cpu``,
  ``--attention-backend torch_native``; HiCache with ``--hicache-io-backend direct`` and
  ``--hicache-mem-layout page_first_direct`` (the GPU defaults ``kernel`` + ``page_first``
  cannot work on CPU);
- the venv's ``bin/`` on ``PATH`` (HiCache's key hash is a C++ extension built with ninja and
  g++ on first use) and a writable ``TORCH_EXTENSIONS_DIR``, cached with the other caches;
- ``sgl_kernel``: the stand-in in ``tests/live/sgl_kernel_standin`` (see its docstring);
- the stock host pool also needs ``tests/live/stock_pool_cpu`` (``stock_pool=True``); the
  quantizing pool runs without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

LIVE = Path(__file__).resolve().parent
ROOT = LIVE.parents[1]
TEXTS = ROOT / "benches" / "texts"
SGL_KERNEL_STANDIN = LIVE / "sgl_kernel_standin"
STOCK_POOL_CPU = LIVE / "stock_pool_cpu"

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
    "--page-size",
    "64",
)


def cache_dir() -> Path:
    """The project's cache root (``KVTUNER_CACHE``, default ``~/.cache/kvtuner-patch``)."""
    return Path(os.environ.get("KVTUNER_CACHE", Path.home() / ".cache" / "kvtuner-patch"))


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        env: Optional[Dict[str, str]] = None,
        port: Optional[int] = None,
    ):
        self.python = python
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
            *args,
        ]
        self.env = server_env(python, sglang_tree, stock_pool=stock_pool, extra=env)
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "LiveServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 600.0) -> None:
        """Start the server and wait until ``/health`` answers, or raise ``ServerFailed``."""
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
        except (urllib.error.URLError, ConnectionError, OSError):
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
        return Served.from_reply(reply, time.monotonic() - start)

    def flush_cache(self) -> None:
        """Drop the device and host caches (``/flush_cache``); storage keeps its pages."""
        request = urllib.request.Request(f"{self.url}/flush_cache", b"", method="POST")
        with urllib.request.urlopen(request, timeout=60):
            pass

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        _reap_group(self.proc.pid)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def tracebacks(self) -> List[str]:
        """Every traceback in the log, each with the lines that follow it."""
        lines = self.log().splitlines()
        return ["\n".join(lines[i : i + 30]) for i, line in enumerate(lines) if "Traceback" in line]


def _reap_group(pgid: int) -> None:
    """SIGKILL whatever of the group outlived its leader (detached scheduler children)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def server_env(
    python: str,
    sglang_tree: Optional[str],
    *,
    stock_pool: bool = False,
    extra: Optional[Dict[str, str]] = None,
) -> Dict[str, str]:
    """The environment a CPU-engine server needs (module docstring)."""
    env = dict(os.environ)
    venv_bin = str(Path(python).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["TORCH_EXTENSIONS_DIR"] = str(cache_dir() / "torch-extensions")
    paths = [str(SGL_KERNEL_STANDIN)]
    if stock_pool:
        paths.append(str(STOCK_POOL_CPU))
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
    command += [*CPU_ENGINE_ARGS, *args]
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
        _reap_group(proc.pid)
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
    """The quantizing pool's start-up line, if the log has one."""
    m = re.search(r"KVTuner HiCache host pool: .*", log)
    return m.group(0) if m else None
