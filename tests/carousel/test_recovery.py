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


CHECKPOINTING_CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    from carousel import CarouselMemory
    print("OPENING", flush=True)
    mem = CarouselMemory.from_toml(sys.argv[1])  # recovery: the kill may land here
    print("OPEN", flush=True)
    while True:
        first = mem.stats()["added"]  # the id the next add gives its first sample
        ids = np.arange(first, first + 16)
        x = torch.from_numpy(np.repeat((ids % 251).astype(np.uint8), 16).reshape(16, 4, 4))
        got = mem.add(x, torch.from_numpy(ids % 6), task=int(first // 400))
        assert got.tolist() == ids.tolist()
        b = mem.sample(16)
        mem.observe(b.ids, logits=torch.randn(len(b), 6))
        print("CKPT", flush=True)
        mem.checkpoint()  # or here
        print("ACK", first, first + 15, flush=True)
""")


def _kill_during(proc: subprocess.Popen, phase: str, rng: np.random.Generator, open_s: float
                 ) -> tuple[list[str], float | None]:
    """SIGKILL ``proc`` aimed at ``phase`` ("recovery": between OPENING and OPEN, "checkpoint":
    inside the k-th checkpoint). Returns every line it printed (so the caller can tell where it
    died) and how long its recovery took, when it finished one."""
    lines: list[str] = []
    opening = took = None
    ckpts, aim = 0, int(rng.integers(2, 6))
    while True:
        line = proc.stdout.readline()
        assert line, f"the child exited before it was killed: {lines[-5:]}"
        lines.append(line.strip())
        if line.startswith("OPENING"):
            opening = time.monotonic()
            if phase == "recovery":
                time.sleep(rng.uniform(0, open_s))
                break
        elif line.startswith("OPEN"):
            took = time.monotonic() - opening
        elif line.startswith("CKPT"):
            ckpts += 1
            if ckpts == aim:
                time.sleep(rng.uniform(0, 0.004))
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines += [ln.strip() for ln in proc.stdout.read().splitlines() if ln.strip()]
    return lines, took


@pytest.mark.slow
def test_sigkill_during_checkpoint_or_recovery_leaves_a_memory_that_opens(tmp_path):
    """RELIABILITY item 4: a process killed inside ``checkpoint()``, or inside the recovery of such a
    kill, leaves a memory that the next open recovers: every acknowledged sample with its bytes and
    its label (labels of checkpointed ids come from the checkpoint), the EM refilled. Each cycle: a
    child killed mid-checkpoint, a second child killed mid-recovery of that, then a third recovery
    (this process) checks everything. The kills are aimed, and where each landed is counted."""
    cfg = tmp_path / "memory.toml"
    cfg.write_text(TOML.format(workers=1))
    rng = np.random.default_rng(4)
    acked: set[int] = set()
    died_in: dict[str, int] = {}
    open_s = 0.05  # then the recovery time measured in the checkpoint rounds
    for _ in range(3):
        for phase in ("checkpoint", "recovery"):
            proc = subprocess.Popen([sys.executable, "-c", CHECKPOINTING_CHILD, str(cfg)], stdout=subprocess.PIPE,
                                    text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
            lines, took = _kill_during(proc, phase, rng, open_s)
            open_s = took or open_s
            for line in lines:
                if line.startswith("ACK"):
                    lo, hi = map(int, line.split()[1:])
                    acked.update(range(lo, hi + 1))
            last = [ln.split()[0] for ln in lines][-1]  # a CKPT with no ACK after it: died in the checkpoint
            where = {"CKPT": "checkpoint", "OPENING": "recovery"}.get(last, "between")
            died_in[where] = died_in.get(where, 0) + 1
        with CarouselMemory.open(cfg) as mem:
            assert mem.stats()["errors"] == {"write_behind": None, "swap": None}
            ack_ids = np.array(sorted(acked), dtype=np.int64)
            assert ack_ids.size, "nothing was acknowledged"
            home = mem.catalog.home[ack_ids]
            assert (home >= 0).all(), f"acknowledged samples lost: {ack_ids[home < 0][:10]}"
            assert (mem.catalog.label[ack_ids] == ack_ids % 6).all(), "a label came back wrong"
            for tier in mem.tiers:
                sel = ack_ids[home == tier.index]
                if sel.size:
                    got = tier.store.get_many(sel)["x"]
                    assert all(np.array_equal(got[j], expected_x(int(i))) for j, i in enumerate(sel))
            assert mem.pool.filled() == 40
            b = mem.sample(40)
            assert all(np.array_equal(b.x[j].numpy(), expected_x(int(i))) for j, i in enumerate(b.ids))
            assert (b.y.numpy() == b.ids.numpy() % 6).all()
    print("kills landed in:", died_in)
    assert died_in.get("checkpoint", 0) + died_in.get("recovery", 0) >= 2, died_in  # the aim held
