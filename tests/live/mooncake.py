"""A Mooncake store on loopback for the live-server tests: ``mooncake_master`` (with its
built-in HTTP metadata server) and one ``mooncake_client`` that holds the store's memory
segment, over TCP. The SGLang servers contribute no memory of their own
(``MOONCAKE_GLOBAL_SEGMENT_SIZE=0``), so pages survive a server restart in the client.

What it takes on these CPUs (``mooncake-transfer-engine-non-cuda``, facts found by running it):
its binaries and Python module link ``libibverbs.so.1`` even for TCP; the machines have no
system copy, so ``ibverbs_dir()`` links the copy NIXL's wheel bundles (with its two libnl
libraries) into the cache and puts that on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, Optional

from server import cache_dir, free_port, stop_group

IBVERBS = "libibverbs.so.1"


def ibverbs_dir() -> Optional[Path]:
    """A directory holding ``libibverbs.so.1`` to put on ``LD_LIBRARY_PATH``, or None when
    the system has its own."""
    if ctypes.util.find_library("ibverbs"):
        return None
    for wheel in ("nixl_cu12", "nixl_cu13"):
        spec = importlib.util.find_spec(wheel)
        if spec is None or not spec.submodule_search_locations:
            continue
        bundled = Path(list(spec.submodule_search_locations)[0]).parent / f"{wheel}.libs"
        ibverbs = sorted(bundled.glob("libibverbs-*.so*"))
        if not ibverbs:
            continue
        links = cache_dir() / "mooncake-libs" / wheel
        links.mkdir(parents=True, exist_ok=True)
        # The bundled libibverbs finds its libnl siblings by $ORIGIN, which is this directory:
        # link them under their own names, and libibverbs under the soname Mooncake asks for.
        for lib in bundled.glob("libnl-*.so*"):
            _link(links / lib.name, lib)
        _link(links / IBVERBS, ibverbs[0])
        return links
    raise RuntimeError(
        f"{IBVERBS} is missing: install libibverbs1, or nixl (whose wheel bundles it)"
    )


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


class MooncakeStore:
    """A master and one store client on loopback ports, logging into ``log_dir``."""

    def __init__(self, venv_bin: Path, log_dir: Path, segment: str = "1GB"):
        self.venv_bin = Path(venv_bin)
        self.log_dir = Path(log_dir)
        self.segment = segment
        self.rpc_port = free_port()
        self.metadata_port = free_port()
        self.metrics_port = free_port()
        self.procs: list[subprocess.Popen] = []
        libs = ibverbs_dir()
        # The library path Mooncake's binaries and SGLang's mooncake module both need.
        self.library_path = os.pathsep.join(
            p for p in (str(libs or ""), os.environ.get("LD_LIBRARY_PATH", "")) if p
        )

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    def server_env(self) -> Dict[str, str]:
        """What an SGLang server needs to use this store with no memory of its own."""
        env = {
            "MOONCAKE_MASTER": self.master,
            "MOONCAKE_TE_META_DATA_SERVER": self.metadata_server,
            "MOONCAKE_PROTOCOL": "tcp",
            "MOONCAKE_LOCAL_HOSTNAME": "127.0.0.1",
            "MOONCAKE_GLOBAL_SEGMENT_SIZE": "0",
        }
        if self.library_path:
            env["LD_LIBRARY_PATH"] = self.library_path
        return env

    def start(self, timeout: float = 60.0) -> None:
        """Start the master, wait for its ports, start the client and wait for its segment."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn(
                "mooncake_master",
                f"--rpc_port={self.rpc_port}",
                "--rpc_address=127.0.0.1",
                "--enable_http_metadata_server=true",
                "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={self.metadata_port}",
                f"--metrics_port={self.metrics_port}",
            )
            self._wait_for_ports(timeout, self.rpc_port, self.metadata_port)
            client_port = free_port()
            self._spawn(
                "mooncake_client",
                f"--master_server_address={self.master}",
                f"--metadata_server={self.metadata_server}",
                "--protocol=tcp",
                "--host=127.0.0.1",
                f"--port={client_port}",
                f"--global_segment_size={self.segment}",
            )
            self._wait_for_ports(timeout, client_port)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, program: str, *args: str) -> None:
        env = {**os.environ, "LD_LIBRARY_PATH": self.library_path}
        with open(self.log_dir / f"{program}.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    [str(self.venv_bin / program), *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def _wait_for_ports(self, timeout: float, *ports: int) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(ports)
        while waiting:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[0]} exited with {proc.returncode}\n{self.logs()}"
                    )
            waiting = {p for p in waiting if not _listening(p)}
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"Mooncake ports {sorted(waiting)} not open\n{self.logs()}")
            time.sleep(0.5)

    def allocated_bytes(self) -> int:
        """Bytes the store's segments hold now (the master's ``master_allocated_bytes``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            metrics = r.read().decode()
        m = re.search(r"^master_allocated_bytes (\d+)", metrics, re.M)
        if m is None:
            raise RuntimeError(f"no master_allocated_bytes in {url}")
        return int(m.group(1))

    def logs(self, lines: int = 20) -> str:
        tails = []
        for log in sorted(self.log_dir.glob("mooncake_*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(tails)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc, grace=10.0)
        self.procs.clear()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
