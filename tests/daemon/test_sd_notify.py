"""``Type=notify`` under systemd: READY=1 once serving, WATCHDOG=1 pings, STOPPING=1 on SIGTERM.

A real Unix datagram socket stands in for systemd's notify socket; the daemon is a real process.
"""

from __future__ import annotations

import signal
import socket
import time

from .harness import start_daemon


def _messages(sock: socket.socket, until: float) -> list[str]:
    out = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            break
    return out


def test_ready_watchdog_and_stopping_reach_systemd(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        d = start_daemon(tmp_path, metrics=False, tiers=None,
                         env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        try:
            got = _messages(sock, time.monotonic() + 1.5)
            assert got and got[0].startswith("READY=1"), got
            assert f"MAINPID={d.pid}" in got[0]
            assert sum(m == "WATCHDOG=1" for m in got) >= 5, got  # every 0.1 s: half of WatchdogSec
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(60) == 0
            rest = _messages(sock, time.monotonic() + 0.5)
            assert any(m.startswith("STOPPING=1") for m in rest), rest
        finally:
            if d.proc.poll() is None:
                d.proc.kill()


def test_no_notify_socket_no_messages_and_a_wrong_watchdog_pid_is_ignored(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        # WATCHDOG_PID names another process: the watchdog is not ours, so no pings (READY still goes).
        d = start_daemon(tmp_path, metrics=False, tiers=None,
                         env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
        try:
            got = _messages(sock, time.monotonic() + 1.0)
            assert got and got[0].startswith("READY=1")
            assert "WATCHDOG=1" not in got
        finally:
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(60) == 0
