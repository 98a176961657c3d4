"""The integrity mode in-process (``memory.verify``, ``CAROUSEL_VERIFY``; issue 20, item 1).

Real LMDB, flat and Zarr tiers on disk; swapping, write-behind and tier migration running. The
injections reach into the EM (``mem.pool.arrays``) or replace stored records through the stores'
own API, the way a bug or a wrong write would, and every one must raise :class:`IntegrityError`
naming the id and the EM slot; honest runs must never raise.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import carousel
from carousel import CarouselMemory, ConfigError
from carousel.config import CarouselConfig
from carousel.em_pool import torch_dtype
from carousel.integrity import CRC, SLOT, IntegrityError
from storage_backends import open_store

SHAPE = (3, 8, 8)
CLASSES = 6


def config(tmp_path, em=64, verify=True, lmdb=120, ratio=1.0, workers=1, **memory):
    """An LMDB tier of ``lmdb`` samples overflowing into a flat tier (migration), swaps from task 0,
    DER++-style logits as an extra field."""
    return {"memory": {"em_size": em, "sample_shape": list(SHAPE), "seed": 0, "verify": verify,
                       "extras": {"logits": {"shape": [CLASSES], "dtype": "float32"}}, **memory},
            "swap": {"ratio": ratio, "workers": workers, "start_task": 0, "prefetch_depth": 64},
            "write_behind": {"queue_samples": 1024, "batch": 16},
            "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": lmdb},
                      {"kind": "flat", "path": str(tmp_path / "disk"), "capacity": 100000}]}


def data(n, seed, task=0, classes=CLASSES):
    """Distinct random samples (no two alike: a wrong pair always shows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y, task, torch.randn(n, CLASSES, generator=g)


def add(mem, n, seed, task=0):
    x, y, t, logits = data(n, seed, task)
    return mem.add(x, y, t, logits=logits)


def checked(mem, result="ok"):
    return mem.registry.get_sample_value("carousel_integrity_checked_samples_total", {"result": result}) or 0.0


def test_off_by_default_nothing_allocated_nothing_checked(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, verify=False)) as mem:
        assert mem.verifier is None and mem.catalog.crc is None
        add(mem, 40, seed=1)
        mem.flush()  # admitted (on the write-behind thread) and stored
        slot = int(np.flatnonzero(mem.pool.slot_ids >= 0)[0])
        mem.pool.arrays["x"][slot] ^= 0xFF  # unchecked: the batch is handed out as it is
        batch = mem.sample(64, seed=0)
        row = int(np.flatnonzero(batch.ids.numpy() == mem.pool.slot_ids[slot])[0])
        assert torch.equal(batch.x[row], torch.from_numpy(mem.pool.arrays["x"][slot]))
        assert mem.sample_with_references(8)[1] is None
        assert checked(mem) == 0
        mem.checkpoint()
        with np.load(tmp_path / "flash-state" / "em-state.npz") as state:
            assert "crc" not in state.files


def test_the_environment_turns_it_on_and_bad_values_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CAROUSEL_VERIFY", "1")
    with CarouselMemory.from_dict(config(tmp_path, verify=False)) as mem:
        assert mem.verifier is not None and mem.verifier.checked == ("x", "y", "task", "logits")
        assert mem.catalog.crc.shape[1] == 4
    monkeypatch.setenv("CAROUSEL_VERIFY", "sometimes")
    with pytest.raises(ConfigError, match="CAROUSEL_VERIFY: expected 1, true"):
        CarouselMemory.from_dict(config(tmp_path / "b"))
    monkeypatch.delenv("CAROUSEL_VERIFY")
    with pytest.raises(ConfigError, match="memory.verify: expected true or false"):
        CarouselConfig.from_dict({"memory": {"em_size": 4, "sample_shape": [2], "verify": "yes"}})
    assert carousel.IntegrityError is IntegrityError and issubclass(IntegrityError, RuntimeError)


