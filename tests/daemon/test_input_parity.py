"""The same bad input through ``CarouselMemory`` and through ``carousel.connect()`` raises the same
exception class with the same text (RELIABILITY.md item 25), and ``sample(n)`` means the same in
both: up to ``n`` distinct EM samples, all there are when the EM holds fewer, none from an empty one.

One in-process memory and one daemon (a real ``carousel serve`` process) are built from the same
memory table and given the same 40 samples, so even messages that name counts ("valid: 0..39")
must agree. The client refuses most bad input before sending it, with the memory's own checks;
the raw-frame cases bypass the client and show that the daemon, given the same input on the
wire, answers with the same class (by name, in the ERROR frame) and text.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import carousel
from carousel.daemon import wire
from tests.daemon import rawwire
from tests.daemon.harness import start_daemon

SHAPE = (3, 8, 8)
MEMORY = {"em_size": 64, "sample_shape": list(SHAPE), "extras": {"logits": {"shape": [10], "dtype": "float32"}}}
N = 40
u8 = torch.uint8


def _data(n: int = N):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, *SHAPE), dtype=u8, generator=g), torch.arange(n) % 5,
            torch.randn(n, 10, generator=g))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(in-process memory, client of a daemon)`` holding the same 40 samples, each with an LMDB tier."""
    tmp = tmp_path_factory.mktemp("parity")
    local = carousel.CarouselMemory.from_dict({
        "memory": MEMORY, "tiers": [{"kind": "lmdb", "path": str(tmp / "local-flash"), "capacity": 10000}]})
    d = start_daemon(tmp, memory=MEMORY, metrics=False)
    remote = carousel.connect(d.socket)
    x, y, lg = _data()
    assert local.add(x, y, 0, logits=lg).tolist() == remote.add(x, y, 0, logits=lg).tolist() == list(range(N))
    yield local, remote
    remote.close()
    local.close()
    d.close()


X, Y, LG = _data()
BAD = {  # what -> a call on a memory (either kind)
    "x float": lambda m: m.add(X[:4].float(), Y[:4], 0, logits=LG[:4]),
    "x wrong row shape": lambda m: m.add(torch.zeros(4, 3, 8, 7, dtype=u8), Y[:4], 0, logits=LG[:4]),
    "x 1-D": lambda m: m.add(torch.zeros(4, dtype=u8), Y[:4], 0, logits=LG[:4]),
    "x a list": lambda m: m.add([[1, 2]], Y[:1], 0, logits=LG[:1]),
    "y too short (not blamed on x)": lambda m: m.add(X[:4], Y[:3], 0, logits=LG[:4]),
    "y 2-D": lambda m: m.add(X[:2], torch.zeros(2, 2, dtype=torch.int64), 0, logits=LG[:2]),
    "y a scalar": lambda m: m.add(X[:2], torch.tensor(3), 0, logits=LG[:2]),
    "y float": lambda m: m.add(X[:4], Y[:4].float(), 0, logits=LG[:4]),
    "y strings": lambda m: m.add(X[:2], np.array(["a", "b"]), 0, logits=LG[:2]),
    "negative label": lambda m: m.add(X[:4], -torch.ones(4, dtype=torch.int64), 0, logits=LG[:4]),
    "label above max_label": lambda m: m.add(X[:4], torch.tensor([0, 1, 2**40, 3]), 0, logits=LG[:4]),
    "task a string": lambda m: m.add(X[:4], Y[:4], "a", logits=LG[:4]),
    "task a float": lambda m: m.add(X[:4], Y[:4], 1.5, logits=LG[:4]),
    "task out of range": lambda m: m.add(X[:4], Y[:4], 40_000, logits=LG[:4]),
    "task negative": lambda m: m.add(X[:4], Y[:4], -1, logits=LG[:4]),
    "task wrong length": lambda m: m.add(X[:4], Y[:4], torch.zeros(3, dtype=torch.int64), logits=LG[:4]),
    "unknown extra": lambda m: m.add(X[:4], Y[:4], 0, logits=LG[:4], weight=torch.ones(4)),
    "missing extra": lambda m: m.add(X[:4], Y[:4], 0),
    "extra wrong shape": lambda m: m.add(X[:4], Y[:4], 0, logits=torch.zeros(4, 9)),
    "extra strings": lambda m: m.add(X[:2], Y[:2], 0, logits=np.full((2, 10), "a")),
    "sample n negative": lambda m: m.sample(-1),
    "sample n float": lambda m: m.sample(2.5),
    "sample n string": lambda m: m.sample("3"),
    "sample n None": lambda m: m.sample(None),
    "sample classes strings": lambda m: m.sample(4, classes=["a"]),
    "sample tasks floats": lambda m: m.sample(4, tasks=[1.5]),
    "sample seed negative": lambda m: m.sample(4, seed=-1),
    "sample seed float": lambda m: m.sample(4, seed=1.5),
    "observe ids 2-D": lambda m: m.observe(torch.zeros(2, 2, dtype=torch.int64)),
    "observe ids float": lambda m: m.observe(torch.tensor([1.0, 2.0])),
    "observe unknown id": lambda m: m.observe(torch.tensor([10_000])),
    "observe negative id": lambda m: m.observe(torch.tensor([-1])),
    "observe logits rows": lambda m: m.observe(torch.arange(4), logits=torch.zeros(3, 10)),
    "observe logits 1-D": lambda m: m.observe(torch.arange(4), logits=torch.zeros(4)),
    "observe logits strings": lambda m: m.observe(torch.arange(1), logits=np.array([["a"]])),
    "observe loss length": lambda m: m.observe(torch.arange(4), loss=torch.zeros(3)),
    "retain on a plain memory": lambda m: m.retain(torch.arange(2), torch.ones(2)),
}


