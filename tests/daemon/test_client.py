"""The client API against a real ``carousel serve`` subprocess: what goes in comes back out.

Every test starts its own daemon (about a second) on a profile under ``tmp_path``; clients are the
test process itself, its threads, 'spawn' child processes and ``DataLoader`` workers.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.data import DataLoader

import carousel
from carousel.daemon import client as client_module
from tests.daemon import workers
from tests.daemon.harness import start_daemon

REPO = Path(__file__).resolve().parents[2]
SHAPE = (3, 8, 8)
LOGITS = {"logits": {"shape": [10], "dtype": "float32"}}
EXTRAS_MEMORY = {"em_size": 64, "sample_shape": list(SHAPE), "extras": LOGITS}


@pytest.fixture
def make_daemon(tmp_path):
    """``make_daemon(memory=..., ...)`` starts a daemon; every one is stopped (and its /dev/shm
    checked clean) when the test ends."""
    started = []

    def make(**kw):
        kw.setdefault("memory", dict(EXTRAS_MEMORY))
        d = start_daemon(tmp_path, **kw)
        started.append(d)
        return d

    yield make
    leftovers = []
    for d in started:
        d.close()
        leftovers += d.shm_segments()
    assert not leftovers, f"shared memory left behind: {leftovers}"


@pytest.fixture
def client_of():
    clients = []

    def connect(d, **kw):
        c = carousel.connect(d.socket, **kw)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


def data(n: int, seed: int = 0, classes: int = 5, task=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    t = torch.full((n,), task, dtype=torch.int16) if isinstance(task, int) else torch.as_tensor(task)
    logits = torch.randn(n, 10, generator=g)
    return x, y, t, logits


class Added:
    """What was added, by id: checks a batch against it."""

    def __init__(self):
        self.rows: dict[int, tuple] = {}

    def record(self, ids, x, y, t, logits=None):
        for k, i in enumerate(ids.tolist()):
            self.rows[i] = (x[k], int(y[k]), int(t[k]), None if logits is None else logits[k])

    def check(self, b: carousel.Batch) -> None:
        ids = b.ids.tolist()
        assert len(set(ids)) == len(ids), f"duplicate ids in a batch: {ids}"
        for k, i in enumerate(ids):
            assert i in self.rows, f"id {i} was never added"
            x, y, t, lg = self.rows[i]
            assert torch.equal(b.x[k], x), f"x of id {i} differs from what was added"
            assert int(b.y[k]) == y and int(b.task[k]) == t, f"y/task of id {i}"
            if lg is not None:
                assert torch.equal(b.extras["logits"][k], lg), f"logits of id {i}"


def check_types(b: carousel.Batch, n: int, extras: bool = True) -> None:
    assert len(b) == n
    assert b.ids.dtype == torch.int64 and b.ids.shape == (n,)
    assert b.x.dtype == torch.uint8 and b.x.shape == (n, *SHAPE)
    assert b.y.dtype == torch.int64 and b.y.shape == (n,)
    assert b.task.dtype == torch.int16 and b.task.shape == (n,)
    if extras:
        assert set(b.extras) == {"logits"}
        assert b.extras["logits"].dtype == torch.float32 and b.extras["logits"].shape == (n, 10)
    else:
        assert b.extras == {}


def metric(d, name: str, **labels) -> float:
    """One sample's value from the daemon's /metrics (0 when absent)."""
    for fam in text_string_to_metric_families(d.metrics_text()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def shm_ranges(daemon_pid: int) -> list[tuple[int, int]]:
    """Address ranges of this process mapping the daemon's /dev/shm segments."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith(f"/dev/shm/carousel-{os.getuid()}-{daemon_pid}-"):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                out.append((lo, hi))
    return out