def test_no_false_alarm_under_swaps_write_behind_migration_and_a_restart(tmp_path):
    """Many steps of add / sample / observe with swaps at ratio 1 from task 0, write-behind in small
    batches and an LMDB tier overflowing into a flat one, a second thread sampling with filters,
    seeds and ``sample_into``; then a restart from the checkpoint and more of the same. Nothing
    raises, and every row handed out was checked."""
    cfg = config(tmp_path)
    rows, other_rows, errors, stop = [0], [0], [], threading.Event()

    def other_sampler(mem):
        out = {name: torch.zeros((16, *t.shape[1:]), dtype=t.dtype) for name, t in mem.pool.tensors.items()}
        out["id"] = torch.zeros(16, dtype=torch.int64)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                got = (len(mem.sample(16, classes=[i % CLASSES])), len(mem.sample(24, seed=i)),
                       mem.sample_into(16, out), len(mem.sample(8, balanced=True)))
                other_rows[0] += sum(got)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    for round_ in range(2):
        with CarouselMemory.from_dict(cfg) as mem:
            thread = threading.Thread(target=other_sampler, args=(mem,))
            thread.start()
            try:
                for task in range(3):
                    for step in range(25):
                        add(mem, 16, seed=round_ * 10_000 + task * 100 + step, task=task)
                        b = mem.sample(32)
                        rows[0] += len(b)
                        mem.observe(b.ids, logits=torch.randn(len(b), CLASSES))
            finally:
                stop.set()
                thread.join()
                stop.clear()
            assert not errors, errors[0]
            mem.flush()
            mem._engine.wait_idle()
            s = mem.stats()
            assert s["swapped_in"] > 50
            assert s["tiers"]["1-flat"]["samples"] > 0  # the LMDB tier overflowed: migration ran
            b = mem.sample(64, seed=round_)  # after every swap and migration, all of the EM
            rows[0] += len(b)
            assert checked(mem) == rows[0] + other_rows[0] and checked(mem, "mismatch") == 0
            assert other_rows[0] > 0
            rows[0] = other_rows[0] = 0


@pytest.mark.parametrize("injection", ["x", "labels swapped", "logits", "ids swapped"])
def test_a_wrong_pair_in_the_em_is_caught_naming_the_id_and_slot(tmp_path, injection):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        add(mem, 48, seed=2)
        mem.flush()
        pool = mem.pool
        slots = np.flatnonzero(pool.slot_ids >= 0)
        a = int(slots[0])
        b = int(slots[np.flatnonzero(pool.slot_labels[slots] != pool.slot_labels[a])[0]])
        want_fields = {"x": ("x",), "labels swapped": ("y",), "logits": ("logits",),
                       "ids swapped": ("x", "y", "logits")}[injection]  # every sample has task 0
        touched = [a] if injection in ("x", "logits") else [a, b]
        if injection == "x":
            pool.arrays["x"][a, 0, 0, 0] ^= 1  # one bit of one pixel
        elif injection == "logits":
            pool.arrays["logits"][a, 0] += 1.0
        elif injection == "labels swapped":
            pool.arrays["y"][[a, b]] = pool.arrays["y"][[b, a]]
        else:  # each slot now claims the other's id: every field is another sample's
            pool.slot_ids[[a, b]] = pool.slot_ids[[b, a]]
        ids = [int(pool.slot_ids[s]) for s in touched]
        others = [c for c in np.unique(pool.slot_labels[slots]).tolist()
                  if c not in pool.slot_labels[touched].tolist()]
        assert len(mem.sample(48, classes=others, seed=0)) > 0  # a batch without them passes
        for draw in (lambda: mem.sample(48, seed=0), lambda: mem.sample(48)):  # seeded, and the shuffled pass
            with pytest.raises(IntegrityError) as info:
                draw()
            err = info.value
            assert sorted(err.ids) == sorted(ids) and sorted(err.slots) == sorted(touched)
            assert all(m.fields == want_fields for m in err.mismatches)
            for i, s in zip(ids, touched):
                assert f"id {i} in EM slot {s}: {want_fields[0]} (" in str(err)
        if injection == "labels swapped":
            assert f"label expected {int(mem.catalog.label[ids[0]])}, got {int(pool.arrays['y'][a])}" in str(err)
        assert checked(mem, "mismatch") == 2 * len(touched)


def _wrong_records(store, ids, donors):
    """Give stored ``ids`` the records of ``donors``: valid records with valid CRCs, of other samples."""
    store.put_many(np.asarray(ids, np.int64), store.get_many(np.asarray(donors, np.int64)))


