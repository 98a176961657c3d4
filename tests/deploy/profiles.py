"""Tools for testing daemon profiles as files: write TOML, move a profile's paths, run the CLI.

>>> dump_toml({"daemon": {"metrics": ""}, "tiers": [{"kind": "lmdb", "capacity": 8}]})
'[daemon]\\nmetrics = ""\\n\\n[[tiers]]\\nkind = "lmdb"\\ncapacity = 8\\n'
>>> moved = move_paths({"path": "/var/lib/carousel/flash", "kind": "lmdb"}, {"/var/lib/carousel": "/tmp/x"})
>>> moved["path"], moved["kind"]
('/tmp/x/flash', 'lmdb')
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storage_backends.url import parse_size

CAROUSEL = [sys.executable, "-m", "carousel"]
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_BUDGET = re.compile(r"^#\s*budget\.(\w+)\s*=\s*(\S+)", re.M)


# ---- a tiny TOML writer: what tomllib reads back as the same dict ------------------------------------
def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"no TOML for {v!r} here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__} {v!r}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _emit(lines: list[str], path: list[str], table: Mapping[str, Any], header: str | None) -> None:
    plain = {k: v for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    # A table holding only sub-tables needs no header of its own; an empty one does, to exist.
    if header is not None and (plain or not table or header.startswith("[[")):
        lines += ["", header] if lines else [header]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in plain.items()]
    for k, v in table.items():
        dotted = ".".join(_key(p) for p in [*path, k])
        if isinstance(v, Mapping):
            _emit(lines, [*path, k], v, f"[{dotted}]")
        elif _is_table_array(v):
            for item in v:
                _emit(lines, [*path, k], item, f"[[{dotted}]]")


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a dict of tables, arrays of tables and plain values (what profiles hold)."""
    lines: list[str] = []
    _emit(lines, [], data, None)
    return "\n".join(lines) + "\n"


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