# ---- add / sample --------------------------------------------------------------------------------------
def test_add_sample_round_trip(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    assert c.schema == {"x": (SHAPE, "uint8"), "y": ((), "int64"), "task": ((), "int16"), "logits": ((10,), "float32")}
    added = Added()
    x, y, t, lg = data(40, task=[0] * 20 + [1] * 20)
    ids = c.add(x, y, t, logits=lg)
    assert ids.dtype == torch.int64 and ids.shape == (40,) and len(set(ids.tolist())) == 40
    added.record(ids, x, y, t, lg)
    for _ in range(10):  # the ring (the first may come over the socket while the ring fills)
        b = c.sample(16)
        check_types(b, 16)
        added.check(b)
    b = c.sample(16, seed=1)  # over the socket
    check_types(b, 16)
    added.check(b)
    b = c.sample(40, seed=2)  # everything
    assert sorted(b.ids.tolist()) == sorted(ids.tolist())
    added.check(b)
    check_types(c.sample(0), 0)
    # numpy input and an int task work too
    x2, y2, _, lg2 = data(8, seed=5)
    ids2 = c.add(x2.numpy(), y2.numpy(), 3, logits=lg2.numpy())
    added.record(ids2, x2, y2, torch.full((8,), 3), lg2)
    assert not set(ids2.tolist()) & set(ids.tolist())
    added.check(c.sample(48, seed=3))


def test_filters_and_balanced(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    added = Added()
    x, y, t, lg = data(40, task=[0] * 20 + [1] * 20)  # classes 0..4, 8 each; tasks 0 and 1
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    for seed in (None, 11):
        b = c.sample(16, classes=[1, 3], seed=seed)
        check_types(b, 16)
        added.check(b)
        assert set(b.y.tolist()) <= {1, 3}
        b = c.sample(16, tasks=[1], seed=seed)
        check_types(b, 16)
        assert set(b.task.tolist()) == {1}
        b = c.sample(16, classes=[1], tasks=torch.tensor([1]), seed=seed)  # only 4 such samples
        check_types(b, 4)
        added.check(b)
        assert set(b.y.tolist()) == {1} and set(b.task.tolist()) == {1}
        check_types(c.sample(8, classes=[99], seed=seed), 0)

    d2 = make_daemon(name="skewed")
    c2 = client_of(d2)
    y = torch.tensor([0] * 50 + [1] * 5)
    x, _, t, lg = data(55, seed=3)
    c2.add(x, y, t, logits=lg)

    def class1_per_batch(seeded: bool, balanced: bool) -> float:
        counts = [int((c2.sample(10, seed=s if seeded else None, balanced=balanced).y == 1).sum()) for s in range(40)]
        return sum(counts) / len(counts)

    plain = class1_per_batch(seeded=True, balanced=False)
    balanced = class1_per_batch(seeded=True, balanced=True)
    balanced_ring = class1_per_batch(seeded=False, balanced=True)
    assert plain < 2.0, plain  # 10 * 5/55 ~ 0.9 expected
    assert balanced > 3.0 and balanced_ring > 3.0, (balanced, balanced_ring)  # classes equally likely


def test_seeded_sample_reproducible(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    x, y, t, lg = data(60)
    c.add(x, y, t, logits=lg)
    a, b = c.sample(16, seed=7), c.sample(16, seed=7)
    for f in ("ids", "x", "y", "task"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert torch.equal(a.extras["logits"], b.extras["logits"])
    assert not torch.equal(c.sample(16, seed=8).ids, a.ids)
    other = client_of(d)  # another connection draws the same
    assert torch.equal(other.sample(16, seed=7).ids, a.ids)
    assert torch.equal(other.sample(16, seed=7, classes=[2, 4]).ids, c.sample(16, seed=7, classes=[2, 4]).ids)
    # Unseeded draws in between do not disturb a seeded one.
    for _ in range(5):
        c.sample(16)
    assert torch.equal(c.sample(16, seed=7).ids, a.ids)


def test_observe_reaches_the_memory(make_daemon, client_of, tmp_path):
    d = make_daemon()
    c = client_of(d)
    x, y, t, lg = data(40)
    ids = c.add(x, y, t, logits=lg)
    b = c.sample(20, seed=0)
    logits = torch.full((20, 10), -5.0)
    right = torch.arange(20) % 2 == 0
    pred = torch.where(right, b.y, (b.y + 1) % 10)
    logits[torch.arange(20), pred] = 5.0
    loss = torch.arange(20, dtype=torch.float32) / 10
    assert c.observe(b.ids, logits=logits, loss=loss) is None
    c.observe(b.ids[:5], loss=loss[:5] + 100)  # loss only: the latest value wins
    c.observe(b.ids[5:10], logits=logits[5:10])  # logits only
    c.observe(torch.zeros(0, dtype=torch.int64))
    c.checkpoint()
    state = np.load(tmp_path / "d" / "data" / "flash-state" / "em-state.npz")
    sel = b.ids.numpy()
    want_loss = loss.numpy().copy()
    want_loss[:5] += 100
    np.testing.assert_allclose(state["loss"][sel], want_loss, rtol=1e-6)
    np.testing.assert_array_equal(state["correct"][sel], right.numpy().astype(np.int8))
    p = torch.softmax(logits, 1)
    np.testing.assert_allclose(state["entropy"][sel], -(p * p.log()).sum(1).numpy(), rtol=1e-4, atol=1e-6)
    replays = state["replays"]
    np.testing.assert_array_equal(replays[sel[:5]], 2)
    np.testing.assert_array_equal(replays[sel[5:10]], 2)
    np.testing.assert_array_equal(replays[sel[10:]], 1)
    unseen = np.setdiff1d(ids.numpy(), sel)
    assert (replays[unseen] == 0).all()


def test_stats_flush_checkpoint(make_daemon, client_of, tmp_path):
    d = make_daemon()
    c = client_of(d)
    x, y, t, lg = data(100)
    c.add(x[:50], y[:50], t[:50], logits=lg[:50])
    c.add(x[50:], y[50:], t[50:], logits=lg[50:])
    c.flush()
    st = c.stats()
    assert st["added"] == 100 and st["evicted"] == 0 and st["pending_writes"] == 0
    assert st["tiers"]["ram"] == {"samples": 64, "bytes": st["tiers"]["ram"]["bytes"], "capacity": 64}
    assert st["tiers"]["0-lmdb"]["samples"] == 100 and st["tiers"]["0-lmdb"]["capacity"] == 10000
    assert st["errors"] == {"write_behind": None, "swap": None}
    assert st["current_task"] == 0
    path = tmp_path / "d" / "data" / "flash-state" / "em-state.npz"
    assert not path.exists()
    c.checkpoint()
    state = np.load(path)
    em_ids = c.sample(64, seed=0).ids.numpy()  # the whole EM
    assert sorted(state["slot_ids"][state["slot_ids"] >= 0].tolist()) == sorted(em_ids.tolist())
    assert c.status()["memories"]["default"]["added"] == 100


def test_large_add_through_upload_and_small_inline(make_daemon, client_of, monkeypatch):
    # Adds up to _POST_MAX_BYTES are posted inline (test_posting.py); above it, the upload segment.
    monkeypatch.setattr(client_module, "_POST_MAX_BYTES", 1 << 16)
    d = make_daemon(memory={"em_size": 512, "sample_shape": list(SHAPE), "extras": LOGITS})
    c = client_of(d)
    added = Added()
    x, y, t, lg = data(10, seed=1)
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    assert metric(d, "carousel_requests_total", op="upload", result="ok") == 0
    base, base_metric = d.shm_segments(), metric(d, "carousel_shm_segments")  # the daemon's own, if any
    x, y, t, lg = data(400, seed=2, task=2)  # 400 * 242 B = 97 KB > 64 KiB
    assert x.numel() + y.numel() * 8 + t.numel() * 2 + lg.numel() * 4 > 1 << 16
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    assert metric(d, "carousel_requests_total", op="upload", result="ok") == 1
    segments = d.shm_segments()
    assert len(set(segments) - set(base)) == 1, (base, segments)
    assert metric(d, "carousel_shm_segments") == base_metric + 1
    x, y, t, lg = data(300, seed=3, task=3)  # fits the same segment: no new UPLOAD round trip
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    assert metric(d, "carousel_requests_total", op="upload", result="ok") == 1
    assert d.shm_segments() == segments
    x, y, t, lg = data(500, seed=4, task=3)  # bigger: the segment is replaced, still one per client
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    assert metric(d, "carousel_requests_total", op="upload", result="ok") == 2
    assert len(set(d.shm_segments()) - set(base)) == 1
    b = c.sample(512, seed=0)
    check_types(b, 512)
    added.check(b)
    c.close()
    assert _eventually(lambda: d.shm_segments() == base), "closing the client did not free its upload segment"
    assert metric(d, "carousel_shm_segments") == base_metric


def _eventually(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_zero_copy_batch_stays_valid_while_held(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    added = Added()
    x, y, t, lg = data(60)
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)

    def in_shm(b) -> bool:
        ranges = shm_ranges(d.pid)
        return all(any(lo <= v.data_ptr() < hi for lo, hi in ranges) for v in (b.ids, b.x, b.y, b.extras["logits"]))

    a = None
    for _ in range(200):
        b = c.sample(16)
        if in_shm(b):
            a = b
            break
    assert a is not None, "no batch came from the shared-memory ring"
    del b
    snapshot = {f: getattr(a, f).clone() for f in ("ids", "x", "y", "task")} | {"logits": a.extras["logits"].clone()}
    ring_before = metric(d, "carousel_ring_batches_total")
    held = []
    for i in range(50):
        b = c.sample(16)
        check_types(b, 16)
        added.check(b)
        if i in (0, 30):  # with A, 3 of the ring's 4 slots stay held; the 4th keeps cycling
            held.append((b, b.x.clone(), b.ids.clone()))
        if i == 25:  # the memory changes under the held batch
            x2, y2, t2, lg2 = data(30, seed=9)
            added.record(c.add(x2, y2, t2, logits=lg2), x2, y2, t2, lg2)
        del b
    assert metric(d, "carousel_ring_batches_total") - ring_before >= 20, "the ring was hardly used"
    for f in ("ids", "x", "y", "task"):
        assert torch.equal(getattr(a, f), snapshot[f]), f"held batch's {f} changed"
    assert torch.equal(a.extras["logits"], snapshot["logits"])
    added.check(a)
    for b, xs, ids in held:
        assert torch.equal(b.x, xs) and torch.equal(b.ids, ids), "a held batch changed"
    del a, held
    for _ in range(20):  # released slots come back: the ring keeps serving
        added.check(c.sample(16))


def test_a_stale_short_ring_batch_is_refilled_at_once(make_daemon, client_of):
    """While the EM holds fewer samples than a draw asks for, every add makes the ring's short
    batches stale. The client drops them (and hands back the batch it let go of) and the filler,
    woken by that, refills the ring before the client gives up on it (5 ms) and asks over the
    socket. The filler sleeps until a slot comes back: without the wake-ups, most of these draws
    would go over the socket."""
    d = make_daemon()
    c = client_of(d)
    added = Added()
    x, y, t, lg = data(4)
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    c.stats()  # applied: the next draws see 4 samples
    for _ in range(3):
        assert len(c.sample(16)) == 4  # the first one subscribes; the ring then serves them
    before = metric(d, "carousel_requests_total", op="sample", result="ok")
    cycles = 10
    for k in range(cycles):
        x, y, t, lg = data(1, seed=100 + k)
        added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
        c.stats()  # applied (and admitted): the ring's 4-row batches are stale now
        b = c.sample(16)
        assert len(b) == 5 + k, "a stale short batch was served after an add"
        added.check(b)
        del b
    over_socket = metric(d, "carousel_requests_total", op="sample", result="ok") - before
    assert over_socket <= cycles // 3, f"{over_socket} of {cycles} draws after an add went over the socket"


HOLDER = r"""
import sys, torch, carousel
sock, mode = sys.argv[1], sys.argv[2]


def ring_batch(c):
    # A batch that views the daemon's shared memory (the first may come over the socket).
    ranges = []
    for _ in range(200):
        b = c.sample(16)
        ranges = [tuple(int(v, 16) for v in ln.split()[0].split("-")) for ln in open("/proc/self/maps")
                  if "/dev/shm/carousel-" in ln]
        if any(lo <= b.x.data_ptr() < hi for lo, hi in ranges):
            return b
    raise SystemExit("no batch came from the ring")


c = carousel.connect(sock)
if mode == "dataset":  # ReplayDataset in-process: list() runs the generator to its end (and its close)
    from torch.utils.data import DataLoader
    held = list(DataLoader(carousel.ReplayDataset(sock, batch_size=16, num_batches=5), batch_size=None))
    print("reading", len(held), "batches", flush=True)
    ok = all(len(set(b.ids.tolist())) == 16 for b in held) and sum(int(b.x.sum()) for b in held) > 0
    print("ok" if ok else "changed", flush=True)
    raise SystemExit(0)
a = ring_batch(c)
snap = a.x.clone(), a.ids.clone()
if mode == "close":
    c.close()
else:  # "restart": the parent restarts the daemon; the next call reconnects
    print("holding", flush=True)
    sys.stdin.readline()
    c.stats()
print("reading", flush=True)
same = torch.equal(a.x, snap[0]) and torch.equal(a.ids, snap[1])
print("ok" if same else "changed", flush=True)
"""


@pytest.mark.parametrize("mode", ["close", "restart", "dataset"])
def test_held_batch_outlives_its_connection(make_daemon, client_of, mode):
    """A batch the user still holds stays readable (and unchanged) after the client closes, after
    it reconnects to a restarted daemon, and after a ``ReplayDataset`` iteration ends (which closes
    its client). Run in a child process: a batch whose memory was unmapped crashes the reader."""
    d = make_daemon()
    c = client_of(d)
    x, y, t, lg = data(64)
    c.add(x, y, t, logits=lg)
    c.flush()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, d.socket, mode], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if mode == "restart":
            assert proc.stdout.readline().strip() == "holding"
            c.close()
            assert d.stop() == 0
            make_daemon()
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"the client process died (rc={proc.returncode}, -11 = SIGSEGV) reading a held " \
                                 f"batch after mode={mode!r}; stdout:\n{out}\nstderr:\n{err[-2000:]}"
    assert out.strip().splitlines()[-1].startswith("ok"), out


# ---- errors --------------------------------------------------------------------------------------------
def test_bad_input_is_an_input_error_and_the_connection_survives(make_daemon, client_of):
    """Bad input raises the memory's own MemoryInputError, refused before it is sent (the daemon
    sees only the good add); the connection stays up. Which error and text: test_input_parity.py."""
    d = make_daemon()
    c = client_of(d)
    x, y, t, lg = data(40)
    ids = c.add(x, y, t, logits=lg)
    u8 = torch.uint8
    cases = {
        "x wrong shape": lambda: c.add(torch.zeros(4, 3, 8, 7, dtype=u8), y[:4], 0, logits=lg[:4]),
        "x wrong dtype": lambda: c.add(torch.zeros(4, *SHAPE), y[:4], 0, logits=lg[:4]),
        "x wrong shape, large": lambda: c.add(torch.zeros(400, 3, 8, 7, dtype=u8), torch.zeros(400, dtype=torch.int64),
                                              0, logits=torch.zeros(400, 10)),
        "y wrong length": lambda: c.add(x[:4], y[:3], 0, logits=lg[:4]),
        "negative label": lambda: c.add(x[:4], -torch.ones(4, dtype=torch.int64), 0, logits=lg[:4]),
        "unknown extra": lambda: c.add(x[:4], y[:4], 0, logits=lg[:4], weight=torch.ones(4)),
        "missing extra": lambda: c.add(x[:4], y[:4], 0),
        "extra wrong shape": lambda: c.add(x[:4], y[:4], 0, logits=torch.zeros(4, 9)),
        "negative n": lambda: c.sample(-1),
        "negative seed": lambda: c.sample(4, seed=-1),
        "observe unknown id": lambda: c.observe(torch.tensor([10_000])),
        "observe logits rows": lambda: c.observe(ids[:4], logits=torch.zeros(3, 10)),
        "observe loss length": lambda: c.observe(ids[:4], loss=torch.zeros(3)),
    }
    for what, call in cases.items():
        with pytest.raises(carousel.MemoryInputError):
            call()
        b = c.sample(8)  # the connection still works
        assert len(b) == 8, what
    assert len(c.sample(65)) == 40 and len(c.sample(65, seed=1)) == 40  # more than there is: all there is
    st = c.stats()
    assert st["added"] == 40, "a rejected add changed the memory"
    assert metric(d, "carousel_requests_total", op="hello", result="ok") == 1, "the client had to reconnect"
    assert metric(d, "carousel_clients") == 1
    assert metric(d, "carousel_requests_total", op="add", result="ok") == 1
    assert metric(d, "carousel_requests_total", op="add", result="input") == 0, "bad input left the client"
    assert metric(d, "carousel_requests_total", op="observe", result="input") == 1  # unknown ids: the daemon's


# ---- restart ---------------------------------------------------------------------------------------------
def test_reconnects_after_daemon_restart(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    added = Added()
    x, y, t, lg = data(100)
    ids = c.add(x, y, t, logits=lg)
    added.record(ids, x, y, t, lg)
    for _ in range(5):
        added.check(c.sample(16))
    first_pid = c.daemon_pid
    assert d.stop() == 0
    assert not d.shm_segments()

    d2 = make_daemon()  # same name: same profile paths, same socket
    assert d2.socket == d.socket and d2.pid != d.pid
    st = c.stats()  # the same client object
    assert c.daemon_pid == d2.pid != first_pid
    assert st["added"] == 100 and st["tiers"]["0-lmdb"]["samples"] == 100 and st["tiers"]["ram"]["samples"] == 64
    for _ in range(10):
        b = c.sample(16)
        check_types(b, 16)
        added.check(b)
    added.check(c.sample(64, seed=0))
    x2, y2, t2, lg2 = data(10, seed=4)
    ids2 = c.add(x2, y2, t2, logits=lg2)
    assert ids2.min() >= 100, "ids were reused after a restart"
    assert c.stats()["added"] == 110

    # Down while the client calls: the call waits for the daemon to come back.
    assert d2.stop() == 0
    box = {}
    starter = threading.Timer(1.0, lambda: box.setdefault("d", make_daemon()))
    starter.start()
    try:
        st = c.stats()
    finally:
        starter.join()
    assert st["added"] == 110 and box["d"].pid == c.daemon_pid


# ---- concurrency ------------------------------------------------------------------------------------------
def test_threads_share_one_client(make_daemon, client_of):
    d = make_daemon(memory={"em_size": 128, "sample_shape": list(SHAPE)})
    c = client_of(d)
    pre = np.arange(128)
    assert c.add(torch.from_numpy(workers.pattern(pre, SHAPE)), torch.from_numpy(workers.label_of(pre)), 0).tolist() \
        == pre.tolist()
    errors: list[str] = []
    batches = [0] * 4
    stop_adding = threading.Event()

    def sampler(k: int) -> None:
        try:
            for i in range(150):
                kw = [{}, {}, {"seed": i}, {"classes": [1, 2, 3]}][k]
                b = c.sample(16, **kw)
                ids = b.ids.numpy().copy()
                time.sleep(0.0005)  # a training step holds its batch a while: it must not change meanwhile
                if len(b) != 16 or np.unique(ids).size != len(b):
                    errors.append(f"thread {k}: batch of {len(b)} with ids {ids.tolist()}")
                why = workers.check_rows(ids, b.x.numpy(), b.y.numpy(), SHAPE)
                if why:
                    errors.append(f"thread {k}: {why}")
                if "classes" in kw and not set(b.y.tolist()) <= {1, 2, 3}:
                    errors.append(f"thread {k}: class filter ignored: {b.y.tolist()}")
                batches[k] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(f"thread {k}: {exc!r}")

    def adder() -> None:
        nxt = 128
        try:
            while not stop_adding.is_set():
                ids = np.arange(nxt, nxt + 8)
                got = c.add(torch.from_numpy(workers.pattern(ids, SHAPE)), torch.from_numpy(workers.label_of(ids)), 1)
                if got.tolist() != ids.tolist():
                    errors.append(f"adder: ids {got.tolist()} != {ids.tolist()}")
                    return
                nxt += 8
        except Exception as exc:  # noqa: BLE001
            errors.append(f"adder: {exc!r}")
        finally:
            added_box.append(nxt)

    added_box: list[int] = []
    threads = [threading.Thread(target=sampler, args=(k,)) for k in range(4)]
    add_thread = threading.Thread(target=adder)
    for th in threads + [add_thread]:
        th.start()
    for th in threads:
        th.join(120)
    stop_adding.set()
    add_thread.join(60)
    assert not any(th.is_alive() for th in threads + [add_thread]), "a thread hung"
    assert not errors, "\n".join(errors[:10])
    assert batches == [150] * 4
    assert added_box[0] > 128, "the adder never got a turn"
    assert c.stats()["added"] == added_box[0]


def test_several_client_processes(make_daemon):
    d = make_daemon(memory={"em_size": 256, "sample_shape": list(SHAPE)})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(workers.add_then_sample, [(d.socket, w, 50, 20, 16, SHAPE) for w in range(3)],
                               chunksize=1)
    for r in results:
        assert not r["errors"], f"client pid {r['pid']}:\n" + "\n".join(r["errors"])
        assert len(r["ids"]) == 50 and r["batches"] == 20 and r["own_seen"] > 0
    all_ids = [i for r in results for i in r["ids"]]
    assert len(set(all_ids)) == 150, "two processes were given the same ids"
    assert len({r["pid"] for r in results}) == 3
    with carousel.connect(d.socket) as c:
        assert c.stats()["added"] == 150
        b = c.sample(150, seed=0)
        assert sorted(b.ids.tolist()) == sorted(all_ids)
        assert set(b.y.tolist()) == {100, 101, 102}


def test_replay_dataset_with_dataloader_workers(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    added = Added()
    x, y, t, lg = data(50)
    added.record(c.add(x, y, t, logits=lg), x, y, t, lg)
    ds = carousel.ReplayDataset(d.socket, batch_size=8, num_batches=7)
    loader = DataLoader(ds, batch_size=None, num_workers=2, pin_memory=False)
    for epoch in range(4):  # each epoch: fresh workers, each connects, draws its share and closes
        got = list(loader)
        assert len(got) == 7, f"epoch {epoch}: {len(got)} batches"
        for b in got:
            assert isinstance(b, carousel.Batch)
            check_types(b, 8)
            added.check(b)
    ds_filtered = carousel.ReplayDataset(d.socket, batch_size=4, num_batches=5, classes=[2])
    got = list(DataLoader(ds_filtered, batch_size=None, num_workers=2, pin_memory=False))
    assert len(got) == 5 and all(set(b.y.tolist()) == {2} and len(b) == 4 for b in got)


# ---- the status command --------------------------------------------------------------------------------------
def test_status_cli(make_daemon, client_of):
    d = make_daemon()
    c = client_of(d)
    x, y, t, lg = data(100)
    c.add(x, y, t, logits=lg)
    c.flush()
    for _ in range(5):
        c.sample(16)
    cmd = [sys.executable, "-m", "carousel", "status", "--socket", d.socket, "--interval", "0.1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(f"daemon pid {d.pid}" in ln for ln in lines), out.stdout
    ram = [ln for ln in lines if ln.split()[:2] == ["tier", "ram"]]
    lmdb = [ln for ln in lines if ln.split()[:2] == ["tier", "0-lmdb"]]
    assert ram and ram[0].split()[2:5] == ["64", "/", "64"], out.stdout
    assert lmdb and lmdb[0].split()[2:5] == ["100", "/", "10000"], out.stdout
    lat = [ln for ln in lines if ln.strip().startswith("sample latency:")]
    assert lat and "p50" in lat[0] and "p99" in lat[0] and " us" in lat[0], out.stdout

    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    mem = st["memories"]["default"]
    assert st["pid"] == d.pid and mem["added"] == 100
    assert mem["tiers"]["ram"]["samples"] == 64 and mem["tiers"]["0-lmdb"]["samples"] == 100
    assert all(math.isfinite(v) and v > 0 for v in mem["sample_latency_seconds"].values())

    def strict(const: str):
        raise ValueError(f"`carousel status --json` printed {const}, which is not JSON (RFC 8259): JavaScript's "
                         "JSON.parse, Go's encoding/json and serde_json reject the whole document")

    json.loads(out.stdout, parse_constant=strict)
