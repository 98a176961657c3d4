"""RELIABILITY items 14 and 23 against a real ``carousel serve`` process: connections that never
say HELLO (idle, or idle with a token missing on TCP) are closed at ``daemon.hello_timeout_s``,
never take the slots of clients (``max_clients`` counts connections that completed HELLO), and
are themselves capped (``daemon.max_pending``: the oldest is closed to make room), so a flood of
them cannot lock a legitimate client out."""

from __future__ import annotations

import os
import resource
import socket
import time

import numpy as np
import pytest

import carousel

from .harness import free_port
from .rawwire import daemons  # noqa: F401 - the fixture
from .rawwire import (OP, closed_within, connect_raw, frame, frames_in, hello, metric_sum, metric_values,
                      own_records, read_until_closed, recv_frame, request, still_open, wait_for)

TOKEN = "s3cret-token-0123456789"
N_TCP, N_UNIX = 64, 1000


@pytest.fixture
def fd_room():
    """This process holds over a thousand sockets: raise its soft RLIMIT_NOFILE (as the daemon
    raises its own) for the test, and put it back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if want < N_TCP + N_UNIX + 256:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to hold {N_TCP + N_UNIX} sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _tcp_daemon(daemons, tmp_path, **settings):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_port()
    d = daemons(daemon={"tcp": f"127.0.0.1:{port}", "token_file": str(token), **settings}, tiers=None)
    return d, port


def _clean_log(d) -> None:
    records = own_records(d)
    assert not [r for r in records if "exc" in r or r.get("level") == "error"], d.log()
    text = d.log()
    assert "Traceback" not in text and "Unhandled exception" not in text and "out of system resource" not in text, text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_23_idle_flood_does_not_lock_out_clients(daemons, tmp_path, fd_room):
    """RELIABILITY 23: 64 idle TCP connections (no token) and 1,000 idle Unix connections, all held
    open: a legitimate client connects and samples within 1 s, on the Unix socket and over TCP; the
    idle ones are closed at the HELLO deadline (the oldest earlier, to keep within max_pending);
    authenticated clients that idle are not."""
    hello_timeout = 3.0
    d, port = _tcp_daemon(daemons, tmp_path, hello_timeout_s=hello_timeout)
    fds = next(r for r in own_records(d) if r.get("msg") == "file descriptors")
    max_pending = fds["max_pending"]
    assert fds["nofile"] > N_TCP + N_UNIX + 256 and max_pending == 1024, fds  # the default daemon.max_pending
    with carousel.connect(d.socket) as c:
        c.add(np.arange(32 * 192, dtype=np.uint8).reshape(32, 3, 8, 8) % 251, np.arange(32) % 4, 0)
    authed = connect_raw(d.socket)  # a client that completed HELLO and then idles past the deadline
    hello(authed)

    t_flood = time.monotonic()
    idle = [connect_raw(d.socket) for _ in range(N_UNIX)]
    idle += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(N_TCP)]
    n = len(idle)
    # Every one accepted by the daemon: max_pending of them wait for HELLO, the oldest were closed.
    assert wait_for(lambda: metric_sum(metric_values(d), "carousel_pending_connections") == max_pending, 10), \
        metric_values(d)
    opened_s = time.monotonic() - t_flood
    assert opened_s < hello_timeout - 1.0, f"opening the flood took {opened_s:.2f} s: the test would measure less"

    t0 = time.monotonic()
    with carousel.connect(d.socket, reconnect_s=0) as c:
        b = c.sample(8)
    unix_s = time.monotonic() - t0
    t0 = time.monotonic()
    with carousel.connect(f"tcp://127.0.0.1:{port}", token=TOKEN, reconnect_s=0) as c:
        b_tcp = c.sample(8)
        tcp_s = time.monotonic() - t0
        # Waiting connections are no clients: the TCP client is the second, beside `authed`
        # (once the daemon has seen the Unix one leave).
        assert wait_for(lambda: metric_sum(metric_values(d), "carousel_clients") == 2, 5), metric_values(d)
    assert len(b) == 8 and len(b_tcp) == 8
    assert unix_s < 1.0 and tcp_s < 1.0, (unix_s, tcp_s)
    print(f"flood of {n} opened in {opened_s:.2f} s; connect + sample: unix {unix_s * 1e3:.0f} ms, "
          f"tcp {tcp_s * 1e3:.0f} ms")

    closed = read_until_closed(idle, hello_timeout + 10.0)
    assert len(closed) == n, f"{n - len(closed)} idle connections were never closed"
    m = metric_values(d)
    evicted = metric_sum(m, "carousel_connections_refused_total", reason="pending_full")
    timed_out = metric_sum(m, "carousel_connections_refused_total", reason="hello_timeout")
    # Each idle connection was told why before the close: "timeout" at the deadline, or "busy"
    # when it was the oldest waiting and a newcomer needed the room.
    kinds = {i: [f[1]["error"] for f in frames_in(data) if f[0] == OP["ERROR"]] for i, (_, data) in closed.items()}
    early = [i for i, (t, _) in closed.items() if t - t_flood < hello_timeout - 0.5]
    assert sorted(early) == [i for i in range(n) if kinds[i] == ["busy"]], (early, kinds)
    # Each legitimate client took a waiting place until its HELLO: the Unix one made room by
    # closing the oldest, and gave its place back at HELLO, so the TCP one found room.
    assert len(early) == evicted == n + 1 - max_pending, (len(early), evicted)
    assert all(kinds[i] == ["timeout"] for i in range(n) if i not in early)
    assert timed_out == n - evicted, (timed_out, evicted)
    late = max(t for t, _ in closed.values()) - t_flood
    assert late < opened_s + hello_timeout + 3.0, f"the last idle connection was closed {late:.1f} s after the flood"
    assert metric_sum(m, "carousel_pending_connections") == 0 and metric_sum(m, "carousel_clients") == 1, m
    for s in idle:
        s.close()

    # The authenticated client idled through it all, still connected and served.
    assert still_open(authed)
    op, meta, _ = request(authed, OP["STATS"], {})
    assert op == OP["OK"] and meta["added"] == 32, meta
    authed.close()
    # Flood-sized events log a line or two each (one per 5 s), not one per connection; no traceback.
    records = own_records(d)
    for msg in ("connection closed before HELLO to make room for a new one",
                "connection closed: no HELLO within daemon.hello_timeout_s"):
        assert 1 <= len([r for r in records if r.get("msg") == msg]) <= 2, [r for r in records if r.get("msg") == msg]
    _clean_log(d)
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_23_waiting_connections_are_capped_and_bounded(daemons, tmp_path):
    """RELIABILITY 23 and 14: before HELLO a connection is capped (max_pending, the oldest closed
    first), limited to small frames, and closed at the deadline however much it chats (PING); a
    client's place is taken at HELLO, where max_clients answers "busy" and closes."""
    d, port = _tcp_daemon(daemons, tmp_path, hello_timeout_s=1.5, max_pending=4, max_clients=2)
    first = [connect_raw(d.socket) for _ in range(4)]
    assert wait_for(lambda: metric_sum(metric_values(d), "carousel_pending_connections") == 4, 5)
    newest = connect_raw(d.socket)
    # The oldest waiting connection is closed to make room for the newest, and told why.
    f = recv_frame(first[0])
    assert f is not None and f[0] == OP["ERROR"] and f[1]["error"] == "busy" and "max_pending" in f[1]["message"], f
    assert closed_within(first[0], 2.0)
    assert all(still_open(s) for s in first[1:] + [newest])

    # Chatting before HELLO (PING and STATUS are allowed) does not move the deadline.
    t0 = time.monotonic()
    chatty = connect_raw(d.socket)
    replies = 0
    while time.monotonic() - t0 < 5.0:
        try:
            chatty.sendall(frame(OP["PING"], {}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed meanwhile: the ERROR frame sent before the close is still there to read
        f = recv_frame(chatty)
        if f is None or f[0] != OP["OK"]:
            break
        replies += 1
        time.sleep(0.1)
    took = time.monotonic() - t0
    assert f is not None and f[0] == OP["ERROR"] and f[1]["error"] == "timeout", f
    assert replies >= 5 and 1.3 <= took < 2.5, (replies, took)
    assert closed_within(chatty, 2.0)

    # A frame before HELLO may not make the daemon buffer much: refused by its header, on either socket.
    for s in (connect_raw(d.socket), socket.create_connection(("127.0.0.1", port), timeout=5)):
        s.sendall(frame(OP["HELLO"], {"memory": "default", "token": TOKEN, "pad": "p" * 70000})[:24])
        f = recv_frame(s)
        assert f is not None and f[1]["error"] == "protocol" and "before HELLO" in f[1]["message"], f
        assert closed_within(s, 2.0)
        s.close()

    # max_clients is checked at HELLO: two clients fit, a third HELLO is told "busy" and closed.
    c1 = carousel.connect(d.socket, use_shm=False)
    c2 = carousel.connect(f"tcp://127.0.0.1:{port}", token=TOKEN)
    third = connect_raw(d.socket)
    op, meta, _ = request(third, OP["HELLO"], {"memory": "default", "pid": os.getpid(), "version": 1})
    assert op == OP["ERROR"] and meta["error"] == "busy" and "max_clients=2" in meta["message"], meta
    assert closed_within(third, 2.0)
    c2.close()
    assert wait_for(lambda: metric_sum(metric_values(d), "carousel_clients") == 1, 5)
    c3 = carousel.connect(d.socket, use_shm=False, reconnect_s=0)  # the freed slot
    m = metric_values(d)
    assert metric_sum(m, "carousel_clients") == 2
    assert metric_sum(m, "carousel_connections_refused_total", reason="busy") == 1
    assert metric_sum(m, "carousel_connections_refused_total", reason="pending_full") >= 1
    assert c1.stats()["added"] == 0 and c3.stats()["added"] == 0
    c1.close()
    c3.close()
    for s in first + [newest, chatty, third]:
        s.close()
    _clean_log(d)
    assert d.stop() == 0