def test_a_wrong_record_on_storage_is_caught_after_a_restart(tmp_path):
    """The references come back from the checkpoint (computed at add()), so a record replaced on
    storage while the memory was closed is caught once the restart brings it into the EM."""
    cfg = config(tmp_path, lmdb=1000)
    with CarouselMemory.from_dict(cfg) as mem:
        ids = add(mem, 40, seed=3).numpy()
        mem.flush()  # registered (with the references add() computed) on the write-behind thread
        refs = mem.catalog.crc[ids].copy()
    store = open_store(CarouselConfig.from_dict(cfg).tiers[0].url())
    try:
        _wrong_records(store, [ids[5]], [ids[6]])
    finally:
        store.close()
    with CarouselMemory.from_dict(cfg) as mem:
        assert (mem.catalog.crc[ids] == refs).all()  # the add-time references, not the records'
        with pytest.raises(IntegrityError) as info:
            mem.sample(40, seed=0)
        assert info.value.ids == [int(ids[5])] and info.value.slots == [int(mem.catalog.slot[ids[5]])]
        assert "x" in info.value.mismatches[0].fields


def test_a_wrong_record_swapped_in_is_caught(tmp_path):
    """A record replaced on storage while the memory runs reaches the EM through a swap-in: caught."""
    with CarouselMemory.from_dict(config(tmp_path, em=12, lmdb=60, workers=0)) as mem:
        x, y, _, logits = data(200, seed=4, classes=2)
        mem.add(x, y, 0, logits=logits)
        mem.flush()
        em = set(mem.pool.slot_ids.tolist())
        for tier in mem.tiers:  # every stored sample outside the EM gets the record of another of its class
            stored = tier.store.ids()
            stored = stored[~np.isin(stored, list(em))]
            labels = mem.catalog.label[stored]
            for c in np.unique(labels):
                same = stored[labels == c]
                _wrong_records(tier.store, same, np.roll(same, 1))
        b = mem.sample(12, seed=0)  # the EM is intact so far
        mem.observe(b.ids, logits=torch.randn(len(b), CLASSES))  # ratio 1, synchronous: swaps now
        assert mem.stats()["swapped_in"] > 0
        with pytest.raises(IntegrityError) as info:
            mem.sample(12, seed=1)
        swapped_in = set(mem.pool.slot_ids.tolist()) - em
        assert set(info.value.ids) == swapped_in


def test_references_of_a_memory_first_opened_in_verify_mode_come_from_its_records(tmp_path):
    """A memory written without the integrity mode, reopened with it: the references are computed
    from the stored records (nothing else knows them), so it samples without false alarms; the
    next checkpoint keeps them."""
    with CarouselMemory.from_dict(config(tmp_path, verify=False)) as mem:
        ids = add(mem, 150, seed=5).numpy()  # beyond the LMDB tier's 120: in both tiers
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        x, y, t, logits = data(150, seed=5)
        stored = ids[mem.catalog.home[ids] >= 0]
        want = mem.verifier.crcs({"x": x.numpy(), "y": y.numpy(), "task": np.zeros(150, np.int16),
                                  "logits": logits.numpy()})
        assert (mem.catalog.crc[stored] == want[np.searchsorted(ids, stored)]).all()
        assert len(mem.sample(64, seed=0)) == 64
    with np.load(tmp_path / "flash-state" / "em-state.npz") as state:
        assert state["crc_fields"].tolist() == ["x", "y", "task", "logits"]
        assert (state["crc"][stored] == want[np.searchsorted(ids, stored)]).all()


def test_sample_into_fills_reference_columns_when_it_has_them(tmp_path):
    """What the daemon's filler does: the rows and their references into a ring slot, unchecked;
    the reader checks them (the daemon's client: tests/daemon/test_integrity.py)."""
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        add(mem, 20, seed=6)
        out = {name: torch.zeros((32, *shape), dtype=torch_dtype(dtype))
               for name, (shape, dtype) in {"id": ((), "int64"), **mem.fields, **mem.verifier.columns}.items()}
        k = mem.sample_into(32, out)
        assert k == 20 and checked(mem) == 0
        rows = {name: t[:k] for name, t in out.items()}
        refs = {name: rows.pop(name) for name in mem.verifier.columns}
        assert (refs[SLOT].numpy() == mem.catalog.slot[rows["id"].numpy()]).all()
        assert refs[CRC].shape == (k, 4)
        assert mem.verifier.check(rows, refs) == k
        rows["x"][3] += 1
        with pytest.raises(IntegrityError, match=f"id {int(rows['id'][3])} in EM slot {int(refs[SLOT][3])}: x"):
            mem.verifier.check(rows, refs)


