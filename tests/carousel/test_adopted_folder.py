"""A memory that adopts an image folder as a read-only tier: learnt at open, swapped in from, never
written to; stream samples above it (a writable LMDB tier) or in the EM only (no writable tier)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from carousel import CarouselMemory, swap_engine
from carousel.catalog import EVICTED
from carousel.config import ConfigError
from storage_backends.png import decode_png, encode_png

SHAPE = (1, 8, 8)
CLASSES, PER_CLASS = 4, 12  # ids 0..47 are the folder's
FOLDER_N = CLASSES * PER_CLASS


def write_folder(root: Path) -> Path:
    """``root/c{k}/{i}.png``: pixel values 10*k + i (< 200), so folder images are told from stream
    samples (255) and from each other."""
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / f"c{k}" / f"{i:02d}.png").write_bytes(encode_png(np.full(SHAPE[1:], 10 * k + i, np.uint8)))
    return root


def digest(root: Path) -> str:
    """Names, bytes and modification times of everything under ``root``."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            h.update(str(p.relative_to(root)).encode() + p.read_bytes() + str(p.stat().st_mtime_ns).encode())
        h.update(folder.encode())
    return h.hexdigest()


def config(tmp_path, folder, *, writable=True, workers=1, state=True, **swap):
    tiers = [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 1000, "sync": False}] if writable else []
    tiers.append({"kind": "files", "path": str(folder), "layout": "imagefolder"})
    memory = {"em_size": 8, "sample_shape": list(SHAPE), "seed": 0}
    if state:
        memory["state_dir"] = str(tmp_path / "state")
    return {"memory": memory, "swap": {"ratio": 1.0, "workers": workers, "start_task": 0, "prefetch_depth": 16,
                                       **swap},
            "tiers": tiers}


def stream(n, classes):
    y = torch.tensor(classes).repeat(n // len(classes) + 1)[:n]
    return torch.full((n, *SHAPE), 255, dtype=torch.uint8), y


def replay(mem, steps):
    for _ in range(steps):
        batch = mem.sample(8)
        logits = torch.zeros(len(batch), CLASSES)  # every sample wrong: CarM picks victims among them
        logits[:, -1] = 1.0
        mem.observe(batch.ids, logits=logits)
        mem.end_step()
    mem.stats()  # the queued observations and their swaps are in
    if mem._engine is not None:
        mem._engine.wait_idle()


def test_adopted_folder_under_an_lmdb_tier(tmp_path):
    folder = write_folder(tmp_path / "data")
    before = digest(folder)
    mem = CarouselMemory.from_dict(config(tmp_path, folder))
    assert mem.recovered["adopted"] == FOLDER_N
    assert mem.pool.filled() == 0  # a fresh EM is never filled from the folder (future classes)
    assert mem.catalog.available_by_class() == {}  # every class dormant until the stream brings it
    ids = mem.add(*stream(8, [0, 1]), task=0)
    assert ids.tolist() == list(range(FOLDER_N, FOLDER_N + 8))  # stream ids start after the folder's
    # The first swaps already draw from the folder's classes the add woke (the swap engine's cached
    # per-class count is recounted as soon as a class it lacks becomes available).
    replay(mem, 30)
    in_em = mem.pool.slot_ids[mem.pool.slot_ids >= 0]
    assert (in_em < FOLDER_N).any(), "no folder sample was swapped in"
    assert set(mem.catalog.label[in_em].tolist()) <= {0, 1}  # classes 2 and 3 never came in
    batch = mem.sample(8, seed=1)
    for i, x, y in zip(batch.ids.tolist(), batch.x, batch.y.tolist()):
        if i < FOLDER_N:  # the folder's image of that id, decoded, with its class as label
            want = decode_png((folder / f"c{y}" / f"{i - y * PER_CLASS:02d}.png").read_bytes())
            assert (x.numpy()[0] == want).all() and i // PER_CLASS == y
        else:
            assert (x == 255).all()
    mem.flush()
    assert mem.tiers[0].store.ids().tolist() == ids.tolist()  # stream samples went to LMDB only
    mem.close()
    assert digest(folder) == before  # nothing was written into the folder

    mem = CarouselMemory.from_dict(config(tmp_path, folder))
    assert mem.add(*stream(2, [2]), task=1).tolist() == [FOLDER_N + 8, FOLDER_N + 9]  # ids continue
    mem.wait_admitted()
    assert set(mem.catalog.available_by_class()) == {0, 1, 2}  # 3 is still dormant after the restart
    mem.close()
    (folder / "c3" / "99.png").write_bytes(encode_png(np.zeros(SHAPE[1:], np.uint8)))
    with pytest.raises(ConfigError, match="changed since this memory adopted it"):
        CarouselMemory.from_dict(config(tmp_path, folder))


def test_folder_as_the_only_tier_keeps_stream_samples_in_the_em(tmp_path):
    folder = write_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="memory.state_dir"):
        CarouselMemory.from_dict(config(tmp_path, folder, writable=False, state=False))
    mem = CarouselMemory.from_dict(config(tmp_path, folder, writable=False, workers=0))
    ids = mem.add(*stream(8, [0, 1]), task=0)
    replay(mem, 20)
    swapped_out = ids.numpy()[mem.catalog.slot[ids.numpy()] < 0]
    assert swapped_out.size and (mem.catalog.home[swapped_out] == EVICTED).all()  # no other place: evicted
    assert mem.stats()["evicted"] == swapped_out.size
    in_em = mem.pool.slot_ids[mem.pool.slot_ids >= 0]
    assert (in_em < FOLDER_N).any() and set(mem.catalog.label[in_em].tolist()) <= {0, 1}
    assert len(mem.tiers[0].store) == FOLDER_N
    mem.close()