@pytest.mark.parametrize("what", list(BAD))
def test_same_error_class_and_text(pair, what):
    local, remote = pair
    with pytest.raises(Exception) as in_process:
        BAD[what](local)
    with pytest.raises(Exception) as through_daemon:
        BAD[what](remote)
    assert type(through_daemon.value) is type(in_process.value) is carousel.MemoryInputError, \
        (what, type(in_process.value), type(through_daemon.value))
    assert str(through_daemon.value) == str(in_process.value), what
    # Nothing changed, and the client's connection still serves.
    assert local.stats()["added"] == remote.stats()["added"] == N
    assert len(remote.sample(8)) == len(local.sample(8)) == 8


# What the daemon itself answers when a client does not check first (a raw frame after HELLO).
RAW = {  # what -> (op, tensors) as they would travel; the in-process call that takes the same input
    "x float": ("ADD", [("x", X[:4].float().numpy()), ("y", Y[:4].numpy()), ("task", np.zeros(4, np.int16)),
                        ("logits", LG[:4].numpy())]),
    "y too short (not blamed on x)": ("ADD", [("x", X[:4].numpy()), ("y", Y[:3].numpy()),
                                             ("task", np.zeros(4, np.int16)), ("logits", LG[:4].numpy())]),
    "y float": ("ADD", [("x", X[:4].numpy()), ("y", Y[:4].float().numpy()), ("task", np.zeros(4, np.int16)),
                        ("logits", LG[:4].numpy())]),
    "label above max_label": ("ADD", [("x", X[:4].numpy()), ("y", np.array([0, 1, 2**40, 3])),
                                      ("task", np.zeros(4, np.int16)), ("logits", LG[:4].numpy())]),
    "unknown extra": ("ADD", [("x", X[:4].numpy()), ("y", Y[:4].numpy()), ("task", np.zeros(4, np.int16)),
                              ("logits", LG[:4].numpy()), ("weight", np.ones(4, np.float32))]),
    "missing extra": ("ADD", [("x", X[:4].numpy()), ("y", Y[:4].numpy()), ("task", np.zeros(4, np.int16))]),
    "observe unknown id": ("OBSERVE", [("ids", np.array([10_000]))]),
    "observe logits rows": ("OBSERVE", [("ids", np.arange(4)), ("logits", np.zeros((3, 10), np.float32))]),
}


@pytest.mark.parametrize("what", list(RAW))
def test_the_daemon_itself_answers_with_the_same_class_and_text(pair, what):
    local, remote = pair
    op, tensors = RAW[what]
    with pytest.raises(carousel.MemoryInputError) as in_process:
        BAD[what](local)
    sock = rawwire.connect_raw(remote.address)
    try:
        rawwire.hello(sock)
        sock.sendall(b"".join(wire.encode(wire.Op[op], {}, tensors)))
        reply = rawwire.recv_frame(sock)
    finally:
        sock.close()
    assert reply is not None
    rop, meta, _ = reply
    assert rop == wire.Op.ERROR and meta["error"] == "input", meta
    assert meta["type"] == "MemoryInputError" and meta["message"] == str(in_process.value), meta
    assert remote.stats()["added"] == N


def test_sample_means_the_same_on_a_small_or_empty_memory(pair, tmp_path):
    local, remote = pair
    # More than the EM holds (40 of 64 slots filled; even more than its size): all there is, distinct.
    for n in (41, 64, 1000):
        a, b = local.sample(n), remote.sample(n)
        assert len(a) == len(b) == N and len(set(b.ids.tolist())) == N, n
        assert len(local.sample(n, seed=3)) == len(remote.sample(n, seed=3)) == N
    assert len(local.sample(0)) == len(remote.sample(0)) == 0
    assert len(local.sample(1000, classes=[1])) == len(remote.sample(1000, classes=[1])) == N // 5
    # An empty memory: an empty batch of the right row shape and dtypes, not an error.
    empty_local = carousel.CarouselMemory.from_dict({"memory": MEMORY})
    d = start_daemon(tmp_path, memory=MEMORY, tiers=None, metrics=False, name="empty")
    try:
        with carousel.connect(d.socket) as empty_remote:
            for mem in (empty_local, empty_remote):
                for kw in ({}, {"seed": 1}, {"classes": [0]}):
                    batch = mem.sample(8, **kw)
                    assert len(batch) == 0 and batch.x.shape == (0, *SHAPE) and batch.x.dtype == u8, (mem, kw)
                    assert batch.extras["logits"].shape == (0, 10)
    finally:
        d.close()
        empty_local.close()
