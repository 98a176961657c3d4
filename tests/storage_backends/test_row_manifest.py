"""The row manifest's lookups agree with a dict whether the ids are dense (looked up by id) or
sparse (bisected), across switches between the two and a reopen."""

import numpy as np

from storage_backends import row_manifest
from storage_backends.row_manifest import Manifest


def check(man: Manifest, model: dict[int, tuple[int, int]], probe: np.ndarray) -> None:
    found, rows, crcs = man.lookup(probe)
    for i, f, r, c in zip(probe.tolist(), found.tolist(), rows.tolist(), crcs.tolist()):
        assert f == (i in model), i
        if f:
            assert (r, c) == model[i], i


def test_lookups_match_a_dict_in_dense_and_sparse_modes(tmp_path):
    rng = np.random.default_rng(0)
    model: dict[int, tuple[int, int]] = {}
    man = Manifest(tmp_path / "m", 0, writable=True, sync=False)
    modes = set()
    next_row = 0
    for step in range(120):
        # mostly sequential ids; now and then far-away ones, which make the set sparse for a while
        if step % 40 == 39:
            ids = rng.choice(np.arange(10**9, 10**9 + 10**6), 5, replace=False)
        else:
            ids = np.unique(rng.integers(0, 3000 + 100 * step, 50))
        ids = ids.astype(np.int64)
        rows = np.arange(next_row, next_row + ids.size, dtype=np.int64)
        next_row += ids.size
        crcs = rng.integers(0, 2**32, ids.size, dtype=np.uint32)
        man.put(ids, rows, crcs)
        model.update({int(i): (int(r), int(c)) for i, r, c in zip(ids, rows, crcs)})
        if step % 3 == 0 and model:
            gone = rng.choice(np.fromiter(model, np.int64), min(20, len(model)), replace=False)
            man.delete(gone)
            for i in gone.tolist():
                del model[i]
        if step % 40 == 39:  # drop the far-away ids again: dense once more
            far = np.array([i for i in model if i >= 10**9], dtype=np.int64)
            man.delete(far)
            for i in far.tolist():
                del model[i]
        modes.add(man._dense is not None)
        probe = np.concatenate([rng.integers(0, 20000, 300), np.fromiter(model, np.int64)[:50],
                                [10**9 + 7, 2**40]]).astype(np.int64)
        check(man, model, probe)
    assert modes == {True, False}  # both paths were taken
    man.close()
    again = Manifest(tmp_path / "m", 0, writable=False, sync=False)
    check(again, model, np.concatenate([np.fromiter(model, np.int64), np.arange(5000)]))


def test_sparse_ids_keep_no_dense_arrays(tmp_path):
    man = Manifest(tmp_path / "m", 0, writable=True, sync=False)
    man.put(np.array([5, row_manifest.DENSE_MIN * 10]), np.array([0, 1]), np.array([7, 8], np.uint32))
    assert man._dense is None
    found, rows, crcs = man.lookup(np.array([row_manifest.DENSE_MIN * 10, 6]))
    assert found.tolist() == [True, False] and rows[0] == 1 and crcs[0] == 8
    man.close()


def test_rows_from_allocate_through_appends_replacements_and_deletes(tmp_path):
    # As a store uses it: rows come from allocate() (the lowest free ones), and puts are appends of
    # new highest ids (a memory's stream), replacements of live ids only (a ring buffer going round)
    # or a mix; each kind takes its own path in the manifest, all agreeing with a dict.
    rng = np.random.default_rng(1)
    model: dict[int, tuple[int, int]] = {}
    man = Manifest(tmp_path / "m", 0, writable=True, sync=False)
    top = 0
    for step in range(300):
        kind = step % 4
        if kind in (0, 1) or not model:  # append: ids above every live one
            ids = np.arange(top, top + int(rng.integers(1, 40)), dtype=np.int64)
            top = int(ids[-1]) + 1
        elif kind == 2:  # replace live ids only
            ids = rng.choice(np.fromiter(model, np.int64), min(len(model), int(rng.integers(1, 30))), replace=False)
        else:  # a mix: some live, some new below the top (inserted), some above it
            live = rng.choice(np.fromiter(model, np.int64), min(len(model), 5), replace=False)
            holes = np.setdiff1d(np.arange(top), np.fromiter(model, np.int64))[:5]
            ids = np.unique(np.concatenate([live, holes, [top + 3]])).astype(np.int64)
            top += 4
        occupied = {r for r, _ in model.values()}
        want_free = [r for r in range(man.capacity) if r not in occupied][:ids.size]
        rows = man.allocate(ids.size)
        if rows is None:  # fewer free rows than asked: the store grows its file, then asks again
            assert len(want_free) < ids.size
            man.grow(max(2 * man.capacity, man.capacity + ids.size))
            want_free = [r for r in range(man.capacity) if r not in occupied][:ids.size]
            rows = man.allocate(ids.size)
        assert rows.tolist() == want_free  # the lowest free rows, as before the search kept a hint
        crcs = rng.integers(0, 2**32, ids.size, dtype=np.uint32)
        man.put(ids, rows, crcs)
        model.update({int(i): (int(r), int(c)) for i, r, c in zip(ids, rows, crcs)})
        if step % 7 == 6:
            gone = rng.choice(np.fromiter(model, np.int64), min(10, len(model)), replace=False)
            man.delete(gone)
            for i in gone.tolist():
                del model[i]
        assert man.ids.tolist() == sorted(model)
        assert man.rows.tolist() == [model[i][0] for i in sorted(model)]
        assert sorted(np.flatnonzero(man.row_id >= 0).tolist()) == sorted(r for r, _ in model.values())
        check(man, model, np.arange(top + 5, dtype=np.int64))
    man.close()
    again = Manifest(tmp_path / "m", 0, writable=True, sync=False)  # snapshot + journal replayed
    assert again.ids.tolist() == sorted(model)
    check(again, model, np.arange(top + 5, dtype=np.int64))
    occupied = {r for r, _ in model.values()}
    assert again.allocate(3).tolist() == [r for r in range(again.capacity) if r not in occupied][:3]


def test_allocating_no_rows_gives_an_empty_array(tmp_path):
    man = Manifest(tmp_path / "m", 4, writable=True, sync=False)
    assert man.allocate(0).tolist() == [] and man.allocate(4).tolist() == [0, 1, 2, 3]
    assert man.allocate(5) is None
