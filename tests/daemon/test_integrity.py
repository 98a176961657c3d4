"""The integrity mode through a real daemon: its shared-memory rings and its socket (issue 20, item 1).

The daemon draws a batch and its references under the EM lock and sends both; the *client*
recomputes and compares, so a wrong pair raises :class:`carousel.IntegrityError` in the trainer's
process, after the transport. Real ``carousel serve`` processes, real LMDB and flat tiers.
"""

from __future__ import annotations

import time
import traceback

import numpy as np
import pytest
import torch

import carousel
from carousel import CarouselMemory, IntegrityError
from carousel.daemon.profile import load_profile
from storage_backends import open_store
from tests.daemon.harness import start_daemon

SHAPE = (3, 8, 8)
MEMORY = {"em_size": 64, "sample_shape": list(SHAPE), "seed": 0,
          "extras": {"logits": {"shape": [10], "dtype": "float32"}}}


@pytest.fixture
def daemons():
    started = []
    yield started
    for d in started:
        d.close()


def data(n, seed, classes=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g), torch.arange(n) % classes,
            torch.randn(n, 10, generator=g))


def raised_in(exc: BaseException) -> set[str]:
    """The client functions an exception passed through (which path checked the batch)."""
    return {frame.name for frame in traceback.extract_tb(exc.__traceback__)}


def test_rings_and_socket_check_every_batch_without_false_alarms(tmp_path, daemons):
    """CAROUSEL_VERIFY=1 in the daemon's environment; swaps at ratio 1 from task 0, write-behind in
    small batches, an LMDB tier overflowing into a flat one. Ring batches, seeded (socket) draws
    and a client without shared memory: every row checked in the client, none wrong."""
    d = start_daemon(tmp_path, memory=dict(MEMORY), swap={"ratio": 1.0, "start_task": 0, "prefetch_depth": 64},
                     write_behind={"queue_samples": 1024, "batch": 16},
                     tiers=[{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 100},
                            {"kind": "flat", "path": str(tmp_path / "disk"), "capacity": 100000}],
                     env={"CAROUSEL_VERIFY": "1"})
    daemons.append(d)
    with carousel.connect(d.socket) as c, carousel.connect(d.socket, use_shm=False) as plain:
        assert c.verifier is not None and c.verifier.checked == ("x", "y", "task", "logits")
        rows = plain_rows = 0
        for step in range(60):
            x, y, logits = data(16, seed=step)
            c.add(x, y, step // 20, logits=logits)
            b = c.sample(32)  # the ring (or the socket, when no batch is ready yet)
            assert not any(k.startswith("@") for k in b.extras)
            rows += len(b)
            c.observe(b.ids, logits=torch.randn(len(b), 10))
            if step % 5 == 0:
                rows += len(c.sample(32, seed=step))  # the socket
                plain_rows += len(plain.sample(24))
            del b
        c.flush()
        stats = c.stats()
        assert stats["swapped_in"] > 0 and stats["tiers"]["1-flat"]["samples"] > 0
        assert c.verified == rows and plain.verified == plain_rows and rows > 0 and plain_rows > 0


def test_a_wrong_record_on_storage_raises_in_the_client_on_every_path(tmp_path, daemons):
    """A stored record replaced (with another sample's valid record) while the daemon was down
    enters the EM when the restarted daemon refills it from its checkpoint. The shared-memory
    ring, a seeded draw over the socket and a client without shared memory each raise
    IntegrityError naming the id, with the text the in-process memory gives."""
    memory = {**MEMORY, "verify": True}
    d = start_daemon(tmp_path, memory=memory)
    daemons.append(d)
    with carousel.connect(d.socket) as c:
        x, y, logits = data(40, seed=1)
        ids = c.add(x, y, 0, logits=logits).numpy()
        c.checkpoint()
    assert d.stop() == 0
    store = open_store(f"lmdb://{tmp_path / 'd' / 'data' / 'flash'}")
    try:
        store.put_many(ids[5:6], store.get_many(ids[6:7]))  # a valid record, of another sample
    finally:
        store.close()

    d = start_daemon(tmp_path, memory=memory)
    daemons.append(d)
    errors = {}
    with carousel.connect(d.socket) as c, carousel.connect(d.socket, use_shm=False) as plain:
        deadline = time.monotonic() + 30
        while "ring" not in errors:  # the first draw may come over the socket, before the ring is filled
            assert time.monotonic() < deadline, "no batch ever came from the ring"
            with pytest.raises(IntegrityError) as info:
                c.sample(40)
            errors["ring" if "_from_ring" in raised_in(info.value) else "socket, unseeded"] = info.value
            time.sleep(0.05)
        with pytest.raises(IntegrityError) as info:
            c.sample(40, seed=0)
        assert "_from_ring" not in raised_in(info.value)
        errors["socket, seeded"] = info.value
        with pytest.raises(IntegrityError) as info:
            plain.sample(40)
        errors["no shared memory"] = info.value
        assert c.verified == 0 and plain.verified == 0
    for path, err in errors.items():
        assert err.ids == [int(ids[5])], path
        assert {"x", "logits"} <= set(err.mismatches[0].fields) and "task" not in err.mismatches[0].fields, path
        assert f"id {ids[5]} in EM slot {err.slots[0]}: x (CRC-32C expected 0x" in str(err), path
    assert d.stop() == 0

    # In-process, on the same data (the daemon's checkpoint gives the same EM): the same error text.
    with CarouselMemory(load_profile(d.profile).memories["default"]) as mem:
        with pytest.raises(IntegrityError) as info:
            mem.sample(40, seed=0)
        assert str(info.value) == str(errors["socket, seeded"])
        assert np.array_equal(mem.catalog.crc[ids[:5]], mem.verifier.crcs(
            {"x": x[:5].numpy(), "y": y[:5].numpy(), "task": np.zeros(5, np.int16), "logits": logits[:5].numpy()}))


def test_without_verify_batches_carry_no_references(tmp_path, daemons):
    d = start_daemon(tmp_path, memory=dict(MEMORY), tiers=None)
    daemons.append(d)
    with carousel.connect(d.socket) as c:
        assert c.verifier is None
        x, y, logits = data(20, seed=2)
        c.add(x, y, 0, logits=logits)
        for _ in range(3):
            assert set(c.sample(8).extras) == {"logits"}
        assert set(c.sample(8, seed=1).extras) == {"logits"}
        (ring,) = c._rings.values()
        assert [f[0] for f in ring.layout.fields] == ["id", "x", "y", "task", "logits"]
        assert c.verified == 0
