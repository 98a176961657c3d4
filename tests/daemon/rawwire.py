"""Helpers for the daemon's reliability tests: raw frames on a plain socket, process readings,
and a fixture that starts daemons and always stops them (and their /dev/shm segments).

The raw frames are built here by hand (not with ``wire.encode``) so a test can break any field.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from pathlib import Path

import google_crc32c
import pytest

from carousel.daemon import shm

from .harness import DaemonProc, start_daemon

MAGIC = b"CRSL"
HEADER = struct.Struct("<4sBBHIQI")
OP = {"HELLO": 1, "ADD": 2, "SAMPLE": 3, "OBSERVE": 4, "STATS": 5, "CHECKPOINT": 6, "FLUSH": 7,
      "SUBSCRIBE": 8, "UNSUBSCRIBE": 9, "UPLOAD": 10, "STATUS": 11, "PING": 12, "OK": 128, "ERROR": 129}


def crc32c(*parts: bytes) -> int:
    c = google_crc32c.Checksum(b"")
    for p in parts:
        if p:
            c.update(bytes(p))
    return int.from_bytes(c.digest(), "big")


def frame(op: int, meta: dict | None = None, payload: bytes = b"", *, meta_raw: bytes | None = None,
          magic: bytes = MAGIC, version: int = 1, flags: int = 0, meta_len: int | None = None,
          payload_len: int | None = None, crc: int | None = None) -> bytes:
    """One frame as bytes; every header field can be overridden (the checksum is right unless given)."""
    body = meta_raw if meta_raw is not None else (json.dumps(meta, separators=(",", ":")).encode()
                                                    if meta is not None else b"")
    ml = len(body) if meta_len is None else meta_len
    pl = len(payload) if payload_len is None else payload_len
    head20 = HEADER.pack(magic, version, op, flags, ml, pl, 0)[:20]
    if crc is None:
        crc = crc32c(head20, body, payload)
    return head20 + struct.pack("<I", crc) + body + payload


def connect_raw(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None when the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[int, dict, bytes] | None:
    """The next frame ``(op, meta, payload)`` (checksum verified), or None on EOF."""
    head = recv_exact(sock, HEADER.size)
    if head is None:
        return None
    magic, version, op, flags, ml, pl, crc = HEADER.unpack(head)
    assert magic == MAGIC and version == 1, head
    body = recv_exact(sock, ml + pl) if ml + pl else b""
    assert body is not None, "the daemon closed mid-frame"
    assert crc32c(head[:20], body[:ml], body[ml:]) == crc, "reply failed its checksum"
    return op, (json.loads(body[:ml]) if ml else {}), body[ml:]


def request(sock: socket.socket, op: int, meta: dict | None = None, payload: bytes = b"") -> tuple[int, dict, bytes]:
    sock.sendall(frame(op, meta if meta is not None else {}, payload))
    reply = recv_frame(sock)
    assert reply is not None, f"the daemon closed the connection instead of answering op {op}"
    return reply


def hello(sock: socket.socket, memory: str = "default") -> dict:
    op, meta, _ = request(sock, OP["HELLO"], {"memory": memory, "pid": os.getpid(), "version": 1})
    assert op == OP["OK"], meta
    return meta


def _readable(sock: socket.socket, timeout: float) -> bool:
    # poll, not select: a test holding a thousand sockets has descriptors beyond select's 1,024.
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(max(timeout, 0.0) * 1000))


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout`` seconds; data read meanwhile is dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if _readable(sock, left):
            try:
                if not sock.recv(1 << 16):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True


def still_open(sock: socket.socket) -> bool:
    """No EOF pending on ``sock`` (nothing readable, or data but not a close)."""
    if not _readable(sock, 0):
        return True
    try:
        return bool(sock.recv(1 << 16, socket.MSG_PEEK))
    except (ConnectionResetError, BrokenPipeError):
        return False


def read_until_closed(socks: list[socket.socket], timeout: float) -> dict[int, tuple[float, bytes]]:
    """Wait for the peer to close each of ``socks``: ``{index: (monotonic time of the close, every
    byte received before it)}`` for those closed within ``timeout`` seconds."""
    p = select.poll()
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    got: dict[int, bytearray] = {i: bytearray() for i in range(len(socks))}
    for s in socks:
        p.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    out: dict[int, tuple[float, bytes]] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(socks):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in p.poll(left * 1000):
            i = by_fd[fd]
            try:
                chunk = socks[i].recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if chunk:
                got[i] += chunk
            else:
                out[i] = (time.monotonic(), bytes(got[i]))
                p.unregister(fd)
    return out


def frames_in(data: bytes) -> list[tuple[int, dict]]:
    """The whole frames ``(op, meta)`` in a byte string received from the daemon."""
    out = []
    while len(data) >= HEADER.size:
        magic, version, op, flags, ml, pl, crc = HEADER.unpack(data[:HEADER.size])
        assert magic == MAGIC, data[:HEADER.size]
        end = HEADER.size + ml + pl
        if len(data) < end:
            break
        out.append((op, json.loads(data[HEADER.size:HEADER.size + ml]) if ml else {}))
        data = data[end:]
    return out


def metric_values(d: DaemonProc) -> dict[tuple[str, frozenset], float]:
    """Every sample on the daemon's /metrics, keyed by ``(name, frozenset(labels.items()))``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(d.metrics_text()) for s in fam.samples}


def metric_sum(values: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in values.items() if n == name and want <= lab)



def segments_of(pid: int) -> list[str]:
    """Carousel segments in /dev/shm that daemon ``pid`` owns (by name)."""
    return [n for n in shm.segment_names(os.getuid()) if n.split("-")[2] == str(pid)]


def unlink_segments(pid: int) -> None:
    for name in segments_of(pid):
        try:
            os.unlink(os.path.join(shm.SHM_DIR, name))
        except FileNotFoundError:
            pass


def wait_for(pred, timeout: float, interval: float = 0.05):
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes (last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def own_records(d: DaemonProc) -> list[dict]:
    """The JSON log records this daemon wrote (a restart under the same name appends to the same
    log file; :func:`daemons` notes where this daemon's part begins)."""
    raw = d.log_path.read_bytes()[getattr(d, "log_offset", 0):].decode(errors="replace")
    out = []
    for line in raw.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def log_has(d: DaemonProc, msg: str, **fields) -> bool:
    return any(r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items()) for r in own_records(d))


@pytest.fixture
def daemons(tmp_path: Path):
    """``start(**kwargs) -> DaemonProc`` (see :func:`start_daemon`); every daemon started is killed
    at teardown and the segments it left in /dev/shm are removed."""
    started: list[DaemonProc] = []

    def start(**kwargs) -> DaemonProc:
        log_path = tmp_path / kwargs.get("name", "d") / "daemon.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        d = start_daemon(tmp_path, **kwargs)
        d.log_offset = offset
        started.append(d)
        if kwargs.get("wait", True):
            # "serving" from this very process (a restart's log also holds the previous one's).
            if not wait_for(lambda: log_has(d, "serving", pid=d.pid) or d.proc.poll() is not None, 60):
                raise RuntimeError(f"daemon not serving within 60 s:\n{d.log()}")
            if d.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.log()}")
        return d

    start.started = started
    yield start
    for d in started:
        d.kill()
        unlink_segments(d.pid)
