"""An acknowledgement of durability comes only from the daemon that received the adds
(RELIABILITY.md item 21): a daemon killed and restarted by a supervisor (systemd's ``Restart=``)
while a client waits in ``flush``/``checkpoint`` makes the call raise
:class:`~carousel.DaemonRestartedError`, or else every sample it acknowledges is stored, byte for
byte, after the restart. Real daemon processes, real signals, the real LMDB tier read back directly.
"""

from __future__ import annotations

import os
import random
import signal
import threading

import numpy as np
import pytest

import carousel
from carousel.daemon import wire
from storage_backends import open_store
from tests.daemon import rawwire
from tests.daemon.harness import DaemonProc, start_daemon

SHAPE = (3, 32, 32)
MEMORY = {"em_size": 64, "sample_shape": list(SHAPE)}
BATCH, BATCHES = 250, 6  # 1,500 samples a round, as in the report


class Supervisor:
    """Keeps one daemon on one profile running, as systemd would: ``kill_and_restart`` SIGKILLs it
    and starts it again on the same socket, data and tier."""

    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.flash = tmp_path / "d" / "data" / "flash"
        self.restarts = 0
        self.d = self._start()

    def _start(self) -> DaemonProc:
        return start_daemon(self.tmp, memory=MEMORY, metrics=False, write_behind={"batch": 8},
                            tiers=[{"kind": "lmdb", "path": str(self.flash), "capacity": 100_000}])

    def kill_and_restart(self) -> None:
        self.d.proc.send_signal(signal.SIGKILL)
        self.d.proc.wait()
        self.d.close()  # the dead daemon's shared memory
        self.d = self._start()
        self.restarts += 1


def _samples(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose bytes name their key (so a stored id can be checked against what it was given for)."""
    x = np.zeros((keys.size, *SHAPE), np.uint8)
    x.reshape(keys.size, -1)[:, :8] = keys.astype("<u8").view(np.uint8).reshape(-1, 8)
    x.reshape(keys.size, -1)[:, 8:] = (keys[:, None] * 7 + np.arange(x[0].size - 8)) % 251
    return x, keys % 10


@pytest.mark.slow
def test_an_acknowledgement_never_outlives_the_daemon_that_received_the_adds(tmp_path):
    rng = random.Random(19)
    sup = Supervisor(tmp_path)
    client = carousel.connect(sup.d.socket, reconnect_s=60)
    acked: dict[int, int] = {}  # id -> key, for every sample a flush/checkpoint acknowledged
    next_key = 0
    outcomes = []
    try:
        for round_ in range(8):
            # Even rounds: the daemon is frozen (SIGSTOP) with the adds still queued, the call is
            # sent, and the supervisor kills and restarts it while the call waits. Odd rounds: the
            # kill comes at a random moment around the call.
            frozen = round_ % 2 == 0
            pending: dict[int, int] = {}
            for _ in range(BATCHES):
                keys = np.arange(next_key, next_key + BATCH)
                next_key += BATCH
                x, y = _samples(keys)
                pending.update(zip(client.add(x, y, task=round_).tolist(), keys.tolist()))
            if frozen:
                os.kill(sup.d.pid, signal.SIGSTOP)
                killer = threading.Timer(0.3, sup.kill_and_restart)
            else:
                killer = threading.Timer(rng.uniform(0.0, 0.05), sup.kill_and_restart)
            call = client.flush if round_ % 4 < 2 else client.checkpoint
            killer.start()
            try:
                call()
            except carousel.DaemonRestartedError as exc:
                assert exc.samples == len(pending), (exc.samples, len(pending))
                assert str(len(pending)) in str(exc)
                outcomes.append((frozen, "raised"))
            else:
                acked.update(pending)
                outcomes.append((frozen, "acknowledged"))
            finally:
                killer.join()
        assert sup.restarts == 8
        # After the last restart the client works on the new daemon, and its acks are real again.
        keys = np.arange(next_key, next_key + BATCH)
        x, y = _samples(keys)
        ids = client.add(x, y, task=9)
        client.flush()
        acked.update(zip(ids.tolist(), keys.tolist()))
    finally:
        client.close()
        sup.d.close()
    assert sup.d.proc.returncode == 0
    with open_store(f"lmdb://{sup.flash}") as store:
        ids = np.array(sorted(acked), dtype=np.int64)
        assert store.contains(ids).all(), f"{int((~store.contains(ids)).sum())} acknowledged samples are gone"
        got = store.get_many(ids)["x"]
        want, _ = _samples(np.array([acked[i] for i in ids.tolist()]))
        assert np.array_equal(got, want), "a stored id holds another sample than the one it was given for"
    # Frozen with the adds queued, killed during the call: that call can only raise.
    assert all(o == "raised" for frozen, o in outcomes if frozen), outcomes


def test_a_clean_restart_loses_nothing_and_raises_nothing(tmp_path):
    """SIGTERM drains, flushes and checkpoints: the next daemon says so in HELLO, and the client's
    unacknowledged adds are known durable."""
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
    client = carousel.connect(d.socket, reconnect_s=60)
    try:
        x, y = _samples(np.arange(100))
        client.add(x, y, task=0)
        first = client.session
        assert d.stop() == 0
        d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
        client.flush()  # reconnects to the new session; nothing raised
        assert client.session != first
        assert client.stats()["tiers"]["0-lmdb"]["samples"] == 100
    finally:
        client.close()
        d.close()


def test_the_daemon_refuses_to_acknowledge_for_another_session(tmp_path):
    """A FLUSH/CHECKPOINT/RETAIN naming another session gets an ERROR of kind ``session``."""
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
    try:
        sock = rawwire.connect_raw(d.socket)
        hello = rawwire.hello(sock)
        assert len(hello["session"]) == 32
        for op in ("FLUSH", "CHECKPOINT"):
            rop, meta, _ = rawwire.request(sock, rawwire.OP[op], {"session": "0" * 32})
            assert rop == wire.Op.ERROR and meta["error"] == "session", meta
            rop, meta, _ = rawwire.request(sock, rawwire.OP[op], {"session": hello["session"]})
            assert rop == wire.Op.OK, meta
        sock.close()
    finally:
        d.close()


def test_a_slow_flush_is_awaited_not_cut_off_and_sent_again(tmp_path):
    """A flush may take the daemon up to its ``timeout_s``; the client waits that long beyond its own
    socket timeout instead of dropping the connection and asking again."""
    d = start_daemon(tmp_path, memory=MEMORY, metrics=False)
    client = carousel.connect(d.socket, timeout_s=0.5)
    try:
        x, y = _samples(np.arange(50))
        client.add(x, y, task=0)
        first_socket = client._sock
        os.kill(d.pid, signal.SIGSTOP)  # the daemon busy for 1.5 s: longer than timeout_s
        threading.Timer(1.5, os.kill, (d.pid, signal.SIGCONT)).start()
        client.flush(timeout_s=10)
        assert client._sock is first_socket, "the client reconnected and sent the flush again"
        assert client.stats()["tiers"]["0-lmdb"]["samples"] == 50
    finally:
        client.close()
        d.close()
