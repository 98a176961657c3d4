"""Tools for testing daemon profiles as files: write TOML, move a profile's paths, run the CLI.

>>> moved = move_paths({"path": "/var/lib/carousel/flash", "kind": "lmdb"}, {"/var/lib/carousel": "/tmp/x"})
>>> moved["path"], moved["kind"]
('/tmp/x/flash', 'lmdb')
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from carousel.toml_write import dump_toml  # noqa: F401  (the profile tests import it from here)
from storage_backends.url import parse_size

CAROUSEL = [sys.executable, "-m", "carousel"]
_BUDGET = re.compile(r"^#\s*budget\.(\w+)\s*=\s*(\S+)", re.M)


# ---- moving a profile ---------------------------------------------------------------------------------
def move_paths(data: Any, moves: Mapping[str, str]) -> Any:
    """A copy of ``data`` with every string that is a path under a key of ``moves`` moved below its value."""
    if isinstance(data, Mapping):
        return {k: move_paths(v, moves) for k, v in data.items()}
    if isinstance(data, list):
        return [move_paths(v, moves) for v in data]
    if isinstance(data, str):
        for old, new in moves.items():
            if data == old or data.startswith(old.rstrip("/") + "/"):
                return new + data[len(old.rstrip("/")):]
    return data


def strings(data: Any):
    """Every string value in a nested profile dict."""
    if isinstance(data, Mapping):
        for v in data.values():
            yield from strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from strings(v)
    elif isinstance(data, str):
        yield data


def budget(path: Path) -> dict[str, int]:
    """The ``# budget.NAME = VALUE`` comment lines of a profile: sizes ("4GiB") in bytes, counts as ints."""
    out = {}
    for key, value in _BUDGET.findall(path.read_text()):
        out[key] = int(value) if value.isdigit() else parse_size(value, f"budget.{key}")
    return out


# ---- test profiles -----------------------------------------------------------------------------------
def single_profile(root: Path) -> dict:
    """A valid profile in the single-memory layout, every path under ``root``."""
    return {
        "daemon": {"data_dir": f"{root}/data", "socket_dir": f"{root}/sock", "metrics": "", "ring_slots": 2},
        "memory": {"em_size": 16, "sample_shape": [3, 8, 8], "state_dir": f"{root}/state"},
        "swap": {"ratio": 0.5, "workers": 1},
        "tiers": [{"kind": "lmdb", "path": f"{root}/flash", "capacity": 1000, "sync": False}],
    }


def multi_profile(root: Path) -> dict:
    """A valid profile with memories ``cifar`` and ``mnist`` under ``[memories.NAME]``, every path under ``root``."""
    def memory(name: str) -> dict:
        return {"memory": {"em_size": 16, "sample_shape": [3, 8, 8], "state_dir": f"{root}/{name}/state"},
                "swap": {"ratio": 0.5, "workers": 1},
                "tiers": [{"kind": "lmdb", "path": f"{root}/{name}/flash", "capacity": 1000},
                          {"kind": "zarr", "path": f"{root}/{name}/disk", "capacity": "1MiB", "codec": "zstd"}]}
    return {"daemon": {"data_dir": f"{root}/data", "socket_dir": f"{root}/sock", "metrics": "",
                       "max_frame_bytes": "8MiB"},
            "memories": {"cifar": memory("cifar"), "mnist": memory("mnist")}}


def set_key(data: dict, dotted: str, value) -> dict:
    """Set ``dotted`` (``tiers.0.path``: list items by index; missing tables are made) in ``data``; returns ``data``."""
    *path, last = dotted.split(".")
    table = data
    for part in path:
        table = table[int(part)] if isinstance(table, list) else table.setdefault(part, {})
    table[last] = value
    return data


# ---- processes ---------------------------------------------------------------------------------------
def carousel_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([*CAROUSEL, *args], capture_output=True, text=True, timeout=timeout)


def start_serve(profile: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([*CAROUSEL, "serve", "--config", str(profile)], stdout=log, stderr=subprocess.STDOUT)


def wait_for_socket(proc: subprocess.Popen, sock: str, log_path: Path, timeout: float = 60.0) -> None:
    """Until the daemon's socket exists (bound and listening, whatever the log level); raises with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        if os.path.exists(sock):
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon not serving within {timeout} s:\n{log_path.read_text(errors='replace')}")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM and wait; a daemon that does not exit in time is killed (and the test fails on its code)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()

