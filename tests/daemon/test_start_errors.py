"""A daemon that cannot start says why, exits non-zero and leaves no segment, lock or socket behind."""

from __future__ import annotations

import socket

import pytest

from carousel.shm import segment_names
from tests.daemon.harness import start_daemon


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
