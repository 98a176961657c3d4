"""A label above ``memory.max_label`` through a real daemon: an input error with the in-process
text, nothing stored, the daemon serving on; labels up to 2**31 work (RELIABILITY.md item 22,
the label part)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import carousel
from carousel import CarouselMemory, MemoryInputError
from tests.daemon.harness import CIFAR, start_daemon
from tests.daemon.rawwire import OP, connect_raw, hello, request

HUGE = 2**40
SHAPE = tuple(CIFAR["sample_shape"])
EXPECTED = f"label {HUGE} exceeds memory.max_label = {2**32 - 1}"


def raw_add(sock, y: np.ndarray) -> tuple[int, dict]:
    """An ADD frame built by hand: the daemon's own check, whatever a client checks before sending."""
    n = y.size
    x, task = np.zeros((n, *SHAPE), np.uint8), np.ones(n, np.int16)
    meta = {"tensors": [["x", "uint8", [n, *SHAPE]], ["y", "int64", [n]], ["task", "int16", [n]]]}
    op, reply, _ = request(sock, OP["ADD"], meta, x.tobytes() + y.astype(np.int64).tobytes() + task.tobytes())
    return op, reply


def test_a_huge_label_is_an_input_error_and_sparse_labels_work(tmp_path):
    d = start_daemon(tmp_path, swap={"ratio": 1.0})
    try:
        with carousel.connect(d.socket) as c:
            x = torch.zeros((4, *SHAPE), dtype=torch.uint8)
            ok = c.add(x, torch.tensor([0, 1, 2**31 - 1, 2**31]), task=1)
            sock = connect_raw(d.socket)
            try:
                hello(sock)
                op, reply = raw_add(sock, np.array([5, HUGE, 7, 8]))
                assert (op, reply) == (OP["ERROR"], {"error": "input", "type": "MemoryInputError", "message": EXPECTED})
                op, reply = raw_add(sock, np.array([3]))  # the connection serves on
                assert op == OP["OK"], reply
            finally:
                sock.close()
            # Through the client: the same class and text as in-process (the client checks first).
            with pytest.raises(MemoryInputError) as err:
                c.add(x, torch.tensor([5, HUGE, 7, 8]), task=1)
            assert type(err.value) is MemoryInputError and str(err.value) == EXPECTED
            with CarouselMemory.from_dict({"memory": dict(CIFAR)}) as local, \
                    pytest.raises(MemoryInputError, match=f"^{EXPECTED}$"):
                local.add(x.numpy(), np.array([5, HUGE, 7, 8]), task=1)
            c.flush()
            st = c.stats()
            assert st["added"] == 5 and st["tiers"]["0-lmdb"]["samples"] == 5, "a rejected add left a trace"
            more = c.add(torch.zeros((60, *SHAPE), dtype=torch.uint8),
                         torch.tensor([0, 1, 2**31 - 1, 2**31] * 15), task=1)
            assert more.min() > ok.max()
            for _ in range(20):  # replay and swap with labels up to 2**31
                b = c.sample(16)
                assert set(b.y.tolist()) <= {0, 1, 3, 2**31 - 1, 2**31}
                c.observe(b.ids, logits=torch.randn(len(b), 4))
            assert set(c.sample(8, classes=[2**31]).y.tolist()) == {2**31}
            st = c.stats()
            assert st["errors"] == {"write_behind": None, "swap": None} and st["added"] == 65
        assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()[-3000:]
    finally:
        d.close()