# ---- coreset weights ----------------------------------------------------------------------------------
def coreset(tmp_path, em=30):
    return {"memory": {"em_size": em, "sample_shape": [4], "kind": "coreset", "seed": 0, "verify": True},
            "swap": {"ratio": 1.0, "start_task": 0},
            "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 10000}]}


def test_retain_under_concurrent_sampling_gives_no_false_alarm(tmp_path):
    """retain() changes the catalog's weights (the references) and the EM's in one step under the
    EM lock: samplers in other threads never see them disagree."""
    with CarouselMemory.from_dict(coreset(tmp_path)) as mem:
        assert mem.verifier.weight and "weight" not in mem.verifier.checked
        y = np.repeat(np.arange(3), 20)
        ids = mem.add(np.arange(60, dtype=np.uint8)[:, None].repeat(4, 1), y, 0).numpy()
        mem.flush()
        errors, stop, draws = [], threading.Event(), [0]

        def sampler(seed):
            try:
                while not stop.is_set():
                    mem.sample(30)
                    mem.sample(10, classes=[seed % 3], seed=draws[0])
                    draws[0] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=sampler, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        rng = np.random.default_rng(0)
        try:
            for i in range(30):
                c = i % 3
                pick = rng.choice(ids[y == c], 8, replace=False)
                mem.retain(pick, rng.random(8).astype(np.float32) * 4, classes=[c])
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[0]
        assert draws[0] > 10 and checked(mem) > 0


def test_a_wrong_weight_in_the_em_is_caught(tmp_path):
    with CarouselMemory.from_dict(coreset(tmp_path)) as mem:
        ids = mem.add(np.zeros((6, 4), np.uint8), [0, 0, 1, 1, 2, 2], 0).numpy()
        mem.retain(ids[:2], [0.25, 0.5], classes=[0])
        slot = int(mem.catalog.slot[ids[1]])
        mem.pool.arrays["weight"][slot] = 7.0
        with pytest.raises(IntegrityError) as info:
            mem.sample(6, seed=0)
        assert info.value.ids == [int(ids[1])] and info.value.mismatches[0].fields == ("weight",)
        assert f"id {ids[1]} in EM slot {slot}: weight (expected 0.5, got 7.0)" in str(info.value)


# ---- saliency ------------------------------------------------------------------------------------------
def test_a_saliency_memory_checks_everything_but_the_decoded_image(tmp_path):
    """Swapped-in samples hold decoded, lossy images: no false alarm for them; a wrong label still shows."""
    cfg = {"memory": {"em_size": 16, "sample_shape": [1, 8, 8], "kind": "saliency", "seed": 0, "verify": True,
                      "saliency": {"theta": 0.5, "background_bits": 2}},
           "swap": {"ratio": 1.0, "start_task": 0, "workers": 0},
           "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 10000, "codec": "zstd"}]}
    with CarouselMemory.from_dict(cfg) as mem:
        assert mem.verifier.checked == ("y", "task")
        g = torch.Generator().manual_seed(7)
        x = torch.randint(0, 256, (120, 1, 8, 8), dtype=torch.uint8, generator=g)
        sal = torch.rand(120, 8, 8, generator=g)
        mem.add(x, torch.arange(120) % 4, 0, saliency=sal)
        mem.flush()
        for _ in range(10):
            b = mem.sample(16)
            mem.observe(b.ids, logits=torch.randn(len(b), 4))
        assert mem.stats()["swapped_in"] > 16
        b = mem.sample(16, seed=0)
        decoded = [i for i, row in zip(b.ids.tolist(), b.x) if not torch.equal(row, x[i])]
        assert decoded  # lossy images in the EM, and no alarm for them
        slot = int(mem.catalog.slot[decoded[0]])
        mem.pool.arrays["y"][slot] = (mem.pool.arrays["y"][slot] + 1) % 4
        with pytest.raises(IntegrityError, match=f"id {decoded[0]} in EM slot {slot}: y"):
            mem.sample(16, seed=0)
