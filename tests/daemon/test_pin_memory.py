"""``MemoryClient.sample(..., pin_memory=True)``: page-locked copies where CUDA is, the ordinary
batch where it is not (``torch.Tensor.pin_memory()`` raises there), from the ring and from a
seeded socket draw alike."""

from __future__ import annotations

import torch

import carousel
from carousel.batch import can_pin
from tests.daemon.harness import start_daemon


def test_pin_memory_through_the_client(tmp_path):
    d = start_daemon(tmp_path, memory={"em_size": 64, "sample_shape": [3, 8, 8]})
    try:
        c = carousel.connect(d.socket)
        try:
            g = torch.Generator().manual_seed(0)
            c.add(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(64) % 5, 0)
            seeded, pinned = c.sample(16, seed=3), c.sample(16, seed=3, pin_memory=True)
            for f in ("ids", "x", "y", "task"):
                assert torch.equal(getattr(seeded, f), getattr(pinned, f))
            ring = c.sample(16, pin_memory=True)  # unseeded: a ring batch
            assert len(ring) == 16
            for b in (pinned, ring):
                assert all(t.is_pinned() == can_pin() for t in (b.ids, b.x, b.y, b.task))
        finally:
            c.close()
    finally:
        assert d.stop() == 0

