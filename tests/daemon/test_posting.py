"""Posting: ``add`` and ``observe`` sent without waiting for a reply (docs/protocol.md, "Posting").

Every test runs a real ``carousel serve`` and real clients. What is checked: ids come from leases
and are never handed out twice, also across clients and reconnects; replies are read in order, so a
later call sees the effect of every earlier posted one; a failure the daemon reports for a posted
request is raised by the next call (and stops a flush from acknowledging); the number of posted
requests in flight is bounded (the client waits for the daemon instead); a daemon killed with
posted adds in flight is reported, never silently forgotten; and LEASE/ADD {first} refuse ids the
connection was not given.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import carousel
from carousel.daemon import client as client_module
from carousel.daemon import shm, wire
from storage_backends import open_store

from .harness import start_daemon
from .rawwire import connect_raw, frame, hello, recv_frame, request

SHAPE = (3, 4, 4)
MEMORY = {"em_size": 256, "sample_shape": list(SHAPE)}


def _batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
    yield d
    d.close()


def test_posted_adds_are_stored_in_order_and_count_once(daemon, tmp_path):
    c = carousel.connect(daemon.socket)
    try:
        assert c._posting
        sent = []
        for i in range(20):
            x, y = _batch(7, i)
            ids = c.add(x, y, task=0)
            sent.append((ids, x))
        ids_all = torch.cat([ids for ids, _ in sent]).numpy()
        assert ids_all.tolist() == list(range(140)), "one client's ids: consecutive from its lease"
        assert c._in_flight or True  # (replies may or may not have come yet)
        # A synchronous call reads the posted replies first: the daemon applied them all before it.
        st = c.stats()
        assert st["added"] == 140, "leased ids not used yet must not count as added"
        everything = c.sample(256, seed=0)  # drawn when asked: sees every add before it
        assert sorted(everything.ids.tolist()) == list(range(140))
        c.flush()
    finally:
        c.close()
    tier = tmp_path / "d" / "data" / "flash"
    daemon.stop()
    with open_store(f"lmdb://{tier}") as store:
        for ids, x in sent:
            assert np.array_equal(store.get_many(ids.numpy())["x"], x)


def test_two_clients_never_share_an_id_and_leases_go_back(daemon):
    a, b = carousel.connect(daemon.socket), carousel.connect(daemon.socket)
    try:
        got = []
        for i in range(10):
            got.append(a.add(*_batch(5, i), task=0))
            got.append(b.add(*_batch(3, 100 + i), task=0))
        ids = torch.cat(got).numpy()
        assert ids.size == np.unique(ids).size == 80
        assert a.stats()["added"] == 80
        a_top = max(int(t.max()) for t in got[0::2])
        assert min(int(t.min()) for t in got[1::2]) > a_top, "b's lease was granted after a's"
        b.close()  # b's unused ids were the last handed out: they go back to the counter
        time.sleep(0.2)
        assert a.stats()["added"] == 80
    finally:
        a.close()  # a's lie below b's used ones: kept aside, and leased again (no sample had them)
    with carousel.connect(daemon.socket) as c:
        new = c.add(*_batch(2, 7), task=0)
        assert new.tolist() == [a_top + 1, a_top + 2]
        assert c.stats()["added"] == 82
        assert not set(new.tolist()) & set(ids.tolist())


def test_a_failed_posted_request_is_raised_by_the_next_call_and_blocks_the_flush(daemon):
    c = carousel.connect(daemon.socket)
    try:
        c.add(*_batch(4, 0), task=0)
        x, y = _batch(3, 1)
        tensors = [("x", x), ("y", y), ("task", np.zeros(3, np.int16))]
        with c._lock:  # an add naming ids this connection was never leased: the daemon refuses it
            c._post(wire.Op.ADD, {"first": 10**9}, tensors, 10**9, 3)
        with pytest.raises(carousel.RemoteError, match="ids come from LEASE") as raised:
            c.flush()
        assert any("earlier add()" in note and "were not added" in note for note in raised.value.__notes__)
        c.flush()  # raised once; the client goes on
        assert c.stats()["added"] == 4
    finally:
        c.close()


def test_in_flight_requests_are_bounded_by_waiting_for_the_daemon(daemon):
    c = carousel.connect(daemon.socket)
    try:
        ids = c.add(*_batch(8, 0), task=0)
        c.stats()
        os.kill(daemon.pid, signal.SIGSTOP)
        done = threading.Event()

        def observe_many():
            for _ in range(client_module._MAX_IN_FLIGHT + 10):
                c.observe(ids, loss=torch.ones(8))
            done.set()
        t = threading.Thread(target=observe_many, daemon=True)
        t.start()
        try:
            assert not done.wait(1.0), "posted observes piled up without bound while the daemon was stopped"
            assert len(c._in_flight) == client_module._MAX_IN_FLIGHT + 1
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert done.wait(30), "the client did not resume once the daemon did"
        t.join()
        c.stats()
        assert not c._in_flight
    finally:
        c.close()


@pytest.mark.parametrize("per_add", [5, 1500], ids=["inline", "upload-segment"])
def test_a_daemon_killed_with_posted_adds_in_flight_is_reported(tmp_path, per_add):
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
    c = carousel.connect(d.socket, reconnect_s=30)
    try:
        c.add(*_batch(per_add, 0), task=0)  # (a large one: the client has its upload segment now)
        c.flush()
        os.kill(d.pid, signal.SIGSTOP)  # the next adds are sent, never answered
        for i in range(3):
            c.add(*_batch(per_add, i + 1), task=0)  # 1,500 samples: 72 KB, through the upload segment
        assert bool(c._upload_ring) == (per_add > 5)
        d.proc.kill()
        d.proc.wait()
        d.close()
        d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
        # The call after: the samples in flight went to a daemon that died without storing them.
        with pytest.raises(carousel.DaemonRestartedError) as lost:
            c.flush()
        assert lost.value.samples == 3 * per_add
        assert c.stats()["added"] >= per_add  # the client works on the new daemon
        ids = c.add(*_batch(per_add, 9), task=0)  # (a new connection: a new upload segment)
        c.flush()
        assert ids.numel() == per_add and c.stats()["added"] >= 2 * per_add
    finally:
        c.close()
        d.close()


def test_a_stats_call_after_a_killed_daemon_says_what_was_in_flight(tmp_path):
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
    c = carousel.connect(d.socket, reconnect_s=30)
    try:
        c.add(*_batch(1, 0), task=0)
        c.flush()  # the client holds a lease now
        os.kill(d.pid, signal.SIGSTOP)
        c.add(*_batch(6, 0), task=0)
        d.proc.kill()
        d.proc.wait()
        d.close()
        d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
        with pytest.raises(carousel.InFlightLostError, match="6 added sample"):
            c.stats()
        assert c.stats()["added"] >= 0  # raised once; then the new daemon answers
    finally:
        c.close()
        d.close()


def test_lease_and_first_are_checked_at_the_door(daemon):
    sock = connect_raw(daemon.socket)
    try:
        hello(sock)
        for bad in (0, -1, 1 << 20, "8", True):
            rop, meta, _ = request(sock, wire.Op.LEASE, {"n": bad})
            assert rop == wire.Op.ERROR and meta["error"] == "input", (bad, meta)
        rop, meta, _ = request(sock, wire.Op.LEASE, {"n": 4})
        assert rop == wire.Op.OK and meta["n"] == 4
        first = meta["first"]
        x, y = _batch(3, 0)
        specs = [["x", "uint8", list(x.shape)], ["y", "int64", [3]], ["task", "int16", [3]]]
        payload = x.tobytes() + y.astype(np.int64).tobytes() + np.zeros(3, np.int16).tobytes()
        for wrong in (first + 1, first - 1, "0"):  # not the next leased id
            rop, meta, _ = request(sock, wire.Op.ADD, {"first": wrong, "tensors": specs}, payload)
            assert rop == wire.Op.ERROR and meta["error"] == "input", (wrong, meta)
        rop, meta, _ = request(sock, wire.Op.ADD, {"first": first, "tensors": specs}, payload)
        assert rop == wire.Op.OK and "tensors" not in meta or not meta["tensors"], meta
        # Two ids are left in the lease: an add of three overruns it, and takes nothing.
        rop, meta, _ = request(sock, wire.Op.ADD, {"first": first + 3, "tensors": specs}, payload)
        assert rop == wire.Op.ERROR and "holding 1 leased" in meta["message"], meta
        rop, meta, _ = request(sock, wire.Op.STATS)
        assert meta["added"] == 3
        # Requests sent back to back, replies read after: answered in order.
        sock.sendall(frame(wire.Op.PING, {}) + frame(wire.Op.STATS, {}) + frame(wire.Op.PING, {}))
        ops = [recv_frame(sock)[0] for _ in range(3)]
        assert ops == [wire.Op.OK] * 3
    finally:
        sock.close()


def test_a_deterministic_memory_takes_adds_that_wait(tmp_path):
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False, swap={"deterministic": True})
    try:
        with carousel.connect(d.socket) as c:
            ids = c.add(*_batch(5, 0), task=0)
            assert not c._in_flight and not c._leases, "a deterministic memory's adds are not posted"
            c.observe(ids, loss=torch.ones(5))  # known ids: posted
            assert c.stats()["added"] == 5
    finally:
        d.close()


def test_large_posted_adds_travel_in_regions_of_the_upload_segment(tmp_path, monkeypatch):
    # A ring for three adds: the client runs out of room while the daemon is stopped, waits for it
    # (never overwriting an add the daemon has not copied yet), and wraps many times after.
    monkeypatch.setattr(client_module, "_UPLOAD_RING_ADDS", 3)
    monkeypatch.setattr(client_module, "_UPLOAD_RING_MIN", 1)
    frames: list[tuple[int, int]] = []
    send = client_module._send_parts

    def recording(sock, parts):
        frames.append((parts[0][5], sum(len(memoryview(p).cast("B")) for p in parts)))
        send(sock, parts)
    monkeypatch.setattr(client_module, "_send_parts", recording)
    d = start_daemon(tmp_path, memory={"em_size": 256, "sample_shape": [3, 32, 32]}, metrics=False)
    c = carousel.connect(d.socket)
    sent: list[tuple[torch.Tensor, np.ndarray]] = []
    rng = np.random.default_rng(0)

    def add(n: int) -> None:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # n * 3 KiB > 64 KiB: not inline
        sent.append((c.add(x, rng.integers(0, 10, n), task=0), x))
    try:
        try:
            add(32)
            c.stats()
            assert c._upload_ring is not None and c._upload.size >= 3 * 32 * 3072
            os.kill(d.pid, signal.SIGSTOP)
            poster = threading.Thread(target=lambda: [add(32) for _ in range(5)], daemon=True)
            poster.start()
            try:
                poster.join(1.0)
                assert poster.is_alive(), "five adds posted into a three-add segment while the daemon was stopped"
                assert len(c._upload_ring) == 3, "the client waits once the segment is full, not before"
            finally:
                os.kill(d.pid, signal.SIGCONT)
            poster.join(30)
            assert not poster.is_alive()
            for n in rng.integers(24, 48, 40):  # sizes vary: regions wrap at varying places, the segment grows
                add(int(n))
            c.flush()
            assert c.stats()["added"] == sum(int(ids.numel()) for ids, _ in sent)
        finally:
            c.close()
        adds = [size for op, size in frames if op == wire.Op.ADD]
        assert len(adds) == len(sent) and max(adds) < 4096, "the samples went through the segment, not the socket"
        d.stop()
        with open_store(f"lmdb://{tmp_path / 'd' / 'data' / 'flash'}") as store:
            for ids, x in sent:
                assert np.array_equal(store.get_many(ids.numpy())["x"], x), "a sample was overwritten in the segment"
    finally:
        d.close()  # (a failed assertion must not leave the daemon running)


def test_an_upload_offset_is_checked_at_the_door(daemon, tmp_path):
    sock = connect_raw(daemon.socket)
    try:
        hello(sock)
        rop, meta, _ = request(sock, wire.Op.UPLOAD, {"nbytes": 4096})
        assert rop == wire.Op.OK
        segment = shm.Segment.attach(meta["segment"], int(meta["size"]))
        rop, meta, _ = request(sock, wire.Op.LEASE, {"n": 8})
        first = meta["first"]
        x, y = _batch(3, 0)
        specs = [["x", "uint8", list(x.shape)], ["y", "int64", [3]], ["task", "int16", [3]]]
        payload = x.tobytes() + y.astype(np.int64).tobytes() + np.zeros(3, np.int16).tobytes()
        at = segment.size - len(payload)  # the last bytes of the segment: fits exactly
        segment.map[at:at + len(payload)] = payload
        for bad in (-1, "0", True, 1.5, at + 1, 1 << 40):
            rop, meta, _ = request(sock, wire.Op.ADD, {"first": first, "upload": True, "offset": bad, "tensors": specs})
            assert rop == wire.Op.ERROR and meta["error"] == "input", (bad, meta)
        rop, meta, _ = request(sock, wire.Op.ADD, {"first": first, "offset": 0, "tensors": specs}, payload)
        assert rop == wire.Op.ERROR and "offset is for an ADD from the upload segment" in meta["message"], meta
        rop, meta, _ = request(sock, wire.Op.ADD, {"first": first, "upload": True, "offset": at, "tensors": specs})
        assert rop == wire.Op.OK, meta
        rop, meta, _ = request(sock, wire.Op.STATS)
        assert meta["added"] == 3, "the refused adds took nothing; the connection kept serving"
        assert request(sock, wire.Op.FLUSH, {})[0] == wire.Op.OK
        segment.close()
    finally:
        sock.close()
    daemon.stop()
    with open_store(f"lmdb://{tmp_path / 'd' / 'data' / 'flash'}") as store:
        assert np.array_equal(store.get_many(np.arange(first, first + 3))["x"], x), "read from the offset named"


def test_without_shared_memory_for_the_segment_posted_adds_go_inline(daemon, tmp_path, monkeypatch):
    # /dev/shm full (a container's 64 MB): the add still happens, through the socket, as before.
    def no_room(*args, **kwargs):
        raise shm.ShmError(28, "cannot allocate shared memory: No space left on device")
    monkeypatch.setattr(client_module.Segment, "attach", no_room)
    c = carousel.connect(daemon.socket)
    try:
        x, y = _batch(1500, 0)  # 72 KB: a posted add through the segment, were there room
        ids = c.add(x, y, task=0)
        assert not c._posted_upload and c._upload is None and c._in_flight, "posted inline instead"
        ids2 = c.add(*_batch(1500, 1), task=0)
        c.flush()
        assert c.stats()["added"] == 3000 and ids2[0] == ids[-1] + 1
    finally:
        c.close()
    daemon.stop()
    with open_store(f"lmdb://{tmp_path / 'd' / 'data' / 'flash'}") as store:
        assert np.array_equal(store.get_many(ids.numpy())["x"], x)
