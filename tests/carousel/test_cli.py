"""The command line and the demo, as real processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from storage_backends import open_store
from tests.daemon.harness import start_daemon
from trainers.demo import training_benchmark

ROOT = Path(__file__).resolve().parents[2]


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kw)


def test_demo_writes_reads_and_verifies(tmp_path):
    out = run("-m", "trainers", "demo", "--samples", "1500", "--out", str(tmp_path), "--train-per-class", "40",
              "--eval-limit", "100", "--train-out", str(tmp_path / "train"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "demo: ok" in out.stdout
    with open_store(f"lmdb://{tmp_path}/flash") as s:
        assert len(s) == 1500
    # The daemon leg: every sample added through `carousel serve`, replayed and checked, clean exit.
    assert "daemon: 1500 samples added" in out.stdout and "SIGTERM -> exit 0" in out.stdout
    with open_store(f"lmdb://{tmp_path}/daemon/flash") as s:
        assert len(s) == 1500
    # The training leg: ER RAM-only and through a daemon of its own, a table and a figure.
    assert "| ram | 1 |" in out.stdout and "| carousel-daemon | 1 |" in out.stdout
    assert (tmp_path / "train" / "accuracy.png").is_file()
    assert (tmp_path / "train" / "carousel-daemon-s0" / "result.json").is_file()


def test_demo_without_data_uses_generated_images(tmp_path, capsys):
    # The storage and daemon legs, run as a newcomer without data would (the training leg is the
    # one test_demo_writes_reads_and_verifies runs; only its choice of data differs, checked below).
    out = run("-m", "trainers", "demo", "--samples", "300", "--out", str(tmp_path), "--skip-training",
              "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "using generated 28x28 images" in out.stdout and "demo: ok" in out.stdout
    assert "daemon: 300 samples added" in out.stdout
    assert training_benchmark(str(tmp_path)) == ("generated", str(tmp_path))
    assert "training on generated data" in capsys.readouterr().out


def test_store_info_and_verify(tmp_path):
    url = f"zarr://{tmp_path}/z?chunk=8"
    with open_store(url, {"x": ((4,), "uint8")}) as s:
        s.put_many(np.arange(20), {"x": np.arange(80, dtype=np.uint8).reshape(20, 4)})
        row = int(s._manifest.lookup(np.array([5]))[1][0])
    info = run("-m", "carousel", "store", "info", url)
    assert info.returncode == 0 and "records:    20" in info.stdout
    assert run("-m", "carousel", "store", "verify", url).returncode == 0
    # flip one byte of record 5 in its chunk file: verify must find it and quarantine it
    chunk = tmp_path / "z" / "x" / "c" / str(row // 16384) / "0"
    data = bytearray(chunk.read_bytes())
    data[(row % 16384) * 4] ^= 0xFF
    chunk.write_bytes(bytes(data))
    bad = run("-m", "carousel", "store", "verify", url)
    assert bad.returncode == 1 and "1 corrupt" in bad.stdout
    with open_store(url) as s:
        assert s.quarantined_ids().tolist() == [5] and len(s) == 19


def test_store_commands_on_a_missing_store_exit_2(tmp_path):
    out = run("-m", "carousel", "store", "info", f"lmdb://{tmp_path}/none")
    assert out.returncode == 2 and "no LMDB store" in out.stderr


# ---- answering without torch ------------------------------------------------------------------------------
# Runs a module as `python -m MODULE ARGS` would, with `import torch` made to fail first.
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def run_without_torch(module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run("-c", NO_TORCH, module, *args, **kw)


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["check-config", "--help"], ["status", "--help"],
                                  ["--version"]], ids=" ".join)
def test_carousel_help_without_torch(args):
    out = run_without_torch("carousel", *args)
    assert out.returncode == 0, out.stderr
    assert ("carousel 0." if args == ["--version"] else "usage: carousel") in out.stdout


def test_trainers_run_help_without_torch():
    out = run_without_torch("trainers", "run", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: python -m trainers run" in out.stdout and "--memory {ram,carousel,storage}" in out.stdout
    # The control: past the flags, the run needs torch, and the wrapper really keeps it away.
    out = run_without_torch("trainers", "run", "--benchmark", "generated", "--out", "/nonexistent/run")
    assert out.returncode != 0 and "torch" in out.stderr


def test_check_config_without_torch(tmp_path):
    profile = tmp_path / "user.toml"
    shutil.copy(ROOT / "deploy" / "configs" / "user.toml", profile)
    out = run_without_torch("carousel", "check-config", str(profile))
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith(f"{profile}: ok")
    assert [p.name for p in tmp_path.iterdir()] == ["user.toml"], "check-config made its folders"


# ---- status: which daemon, and none --------------------------------------------------------------------------
def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A client's environment with its default socket under tmp_path/xdg and no CAROUSEL_SOCKET."""
    env = {k: v for k, v in os.environ.items() if k != "CAROUSEL_SOCKET"}
    return {**env, "XDG_RUNTIME_DIR": str(tmp_path / "xdg"), **extra}