def test_refusals(tmp_path):
    folder = write_folder(tmp_path / "data")
    cfg = config(tmp_path, folder)
    cfg["tiers"].reverse()  # the folder above a writable tier
    with pytest.raises(ConfigError, match="read-only .* put it last"):
        CarouselMemory.from_dict(cfg)
    cfg = config(tmp_path / "extras", folder)
    cfg["memory"]["extras"] = {"logits": {"shape": [4], "dtype": "float32"}}  # DER++'s: no folder has them
    with pytest.raises(Exception, match=r"\['logits'\]"):
        CarouselMemory.from_dict(cfg)
    mem = CarouselMemory.from_dict(config(tmp_path / "used", folder, workers=0))  # a memory that holds samples ...
    mem.add(*stream(2, [0]), task=0)
    mem.close()
    folder2 = write_folder(tmp_path / "data2")
    cfg = config(tmp_path / "used", folder2)
    (tmp_path / "used" / "state" / "adopted.json").unlink()  # ... given a folder it did not adopt
    with pytest.raises(ConfigError, match="already handed out sample ids"):
        CarouselMemory.from_dict(cfg)


@pytest.mark.parametrize("deterministic", [False, True])
def test_capacity_evicts_from_the_last_writable_tier_never_from_the_folder(tmp_path, deterministic):
    folder = write_folder(tmp_path / "data")
    before = digest(folder)
    cfg = config(tmp_path, folder, deterministic=deterministic)
    cfg["tiers"][0]["capacity"] = 10
    mem = CarouselMemory.from_dict(cfg)
    for _ in range(5):
        mem.add(*stream(8, [0, 1]), task=0)
        replay(mem, 2)
    mem.flush()
    lmdb, adopted = mem.tiers
    assert 10 <= len(lmdb.store) <= 10 + mem.pool.size and mem.stats()["evicted"] == 40 - len(lmdb.store)
    assert len(adopted.store) == FOLDER_N and (mem.catalog.home[:FOLDER_N] == 1).all()
    mem.close()
    assert digest(folder) == before


class FrozenMonotonic:
    """The ``time`` module with ``monotonic()`` stopped at its value when made."""

    def __init__(self) -> None:
        self._now = time.monotonic()

    def monotonic(self) -> float:
        return self._now

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_swap_engine_counts_a_woken_class_at_once(tmp_path, monkeypatch):
    """The swap engine's per-class count is cached (a pass over every id); a class the stream just
    woke in the folder is counted at the next look, however fresh the cache, so the very next
    swaps may draw from it. The engine's clock is frozen (its module's only: every other thread's
    timeouts run on), so no age can explain the recount."""
    folder = write_folder(tmp_path / "data")
    with CarouselMemory.from_dict(config(tmp_path, folder)) as mem:
        engine = mem._engine
        assert engine.available_by_class() == {}  # counted now: every folder class dormant
        monkeypatch.setattr(swap_engine, "time", FrozenMonotonic())
        assert engine.available_by_class(want={0}) == {}  # fresh, and nothing woke: not recounted
        mem.add(*stream(4, [0]), task=0)
        assert mem.wait_admitted()  # class 0 woke when the add was registered
        assert engine.available_by_class(want={0}) == {0: PER_CLASS}
