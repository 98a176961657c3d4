"""Recovery after SIGKILL of a real process that uses a memory (RELIABILITY.md items 1 and 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from carousel import CarouselMemory

TOML = """
[memory]
em_size = 40
sample_shape = [4, 4]
seed = 3
[swap]
ratio = 1.0
workers = {workers}
[write_behind]
queue_samples = 512
batch = 32
[[tiers]]
kind = "lmdb"
path = "flash"
capacity = 300
[[tiers]]
kind = "zarr"
path = "disk"
capacity = 100000
chunk = 8
"""

CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    from carousel import CarouselMemory
    mem = CarouselMemory.from_toml(sys.argv[1])
    step = mem.stats()["added"] // 16
    first = None  # ids are consecutive within one run (a restart may skip some, never reuse one)
    while True:
        task = step // 10
        y = torch.tensor([(step + i) % 6 for i in range(16)])
        # x encodes the id it will get: the next one (ids of one add are consecutive).
        x = (torch.arange(16).view(16, 1, 1) + mem.stats()["added"]).remainder(251).to(torch.uint8)
        ids = mem.add(x.expand(16, 4, 4).contiguous(), y, task=task)
        first = int(ids[0]) if first is None else first
        b = mem.sample(16)
        mem.observe(b.ids, logits=torch.randn(len(b), 6))
        if step % 3 == 2:
            mem.flush()  # everything added so far is acknowledged now
            print("ACK", first, int(ids.max()), flush=True)
        step += 1
""")


def expected_x(i: int) -> np.ndarray:
    return np.full((4, 4), i % 251, dtype=np.uint8)


@pytest.mark.parametrize("workers", [1, 0])
def test_sigkill_loses_no_acknowledged_sample(tmp_path, workers):
    cfg = tmp_path / "memory.toml"
    cfg.write_text(TOML.format(workers=workers))
    rng = np.random.default_rng(workers)
    acked: set[int] = set()  # every id an ACK covered, over all rounds
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg)], stdout=subprocess.PIPE, text=True,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
        deadline = None  # the kill timer starts at the round's first ACK: startup time varies
        while deadline is None or time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the child exited before it was killed"
            if line.startswith("ACK"):
                lo, hi = map(int, line.split()[1:])
                acked.update(range(lo, hi + 1))
                if deadline is None:
                    deadline = time.monotonic() + rng.uniform(0.2, 1.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert acked, "the child acknowledged nothing"
        with CarouselMemory.open(cfg) as mem:
            stored = np.concatenate([t.store.ids() for t in mem.tiers])
            assert np.unique(stored).size == stored.size, "an id recovered in two tiers"
            ack_ids = np.array(sorted(acked), dtype=np.int64)
            assert mem.stats()["added"] > ack_ids.max()
            home = mem.catalog.home[ack_ids]
            lost = ack_ids[home < 0]
            assert lost.size == 0, f"acknowledged samples lost: {lost[:10]}"
            for tier in mem.tiers:
                sel = ack_ids[home == tier.index]
                if sel.size:
                    got = tier.store.get_many(sel)["x"]
                    assert all(np.array_equal(got[j], expected_x(int(i))) for j, i in enumerate(sel))
            assert mem.pool.filled() == 40  # the EM is refilled from storage
            b = mem.sample(40)
            assert all(np.array_equal(b.x[j].numpy(), expected_x(int(i))) for j, i in enumerate(b.ids))
            if round_ == 2:  # it keeps working after recovery: ids continue after the last one recovered
                top = mem.stats()["added"]
                new = mem.add(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), task=9)
                assert new.tolist() == [top, top + 1]