def _no_daemon(out: subprocess.CompletedProcess, path: str, there: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith(f"carousel: cannot reach a carousel daemon at {path} ("), line
    assert there in line
    for way in ("carousel serve --config PROFILE", "--socket PATH", "--config PROFILE", "CAROUSEL_SOCKET"):
        assert way in line, (way, line)


def test_status_without_a_daemon_fails_at_once(tmp_path):
    """No daemon ever started: no retries, no torch, the default socket named, and the ways to point elsewhere."""
    t0 = time.monotonic()
    out = run_without_torch("carousel", "status", env=_env(tmp_path))
    elapsed = time.monotonic() - t0
    default = f"{tmp_path}/xdg/carousel/carousel.sock"
    _no_daemon(out, default, f"no socket at {default}")
    # A process start and the config imports: ~0.5 s on an idle 2-core machine; the client's
    # retries this replaces took 30 s. The bound leaves room for a loaded CI machine.
    assert elapsed < 5.0, f"status took {elapsed:.1f} s to say there is no daemon"


def test_status_on_a_dead_daemons_socket(tmp_path):
    """A socket file that nobody accepts on (what a SIGKILLed daemon leaves)."""
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # bound, never listening: a connect is refused
        out = run_without_torch("carousel", "status", "--socket", path, env=_env(tmp_path))
    _no_daemon(out, path, "is a socket that no daemon accepts on")


def test_status_with_an_invalid_profile_exits_2(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("[daemon]\nsocket_dri = '/x'\n[memory]\nem_size = 8\nsample_shape = [2]\n")
    out = run("-m", "carousel", "status", "--config", str(profile), env=_env(tmp_path))
    assert out.returncode == 2
    assert out.stderr.startswith(f"carousel: invalid profile: {profile}: daemon.socket_dri: unknown key"), out.stderr


@pytest.fixture(scope="module")
def two_daemons(tmp_path_factory):
    """Daemon A at the default socket of a client whose XDG_RUNTIME_DIR is ROOT/xdg; daemon B elsewhere."""
    root = tmp_path_factory.mktemp("two")
    a = start_daemon(root, name="a", metrics=False, tiers=None,
                     daemon={"socket_dir": str(root / "xdg" / "carousel")})
    try:
        b = start_daemon(root, name="b", metrics=False, tiers=None)
    except BaseException:
        a.close()
        raise
    with a, b:
        yield root, a, b


def _status_pid(root: Path, *args: str, **env: str) -> int:
    out = run("-m", "carousel", "status", "--json", "--interval", "0.05", *args, env=_env(root, **env))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["pid"]


def test_status_finds_the_daemon_by_default_env_profile_and_socket(two_daemons):
    """Precedence: --socket, else --config (its daemon.socket_dir), else CAROUSEL_SOCKET, else the default."""
    root, a, b = two_daemons
    asked = {  # expected daemon: (args, environment)
        "default -> a": (a, (), {}),
        "CAROUSEL_SOCKET -> b": (b, (), {"CAROUSEL_SOCKET": b.socket}),
        "--config beats CAROUSEL_SOCKET -> b": (b, ("--config", str(b.profile)), {"CAROUSEL_SOCKET": a.socket}),
        "--socket beats CAROUSEL_SOCKET -> a": (a, ("--socket", a.socket), {"CAROUSEL_SOCKET": b.socket}),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:  # each status imports torch: side by side
        pids = {k: pool.submit(_status_pid, root, *args, **env) for k, (_, args, env) in asked.items()}
        assert {k: f.result() for k, f in pids.items()} == {k: d.pid for k, (d, _, _) in asked.items()}
