"""A daemon that cannot start says why, exits non-zero and leaves no segment, lock or socket behind."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import subprocess
import sys

import pytest

from carousel.daemon.shm import segment_names
from tests.daemon.harness import start_daemon, write_profile


def test_metrics_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        before = set(segment_names())
        with pytest.raises(RuntimeError, match=f"cannot start: daemon.metrics 127.0.0.1:{port}: cannot listen"):
            start_daemon(tmp_path, daemon={"metrics": f"127.0.0.1:{port}"}, timeout=60)
    assert set(segment_names()) <= before  # its doorbell was unlinked
    assert not (tmp_path / "d" / "sock" / "carousel.sock").exists()
    # Nothing is held: the same profile starts once the port is free.
    d = start_daemon(tmp_path, daemon={"metrics": f"127.0.0.1:{port}"}, timeout=60)
    assert d.stop() == 0


def test_sigterm_while_opening_memories_shuts_down_cleanly(tmp_path):
    import signal
    import time

    d = start_daemon(tmp_path, wait=False)
    deadline = time.monotonic() + 60
    while '"msg": "opening memories"' not in d.log():
        assert d.proc.poll() is None, d.log()
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.005)
    d.proc.send_signal(signal.SIGTERM)  # before or after "serving": kept either way
    assert d.proc.wait(60) == 0, d.log()
    assert '"msg": "stopped cleanly"' in d.log()
    assert not (tmp_path / "d" / "sock" / "carousel.sock").exists()
    again = start_daemon(tmp_path)  # the locks went with it
    assert again.stop() == 0


# ---- every start failure is one line on stderr, never a traceback -----------------------------------------
def _serve(profile, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carousel", "serve", "--config", str(profile)], capture_output=True,
                          text=True, timeout=120, **kw)


def _one_line(done: subprocess.CompletedProcess) -> str:
    """The one line the CLI printed (the daemon's JSON log may come before it), with no traceback anywhere."""
    assert done.returncode not in (0, None), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("carousel:")]
    assert len(ours) == 1, done.stderr
    assert done.stderr.rstrip().endswith(ours[0]), "the reason is the last word"
    return ours[0]


def _profile(tmp_path, **daemon):
    base = tmp_path / "d"
    base.mkdir(exist_ok=True)
    return write_profile(base / "profile.toml",
                         {"socket_dir": str(base / "sock"), "data_dir": str(base / "data"), "metrics": "", **daemon},
                         {"em_size": 64, "sample_shape": [3, 8, 8]},
                         tiers=[{"kind": "lmdb", "path": str(base / "data" / "flash"), "capacity": 1000}])


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve(_profile(tmp_path, metrics=f"127.0.0.1:{port}"))
    assert done.returncode == 1
    assert _one_line(done).startswith(f"carousel: cannot start: daemon.metrics 127.0.0.1:{port}: cannot listen: ")


def test_data_directory_locked_is_one_line(tmp_path):
    """Another daemon's lock, held here with the same flock the daemon takes."""
    profile = _profile(tmp_path)
    lock = tmp_path / "d" / "data" / "daemon.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        done = _serve(profile)
    assert done.returncode == 1
    assert _one_line(done) == (f"carousel: cannot start: {lock}: another carousel daemon (pid {os.getpid()}) already "
                               "uses this data directory; stop it first or point this one elsewhere")
    assert not (tmp_path / "d" / "sock" / "carousel.sock").exists()


def test_an_allocation_that_fails_is_one_line(tmp_path):
    """An EM this machine could hold but this process may not (RLIMIT_AS below it): torch's
    allocator raises, and the daemon says which memory could not open, in one line."""
    from carousel.daemon.preflight import PROCESS_BYTES, machine_ram

    em_bytes, limit = 4 << 30, 3 << 30
    if machine_ram().total < em_bytes + PROCESS_BYTES + (1 << 30):
        pytest.skip("this machine's RAM is too small for an EM that passes the preflight but not the limit")
    base = tmp_path / "d"
    base.mkdir()
    profile = write_profile(base / "profile.toml", {"socket_dir": str(base / "sock"), "data_dir": str(base / "data"),
                                                    "metrics": ""},
                            {"em_size": em_bytes // (3 * 32 * 32 + 8 + 2 + 24), "sample_shape": [3, 32, 32]})
    done = _serve(profile, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert done.returncode == 1
    line = _one_line(done)
    assert line.startswith("carousel: cannot start: memory 'default' cannot open: "), line
    assert "allocate" in line, line
    assert not (base / "sock" / "carousel.sock").exists()
