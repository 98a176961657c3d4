"""RELIABILITY items 9-14 against a real ``carousel serve`` process: foreign uids, unsafe socket
directories, malformed frames, half-sent frames, pickles, too many clients and pipelining."""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import carousel

from .harness import CIFAR, rss_bytes, write_profile
from .rawwire import daemons  # noqa: F401 - the fixture
from .rawwire import (OP, closed_within, connect_raw, frame, hello, log_has, own_records, recv_frame, request,
                      still_open, wait_for)

NOBODY = 65534
ROW = 3 * 8 * 8  # bytes of one default sample (uint8 [3, 8, 8])


def _add_rows(client, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    return client.add(x, rng.integers(0, 10, n), 0), x


# ---- 9: another uid is refused before any frame is read ------------------------------------------------
def _as_nobody(socket_path: str, send_hello: bool) -> dict:
    """Fork a child that drops to uid/gid 65534 and connects; what it saw comes back as a dict.
    (A fork, not an exec: root's interpreter lives under /root, which nobody may enter.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the standard library from here on, then _exit
        out: dict = {}
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out["uid"] = os.getuid()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(socket_path)
            if send_hello:
                try:
                    s.sendall(frame(OP["HELLO"], {"memory": "default", "pid": os.getpid(), "version": 1}))
                except OSError as exc:
                    out["send_error"] = repr(exc)
            f = recv_frame(s)
            out["frame"] = None if f is None else [f[0], f[1]]
            t0 = time.monotonic()
            out["closed"] = closed_within(s, 5.0)
            out["closed_after_s"] = time.monotonic() - t0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out["error"] = repr(exc)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b"{}")


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_09_foreign_uid_refused_before_any_frame(daemons):
    # The socket must be reachable by uid 65534 for the test to mean anything: a directory it can
    # traverse (tmp_path sits under a 0700 pytest-of-root), opened up only after the daemon started.
    base = Path(tempfile.mkdtemp(prefix="carousel-t09-", dir="/tmp"))
    try:
        os.chmod(base, 0o711)
        sock_dir = base / "sock"
        d = daemons(daemon={"socket_dir": str(sock_dir), "metrics": ""}, tiers=None)
        os.chmod(sock_dir, 0o711)
        os.chmod(d.socket, 0o666)
        with carousel.connect(d.socket) as ok:
            for send_hello in (False, True):
                seen = _as_nobody(d.socket, send_hello)
                assert seen.get("uid") == NOBODY, seen
                assert "error" not in seen, seen
                # An ERROR frame of kind "auth" arrives even though nothing was sent: the daemon
                # decided on SO_PEERCRED alone, before reading a byte; then it closes.
                assert seen["frame"] is not None and seen["frame"][0] == OP["ERROR"], seen
                assert seen["frame"][1]["error"] == "auth", seen
                assert str(NOBODY) in seen["frame"][1]["message"], seen
                assert seen["closed"], seen
                # A normal client of the owning uid keeps being served.
                assert ok.stats()["added"] == 0
            assert wait_for(lambda: log_has(d, "connection refused: foreign uid", peer_uid=NOBODY), 5)
            refused = [r for r in own_records(d) if r.get("msg") == "connection refused: foreign uid"]
            assert len(refused) == 2
            ok.add(np.zeros((2, 3, 8, 8), np.uint8), [1, 2], 0)
            assert ok.stats()["added"] == 2
        assert d.proc.poll() is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- 10: an unsafe socket directory stops the daemon from starting ---------------------------------------
def _serve_fails(tmp_path: Path, sock_dir: Path) -> subprocess.CompletedProcess:
    prof = write_profile(tmp_path / "p10.toml", {"socket_dir": str(sock_dir), "data_dir": str(tmp_path / "data"),
                                                  "metrics": ""}, dict(CIFAR), None, [])
    return subprocess.run([sys.executable, "-m", "carousel", "serve", "--config", str(prof)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["mode0777", "mode0750", "mode0703", "other_owner", "symlink", "a_file"])
def test_10_unsafe_socket_dir_refused(tmp_path, case):
    sock_dir = tmp_path / "sock"
    if case.startswith("mode"):
        sock_dir.mkdir()
        os.chmod(sock_dir, int(case[4:], 8))
        why = f"has mode {case[5:]}"
    elif case == "other_owner":
        sock_dir.mkdir(mode=0o700)
        os.chown(sock_dir, NOBODY, NOBODY)
        why = f"owned by uid {NOBODY}"
    elif case == "symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        sock_dir.symlink_to(real)
        why = "symlink"
    else:
        sock_dir.write_text("")
        why = "is not a folder"
    before = sorted(os.listdir(sock_dir)) if sock_dir.is_dir() else None
    res = _serve_fails(tmp_path, sock_dir)
    assert res.returncode not in (0, None), res
    assert "cannot start" in res.stderr and "daemon.socket_dir" in res.stderr and str(sock_dir) in res.stderr, res.stderr
    assert why in res.stderr, res.stderr
    # Nothing listens: no socket was created anywhere in (or through) that directory.
    if sock_dir.is_dir():
        assert sorted(os.listdir(sock_dir)) == before
        assert not (sock_dir / "carousel.sock").exists()
    # And the directory was not "repaired" behind the user's back.
    st = os.lstat(sock_dir)
    if case.startswith("mode"):
        assert stat.S_IMODE(st.st_mode) == int(case[4:], 8)
    if case == "other_owner":
        assert st.st_uid == NOBODY


# ---- 11: malformed frames --------------------------------------------------------------------------------
def _bad_frames() -> dict[str, bytes]:
    tens = lambda spec, payload=b"": frame(OP["ADD"], {"tensors": spec}, payload)  # noqa: E731
    ok_stats = frame(OP["STATS"], {})
    return {
        "len_2**40": frame(OP["ADD"], {}, payload_len=1 << 40),
        "len_max_u64": frame(OP["ADD"], {}, payload_len=(1 << 64) - 1),
        "meta_len_max_u32": frame(OP["STATS"], {}, meta_len=(1 << 32) - 1),
        "shape_negative": tens([["x", "uint8", [-1, 3, 8, 8]]]),
        "shape_huge": tens([["x", "uint8", [1 << 39, 1 << 39]]]),
        "shape_2**62": tens([["x", "float64", [1 << 62]]]),
        "shape_not_int": tens([["x", "uint8", ["3"]]]),
        "shape_float": tens([["x", "uint8", [3.0]]]),
        "shape_too_many_dims": tens([["x", "uint8", [1] * 9]]),
        "shape_vs_payload": tens([["x", "uint8", [4]]], b"abc"),
        "dtype_object": tens([["x", "object", [1]]], b"\0" * 8),
        "dtype_O": tens([["x", "O", [1]]], b"\0" * 8),
        "dtype_unicode": tens([["x", "<U10", [1]]], b"\0" * 40),
        "dtype_void": tens([["x", "V8", [1]]], b"\0" * 8),
        "dtype_datetime": tens([["x", "datetime64[ns]", [1]]], b"\0" * 8),
        "bad_magic": frame(OP["STATS"], {}, magic=b"XXXX"),
        "bad_version_2": frame(OP["STATS"], {}, version=2),
        "bad_version_0": frame(OP["STATS"], {}, version=0),
        "bad_checksum": ok_stats[:20] + bytes([ok_stats[20] ^ 1]) + ok_stats[21:],
        "bad_checksum_body": frame(OP["STATS"], {"a": 1}, crc=0),
        "unknown_op_99": frame(99, {}),
        "unknown_op_0": frame(0, {}),
        "reply_op_as_request": frame(OP["OK"], {}),
        "error_op_as_request": frame(OP["ERROR"], {"error": "x"}),
        "flags_set": frame(OP["STATS"], {}, flags=1),
        "meta_not_json": frame(OP["STATS"], meta_raw=b"\xff\xfe{not json"),
        "meta_is_list": frame(OP["STATS"], meta_raw=b"[1,2]"),
        "tensors_not_list": frame(OP["ADD"], {"tensors": "x"}),
        "http_request": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    }


@pytest.mark.timeout(180)
def test_11_malformed_frames_error_and_close(daemons):
    """RELIABILITY 11: each malformed frame gets an ERROR frame and a close; RSS does not grow by
    the announced sizes; another client is unaffected. (Generated frames: test_wire_fuzz.py.)"""
    d = daemons(metrics=False)
    good = carousel.connect(d.socket, use_shm=False)
    ids, _ = _add_rows(good, 8)
    frames = _bad_frames()

    def one(name: str, data: bytes) -> None:
        s = connect_raw(d.socket)
        try:
            hello(s)
            s.sendall(data)
            f = recv_frame(s)
            assert f is not None, f"{name}: the daemon closed without an error frame"
            op, meta, _ = f
            assert op == OP["ERROR"] and meta.get("error") in ("protocol", "input"), (name, op, meta)
            assert meta.get("message"), (name, meta)
            assert closed_within(s, 5.0), f"{name}: the connection stayed open after a protocol error"
        finally:
            s.close()
        assert good.stats()["added"] == 8, name  # another client, connected throughout, is unaffected

    for name, data in frames.items():  # warm-up round: first-use allocations (logging, json...)
        one(name, data)
    rss0 = rss_bytes(d.pid)
    for _ in range(3):
        for name, data in frames.items():
            one(name, data)
    # A frame that announces 60 MiB (within max_frame_bytes) but sends 4 KiB and stops: the daemon
    # must not set aside the announced size.
    for _ in range(3):
        s = connect_raw(d.socket)
        s.sendall(frame(OP["ADD"], {}, payload_len=60 << 20)[:24] + b"\0" * 4096)
        s.shutdown(socket.SHUT_WR)
        assert closed_within(s, 5.0)
        s.close()
    grown = rss_bytes(d.pid) - rss0
    assert grown < 16 << 20, f"daemon RSS grew by {grown} bytes over {4 * len(frames) + 3} bad frames"
    # Still whole: a fresh client works too, and the data is intact.
    with carousel.connect(d.socket, use_shm=False) as c2:
        b = c2.sample(8, seed=1)
        assert sorted(b.ids.tolist()) == ids.tolist()
    good.close()
    assert d.proc.poll() is None
    assert d.stop() == 0


# ---- 12: half-sent frames time out; idle connections do not --------------------------------------------
@pytest.mark.timeout(120)
def test_12_half_sent_frame_times_out_idle_does_not(daemons):
    """RELIABILITY 12: a half-sent frame (or a trickle) is closed after read_timeout_s; a
    connection idle between frames is not. (The deadline for saying HELLO at all is item 23's:
    test_idle_connections.py; here it is set long enough not to interfere.)"""
    d = daemons(daemon={"read_timeout_s": 0.5, "hello_timeout_s": 60}, metrics=False, tiers=None)
    idle = connect_raw(d.socket)              # connected, never sends a byte (within hello_timeout_s)
    idle_hello = connect_raw(d.socket)
    hello(idle_hello)                         # sends HELLO, then idles between frames
    good = frame(OP["STATS"], {"pad": "x" * 200})

    def half(data: bytes) -> float:
        s = connect_raw(d.socket)
        hello(s)
        t0 = time.monotonic()
        s.sendall(data)
        assert closed_within(s, 10.0), "a half-sent frame was never timed out"
        s.close()
        return time.monotonic() - t0

    took = [half(good[:10]),                       # part of the header
            half(good[:24]),                       # the header, no body
            half(good[:24 + 50])]                  # the header and part of the body
    for t in took:
        assert 0.4 <= t < 5.0, took

    # A trickle (one byte every 0.1 s) cannot keep a frame open forever either.
    s = connect_raw(d.socket)
    hello(s)
    t0 = time.monotonic()
    sent, closed = 0, False
    for b in good:
        try:
            s.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        sent += 1
        if closed_within(s, 0.1):
            closed = True
            break
    s.close()
    assert closed and sent < len(good) and time.monotonic() - t0 < 5.0, (closed, sent, len(good))

    # Meanwhile the idle connections (4x the read timeout and more) are still open and work.
    assert time.monotonic() - t0 > 0 and still_open(idle) and still_open(idle_hello)
    time.sleep(1.0)
    assert still_open(idle) and still_open(idle_hello)
    hello(idle)
    op, meta, _ = request(idle, OP["PING"], {})
    assert op == OP["OK"], meta
    op, meta, _ = request(idle_hello, OP["STATS"], {})
    assert op == OP["OK"] and meta["added"] == 0, meta
    idle.close()
    idle_hello.close()
    timed_out = [r for r in own_records(d) if r.get("msg") == "half-sent frame timed out; closing"]
    assert len(timed_out) >= 4, d.log()
    assert d.stop() == 0


# ---- 13: pickles are bytes, never objects ---------------------------------------------------------------
class _Trap:
    """Unpickling this creates the marker file (``open(path, "w")``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(120)
def test_13_pickled_bytes_never_unpickled(daemons, tmp_path):
    marker = tmp_path / "unpickled.marker"
    # The payload is live: unpickling it really creates a file (checked on a decoy path).
    decoy = tmp_path / "decoy.marker"
    pickle.loads(pickle.dumps(_Trap(str(decoy)))).close()
    assert decoy.exists()
    decoy.unlink()

    d = daemons(metrics=False, tiers=None)
    payloads = [pickle.dumps(_Trap(str(marker)), protocol=p) for p in (0, 2, pickle.HIGHEST_PROTOCOL)]
    c = carousel.connect(d.socket, use_shm=False)
    sent = []
    for p in payloads:
        rows = -(-len(p) // ROW)
        raw = p + b"\0" * (rows * ROW - len(p))  # trailing bytes do not stop pickle.loads
        x = np.frombuffer(raw, np.uint8).reshape(rows, 3, 8, 8)
        ids = c.add(x, np.full(rows, 7), 0)
        sent.append((ids.tolist(), raw))
    # Stored and served back as the very bytes sent.
    b = c.sample(64, seed=3)
    got = {int(i): bytes(b.x[k].numpy().tobytes()) for k, i in enumerate(b.ids)}
    for ids, raw in sent:
        assert b"".join(got[i] for i in ids) == raw

    # As raw frames: pickles in every place that could be parsed.
    p = payloads[-1]
    n8 = -(-len(p) // 8) * 8
    cases = {
        "meta_is_pickle": frame(OP["HELLO"], meta_raw=p),
        "mp_connection_style": len(p).to_bytes(4, "big") + p,      # what multiprocessing.Connection sends
        "pickle_as_whole_frame": p,
        "object_dtype_tensor": frame(OP["ADD"], {"tensors": [["x", "object", [1]]]}, p[:8]),
        "observe_ids_pickle": frame(OP["OBSERVE"], {"tensors": [["ids", "int64", [n8 // 8]]]},
                                    p + b"\0" * (n8 - len(p))),
        "add_wrong_shape_pickle": frame(OP["ADD"], {"tensors": [["x", "uint8", [len(p)]], ["y", "int64", [0]],
                                                                ["task", "int16", [0]]]}, p),
        "memory_name_pickle": frame(OP["HELLO"], {"memory": pickle.dumps(_Trap(str(marker)), 0).decode("latin1")}),
    }
    for name, data in cases.items():
        s = connect_raw(d.socket)
        try:
            if not name.startswith(("meta_is", "mp_", "pickle_as", "memory_name")):
                hello(s)
            s.sendall(data)
            f = recv_frame(s)
            assert f is not None and f[0] == OP["ERROR"], (name, f)
        finally:
            s.close()
        assert c.stats()["added"] == sum(len(i) for i, _ in sent), name
    time.sleep(0.2)
    assert not marker.exists(), "the daemon unpickled bytes it received"
    assert d.proc.poll() is None
    c.close()
    assert d.stop() == 0
    assert not marker.exists()


# ---- 14: too many clients; pipelining without reading replies -------------------------------------------
@pytest.mark.timeout(120)
def test_14_too_many_clients_refused(daemons):
    """RELIABILITY 14: beyond max_clients a HELLO is told "busy" and closed; no hang, no crash,
    and a freed slot goes to the next client. (Connections before HELLO: test_idle_connections.py.)"""
    d = daemons(daemon={"max_clients": 2}, metrics=False, tiers=None)
    c1 = carousel.connect(d.socket, use_shm=False)
    c2 = carousel.connect(d.socket, use_shm=False)
    c1.add(np.zeros((4, 3, 8, 8), np.uint8), [0, 1, 2, 3], 0)
    # A raw third connection is not refused for connecting (connections before HELLO take no
    # client slot: test_idle_connections.py): its HELLO is told "busy", then it is closed.
    s = connect_raw(d.socket)
    assert not closed_within(s, 0.3)
    op, meta, _ = request(s, OP["HELLO"], {"memory": "default", "pid": os.getpid(), "version": 1})
    assert op == OP["ERROR"] and meta["error"] == "busy" and "max_clients=2" in meta["message"], meta
    assert closed_within(s, 5.0)
    s.close()
    # The client library sees a typed error, not a hang.
    for _ in range(5):
        t0 = time.monotonic()
        with pytest.raises((carousel.RemoteError, ConnectionError)) as ei:
            carousel.connect(d.socket, reconnect_s=0, use_shm=False)
        assert time.monotonic() - t0 < 5
        if isinstance(ei.value, carousel.RemoteError):
            assert ei.value.kind == "busy"
    assert c1.stats()["added"] == 4 and c2.stats()["added"] == 4
    # A slot frees up when a client leaves.
    c1.close()
    c3 = wait_for(lambda: _try_connect(d.socket), 5.0)
    assert c3 is not None, "a freed client slot was never given to a new client"
    assert c3.stats()["added"] == 4 and c2.stats()["added"] == 4
    c2.close()
    c3.close()
    assert d.proc.poll() is None
    assert d.stop() == 0


def _try_connect(path):
    try:
        return carousel.connect(path, reconnect_s=0, use_shm=False)
    except (carousel.RemoteError, ConnectionError):
        return None


@pytest.mark.timeout(180)
def test_14_pipelined_requests_backpressure(daemons):
    """RELIABILITY 14: requests pipelined without reading replies are back-pressured, never
    buffered whole; other clients are served meanwhile."""
    d = daemons(daemon={"max_inflight": 1}, metrics=False, tiers=None)
    other = carousel.connect(d.socket, use_shm=False)
    _add_rows(other, 64)
    rss0 = rss_bytes(d.pid)

    n_req = 1500
    req = frame(OP["SAMPLE"], {"n": 64, "pad": "p" * 8000})   # ~8 KiB in, ~12 KiB back
    s = connect_raw(d.socket)
    hello(s)
    s.setblocking(False)
    total = n_req * len(req)
    blob = memoryview(req * n_req)
    sent = 0
    # Send without ever reading: the daemon must stop reading us (back-pressure), not buffer it all.
    deadline = time.monotonic() + 20
    while sent < total and time.monotonic() < deadline:
        _, w, _ = select.select([], [s], [], 1.0)
        if not w:
            break  # not writable for a whole second: we are being back-pressured
        try:
            sent += s.send(blob[sent:sent + (1 << 16)])
        except BlockingIOError:
            pass
    assert sent < total, "the daemon accepted every pipelined request without anyone reading a reply"
    assert d.proc.poll() is None
    # Others are served meanwhile, including concurrent ones under max_inflight=1.
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with carousel.connect(d.socket, use_shm=False) as c:
                for i in range(20):
                    assert c.stats()["added"] == 64
                    assert len(c.sample(16, seed=k * 100 + i).ids) == 16
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert rss_bytes(d.pid) - rss0 < 64 << 20, "the daemon buffered the pipeline in memory"

    # Now read: every request is answered, in order, none dropped.
    s.setblocking(True)
    s.settimeout(30)
    got = [0]

    def reader() -> None:
        while got[0] < n_req:
            f = recv_frame(s)
            if f is None:
                return
            assert f[0] == OP["OK"], f[1]
            got[0] += 1
    rt = threading.Thread(target=reader)
    rt.start()
    s.sendall(blob[sent:])
    rt.join(60)
    assert got[0] == n_req
    s.close()

    # A second pipeline, abandoned mid-way (closed with replies unread): the daemon copes.
    s = connect_raw(d.socket)
    hello(s)
    s.setblocking(False)
    try:
        for _ in range(200):
            try:
                s.send(req)
            except BlockingIOError:
                break
    finally:
        s.close()
    assert wait_for(lambda: other.status()["clients"] == 1, 10), other.status()["clients"]
    assert other.stats()["added"] == 64
    other.close()
    assert d.proc.poll() is None
    assert d.stop() == 0
