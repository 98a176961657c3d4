"""Start a real ``carousel serve`` subprocess for tests, with a profile written into a temp dir.

Example (not a doctest: it starts a real daemon)::

    d = start_daemon(tmp_path)
    client = carousel.connect(d.socket)
    d.stop()  # SIGTERM; returns the exit code
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.prometheus_harness import free_port  # noqa: F401 - tests import it from here

CIFAR = {"em_size": 64, "sample_shape": [3, 8, 8]}  # small and fast by default


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: memory={"extras": {"logits": {"shape": [10], "dtype": "float32"}}}
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def write_profile(path: Path, daemon: dict, memory: dict, swap: dict | None = None, tiers: list[dict] | None = None,
                  write_behind: dict | None = None) -> Path:
    lines = ["[daemon]"] + [f"{k} = {_toml_value(v)}" for k, v in daemon.items()]
    lines += ["[memory]"] + [f"{k} = {_toml_value(v)}" for k, v in memory.items()]
    if swap:
        lines += ["[swap]"] + [f"{k} = {_toml_value(v)}" for k, v in swap.items()]
    if write_behind:
        lines += ["[write_behind]"] + [f"{k} = {_toml_value(v)}" for k, v in write_behind.items()]
    for t in tiers or []:
        lines += ["[[tiers]]"] + [f"{k} = {_toml_value(v)}" for k, v in t.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProc:
    """A running daemon: ``socket``, ``metrics_port``, ``proc``, ``log_path``, ``profile``."""

    def __init__(self, proc: subprocess.Popen, socket_path: str, metrics_port: int | None, log_path: Path,
                 profile: Path) -> None:
        self.proc, self.socket, self.metrics_port, self.log_path, self.profile = \
            proc, socket_path, metrics_port, log_path, profile

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def shm_segments(self) -> list[str]:
        """This daemon's shared-memory segments in /dev/shm (``carousel-{uid}-{pid}-{n}``)."""
        prefix = f"carousel-{os.getuid()}-{self.pid}-"
        try:
            return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
        except FileNotFoundError:
            return []

    def metrics_text(self, timeout: float = 10.0) -> str:
        """The raw exposition served on ``/metrics``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as resp:
            return resp.read().decode("utf-8")

    def close(self) -> None:
        """Stop (SIGTERM, SIGKILL if that does not work) and remove segments a killed daemon left."""
        try:
            if self.proc.poll() is None:
                self.stop(timeout=30.0)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
            for name in self.shm_segments():
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "DaemonProc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_daemon(tmp_path: Path, *, daemon: dict | None = None, memory: dict | None = None,
                 swap: dict | None = None, tiers: list[dict] | None = "lmdb", name: str = "d",
                 write_behind: dict | None = None,
                 metrics: bool = True, env: dict | None = None, wait: bool = True,
                 timeout: float = 60.0) -> DaemonProc:
    """Write a profile under ``tmp_path/name`` and start ``carousel serve`` on it.

    ``tiers="lmdb"`` (default) gives one LMDB tier of 10,000 samples; ``None`` or ``[]`` is RAM only.
    ``daemon`` entries override the defaults (socket_dir, data_dir, metrics on a free port).
    With ``wait`` it returns once the daemon logs "serving" (raises with its log otherwise).
    """
    base = tmp_path / name
    base.mkdir(parents=True, exist_ok=True)
    port = free_port() if metrics else None
    d = {"socket_dir": str(base / "sock"), "data_dir": str(base / "data"),
         "metrics": f"127.0.0.1:{port}" if metrics else ""}
    d.update(daemon or {})
    if tiers == "lmdb":
        tiers = [{"kind": "lmdb", "path": str(base / "data" / "flash"), "capacity": 10000}]
    profile = write_profile(base / "profile.toml", d, memory or dict(CIFAR), swap, tiers or [], write_behind)
    log_path = base / "daemon.log"
    # A restart on the same name appends to the same log: only what this daemon writes counts.
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carousel", "serve", "--config", str(profile)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    dp = DaemonProc(proc, os.path.join(d["socket_dir"], "carousel.sock"), port, log_path, profile)
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{dp.log()}")
            if b'"msg": "serving"' in log_path.read_bytes()[offset:]:
                break
            time.sleep(0.05)
        else:
            dp.kill()
            raise RuntimeError(f"daemon not serving within {timeout} s:\n{dp.log()}")
    return dp
