"""Flat store: the conformance suite plus what only a flat file has (its rows, its map)."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from storage_backends import (
    CorruptRecordError,
    CorruptStoreError,
    FlatStore,
    Schema,
    StoreFullError,
    StoreNotFoundError,
    open_store,
)
from storage_backends import flat_store
from storage_backends.records import CRC_BYTES
from tests.conformance.store_tests import SCHEMA, SampleStoreTests, assert_batch_equal, make_batch

ROOT = Path(__file__).resolve().parents[2]


class TestFlatStore(SampleStoreTests):
    def make_url(self, path: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"chunk": "16", **params}.items())
        return f"flat://{path}?{query}"

    def test_is_a_flat_store(self, store):
        assert isinstance(store, FlatStore)
        assert store.chunk_rows == 16 and not store.prefers_chunks


class TestFlatStoreNoSync(TestFlatStore):
    """The whole suite again with durability left to flush()."""

    def make_url(self, path: str, **params: str) -> str:
        return super().make_url(path, sync="0", **params)


# ---- what only a flat file has: its rows, its length, its metadata -------------------------------
def flat_url(path: Path, query: str = "chunk=16") -> str:
    return f"flat://{path}?{query}"


def row_offsets(store, ids) -> np.ndarray:
    """Byte offset in rows.bin of each id's row, from the manifest."""
    found, rows, _ = store._manifest.lookup(np.asarray(ids, dtype=np.int64))
    assert found.all()
    return rows * (store.schema.record_nbytes + CRC_BYTES)


def row_size() -> int:
    return Schema(SCHEMA).record_nbytes + CRC_BYTES


def subset(batch: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in batch.items()}


def digest(store_dir: Path) -> dict[str, str]:
    """sha256 of every file of a store but its lock file."""
    return {str(p.relative_to(store_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store_dir.rglob("*")) if p.is_file() and p.name != "writer.lock"}


def test_stale_row_of_another_id_is_caught_and_quarantined(tmp_path):
    """A row holding another id's record passes its own CRC: the manifest's CRC must catch it."""
    store_dir = tmp_path / "s"
    url = flat_url(store_dir)
    ids = np.arange(100, 148)
    want = make_batch(ids, seed=1)
    victim, donor = 117, 140
    with open_store(url, SCHEMA) as s:
        s.put_many(ids[:24], subset(want, ids < 124))  # two calls: rows of two batches
        s.put_many(ids[24:], subset(want, ids >= 124))
        victim_off, donor_off = row_offsets(s, [victim, donor]).tolist()
    step = row_size()
    with open(store_dir / "rows.bin", "r+b") as fh:
        fh.seek(donor_off)
        row = fh.read(step)
        fh.seek(victim_off)
        fh.write(row)
    # The copied row is intact on its own (its trailer is its record's CRC-32C) ...
    assert google_crc32c.value(row[:-CRC_BYTES]) == int.from_bytes(row[-CRC_BYTES:], "little")
    # ... and it holds the donor's record (x first, then y): not the victim's.
    donor_x = want["x"][ids == donor].tobytes()
    assert row[:len(donor_x)] == donor_x
    keep = ids != victim

    with open_store(url + "&mode=ro") as ro:  # detected, never returned, left in place
        for request in ([victim], ids, [donor, victim, 100]):
            with pytest.raises(CorruptRecordError) as info:
                ro.get_many(request)
            assert info.value.ids.tolist() == [victim]
        with pytest.raises(CorruptRecordError) as info:  # the chunk path checks too
            ro.get_chunk(int(ro.chunk_of([victim])[0]))
        assert info.value.ids.tolist() == [victim]
        assert ro.quarantined_ids().size == 0 and victim in ro.ids()

    with open_store(url) as s:
        with pytest.raises(CorruptRecordError, match=r"\b117\b") as info:
            s.get_many(ids)
        assert info.value.ids.tolist() == [victim]
        assert s.quarantined_ids().tolist() == [victim]
        assert np.array_equal(s.ids(), ids[keep]) and len(s) == ids.size - 1
        assert_batch_equal(s.get_many(ids[keep]), subset(want, keep))
        assert_batch_equal(s.get_many([donor]), subset(want, ids == donor))  # the donor is untouched
    with open_store(url) as s:  # the quarantine is persistent, the id writable afresh
        assert s.quarantined_ids().tolist() == [victim]
        assert_batch_equal(s.get_many(ids[keep]), subset(want, keep))
        s.put_many([victim], make_batch([victim], seed=9))
        assert_batch_equal(s.get_many([victim]), make_batch([victim], seed=9))


def _truncated_store(tmp_path: Path, cut: str):
    """A closed store of 40 records whose rows.bin is cut ``cut``: ``(url, ids, want, lost)``."""
    store_dir = tmp_path / "s"
    url = flat_url(store_dir, "chunk=8&sync=0")
    ids = np.arange(1000, 1040) * 7
    want = make_batch(ids, seed=3)
    with open_store(url, SCHEMA) as s:
        for lo in range(0, ids.size, 10):
            s.put_many(ids[lo:lo + 10], {k: v[lo:lo + 10] for k, v in want.items()})
        offsets = row_offsets(s, ids)
    step = row_size()
    rows = offsets // step
    assert sorted(rows.tolist()) == list(range(40))  # rows are handed out lowest first
    cut_row = {"mid_row": 29, "short_of_one_row": 0}[cut]
    os.truncate(store_dir / "rows.bin", cut_row * step + step // 2)  # in the middle of row cut_row
    return url, ids, want, np.sort(ids[rows >= cut_row])


@pytest.mark.parametrize("cut", ["mid_row", "short_of_one_row"])
def test_truncated_rows_file_reopened_read_write(tmp_path, cut):
    url, ids, want, lost = _truncated_store(tmp_path, cut)
    step = row_size()
    rows_bin = tmp_path / "s" / "rows.bin"
    keep = ~np.isin(ids, lost)
    with open_store(url) as s:
        assert rows_bin.stat().st_size % step == 0  # given its length back, in whole rows
        assert np.array_equal(s.ids(), np.sort(ids))  # the cut-off ids are found on read
        with pytest.raises(CorruptRecordError) as info:
            s.get_many(ids)
        assert info.value.ids.tolist() == lost.tolist()
        assert s.quarantined_ids().tolist() == lost.tolist()
        assert np.array_equal(s.ids(), np.sort(ids[keep]))
        assert_batch_equal(s.get_many(ids[keep]), subset(want, keep))
        # New records (into the rows the lost ones held) and replacements still work.
        new = np.concatenate([lost[:3], np.arange(1, 30)])
        if keep.any():
            new = np.concatenate([new, ids[keep][:5]])
        fresh = make_batch(new, seed=4)
        s.put_many(new, fresh)
        assert_batch_equal(s.get_many(new), fresh)
    live = np.union1d(ids[keep], new)
    with open_store(url) as s:
        assert np.array_equal(s.ids(), live)
        # The quarantine persists (whether an id written afresh stays listed is not the point here).
        assert np.isin(np.setdiff1d(lost, new), s.quarantined_ids()).all()
        assert np.isin(s.quarantined_ids(), lost).all()
        assert_batch_equal(s.get_many(new), fresh)
        old = np.setdiff1d(ids[keep], new)
        assert_batch_equal(s.get_many(old), subset(want, np.isin(ids, old)))
        chunked = np.sort(np.concatenate([c.ids for c in s.iter_chunks()]))
        assert np.array_equal(chunked, live)
    assert rows_bin.stat().st_size % step == 0


TRUNC_RO_SRC = r'''
import json, os, sys
import numpy as np
from storage_backends import CorruptRecordError, open_store
from tests.conformance.store_tests import make_batch

url, rows_bin = sys.argv[1], sys.argv[2]
ids = np.array(json.loads(sys.argv[3]), dtype=np.int64)
size = os.path.getsize(rows_bin)
out = {}
with open_store(url) as ro:
    out["ids"] = ro.ids().tolist()
    for name, request in (("batch", ids), ("reversed", ids[::-1])):
        try:
            ro.get_many(request)
            out[name] = None
        except CorruptRecordError as exc:
            out[name] = exc.ids.tolist()
    bad = set(out["batch"] or [])
    good = np.array([i for i in ids.tolist() if i not in bad], dtype=np.int64)
    got, want = ro.get_many(good), make_batch(good, seed=3)
    out["intact"] = all(got[k].tobytes() == want[k].tobytes() for k in want)
    out["good"] = good.tolist()
    out["quarantined"] = ro.quarantined_ids().tolist()
out["size_unchanged"] = os.path.getsize(rows_bin) == size
print(json.dumps(out))
'''


@pytest.mark.parametrize("cut", ["mid_row", "short_of_one_row"])
def test_truncated_rows_file_reopened_read_only(tmp_path, cut):
    """In a child: a map touched past the end of its file is SIGBUS, which must not happen."""
    url, ids, want, lost = _truncated_store(tmp_path, cut)
    script = tmp_path / "trunc_ro.py"
    script.write_text(TRUNC_RO_SRC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, str(script), url + "&mode=ro", str(tmp_path / "s" / "rows.bin"),
                        json.dumps(ids.tolist())], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, f"the read-only open died (rc {r.returncode}): {r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ids"] == np.sort(ids).tolist()  # read-only: nothing quarantined, nothing written
    assert out["batch"] == out["reversed"] == lost.tolist()
    assert out["good"] == ids[~np.isin(ids, lost)].tolist() and out["intact"]
    assert out["quarantined"] == [] and out["size_unchanged"]


def test_growth_over_many_calls_keeps_every_record(tmp_path):
    """rows.bin doubles from 1,024 rows to 8,192 while ids are added, replaced and deleted."""
    rows_bin = tmp_path / "s" / "rows.bin"
    url = flat_url(tmp_path / "s", "chunk=64&sync=0")
    step = row_size()
    rng = np.random.default_rng(11)
    batches: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    model: dict[int, tuple[int, int]] = {}  # id -> (batch, position in it)

    def expected(ids: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: np.empty((ids.size, *v.shape[1:]), v.dtype) for k, v in batches[0][1].items()}
        for pos, i in enumerate(ids.tolist()):
            b, j = model[i]
            for k in out:
                out[k][pos] = batches[b][1][k][j]
        return out

    sizes = []
    with open_store(url, SCHEMA) as s:
        for call in range(60):
            new = np.arange(call * 100, call * 100 + 100)
            live = np.fromiter(model, np.int64, len(model))
            old = rng.choice(live, 30, replace=False) if live.size else live
            ids = rng.permutation(np.concatenate([new, old]))
            batch = make_batch(ids, seed=call)
            s.put_many(ids, batch)
            batches.append((ids, batch))
            model.update({int(i): (call, j) for j, i in enumerate(ids)})
            assert_batch_equal(s.get_many(ids), batch)  # read through the map as it is now
            if call % 3 == 2:
                gone = rng.choice(np.fromiter(model, np.int64, len(model)), 40, replace=False)
                s.delete_many(gone)
                for i in gone.tolist():
                    del model[i]
            sizes.append(rows_bin.stat().st_size)
        live = np.sort(np.fromiter(model, np.int64, len(model)))
        assert np.array_equal(s.ids(), live) and len(s) == live.size == 5200
        assert_batch_equal(s.get_many(live), expected(live))
        assert s.nbytes >= live.size * Schema(SCHEMA).record_nbytes * 0.5 > 0
    grown = sorted(set(sizes))
    assert [size // step for size in grown] == [flat_store._MIN_ROWS << k for k in range(4)], grown
    assert all(size % step == 0 for size in sizes)
    with open_store(url) as s:
        assert rows_bin.stat().st_size == grown[-1]
        assert np.array_equal(s.ids(), live)
        pick = rng.permutation(live)
        assert_batch_equal(s.get_many(pick), expected(pick))
        chunked = np.sort(np.concatenate([c.ids for c in s.iter_chunks()]))
        assert np.array_equal(chunked, live)
        assert s.nbytes > 0


def test_full_disk_when_growing_raises_store_full_and_writes_nothing(tmp_path, monkeypatch):
    """rows.bin grows (posix_fallocate) before anything is written: a full disk fails the call whole."""
    store_dir = tmp_path / "s"
    url = flat_url(store_dir)
    ids = np.arange(flat_store._MIN_ROWS)  # exactly the first allocation
    want = make_batch(ids)
    more = np.arange(5000, 5040)
    with open_store(url, SCHEMA) as s:
        s.put_many(ids, want)
        files = digest(store_dir)

        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(StoreFullError, match="nothing was written"):
            s.put_many(more, make_batch(more))
        with pytest.raises(StoreFullError):  # a replacement needs new rows too: the old ones survive
            s.put_many(ids[:10], make_batch(ids[:10], seed=1))
        assert digest(store_dir) == files, "a call that met the full disk changed the files"
        assert not s.contains(more).any() and len(s) == ids.size
        assert_batch_equal(s.get_many(ids), want)
        s.delete_many(ids[-40:])  # freed rows take a put without growing
        s.put_many(more, make_batch(more))
        monkeypatch.undo()  # space is back: the file grows
        s.put_many(ids[-40:], make_batch(ids[-40:], seed=2))
    with open_store(url) as s:
        assert len(s) == ids.size + more.size
        assert_batch_equal(s.get_many(ids[:-40]), subset(want, ids < ids[-40]))
        assert_batch_equal(s.get_many(more), make_batch(more))
        assert_batch_equal(s.get_many(ids[-40:]), make_batch(ids[-40:], seed=2))


FLAT_JSON_DAMAGE = {
    "garbage": lambda good: b"{{{ not json",
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "not-carousel": lambda good: good.replace(b"carousel-flat/1", b"somebody-else/1"),
    "json-array": lambda good: b"[1, 2]",
    "chunk-0": lambda good: json.dumps({**json.loads(good), "chunk": 0}).encode(),
    "schema-not-a-dict": lambda good: json.dumps({**json.loads(good), "schema": [1, 2]}).encode(),
    "schema-bad-dtype": lambda good: json.dumps({**json.loads(good), "schema": {"x": [[3], "object"]}}).encode(),
}


def _filled(tmp_path: Path):
    store_dir = tmp_path / "s"
    url = flat_url(store_dir)
    ids = np.arange(0, 60, 3)
    want = make_batch(ids, seed=5)
    with open_store(url, SCHEMA) as s:
        s.put_many(ids, want)
    return store_dir, url, ids, want


def _assert_holds(url: str, ids: np.ndarray, want: dict[str, np.ndarray]) -> None:
    with open_store(url) as s:  # a writer: no lock left behind by the refused opens
        assert np.array_equal(s.ids(), ids) and s.quarantined_ids().size == 0
        assert_batch_equal(s.get_many(ids), want)


@pytest.mark.parametrize("damage", list(FLAT_JSON_DAMAGE))
def test_damaged_flat_json_is_corrupt_store_and_releases_the_lock(tmp_path, damage):
    store_dir, url, ids, want = _filled(tmp_path)
    meta = store_dir / "flat.json"
    good = meta.read_bytes()
    meta.write_bytes(FLAT_JSON_DAMAGE[damage](good))
    files = digest(store_dir)
    for _attempt in range(2):  # the second attempt meets the same error, not StoreLockedError
        for args in ((url,), (url, SCHEMA), (url + "&mode=ro",)):
            with pytest.raises(CorruptStoreError, match="flat.json"):
                open_store(*args)
    assert digest(store_dir) == files, "a refused open changed the store's files"
    meta.write_bytes(good)  # repaired: everything is there
    _assert_holds(url, ids, want)


def test_missing_rows_file_is_corrupt_store_and_releases_the_lock(tmp_path):
    store_dir, url, ids, want = _filled(tmp_path)
    (store_dir / "rows.bin").rename(tmp_path / "rows.bin")
    files = digest(store_dir)
    for _attempt in range(2):
        for args in ((url,), (url, SCHEMA), (url + "&mode=ro",)):
            with pytest.raises(CorruptStoreError, match="rows.bin"):
                open_store(*args)
    assert digest(store_dir) == files and not (store_dir / "rows.bin").exists()  # not recreated empty
    (tmp_path / "rows.bin").rename(store_dir / "rows.bin")
    _assert_holds(url, ids, want)


# Same record size as SCHEMA, other dtypes: adopting its rows would return the old bytes
# reinterpreted, every CRC passing (a CRC covers the bytes, not their types).
OTHER_SCHEMA = {"x": ((3, 8, 8), "int8"), "y": ((), "uint64"), "task": ((), "uint16")}


@pytest.mark.parametrize("opener", ["url only", "read-only", "same schema", "other schema"])
def test_missing_flat_json_is_corrupt_store_and_adopts_nothing(tmp_path, opener):
    store_dir, url, ids, want = _filled(tmp_path)
    (store_dir / "flat.json").unlink()
    files = digest(store_dir)
    args = {"url only": (url,), "read-only": (url + "&mode=ro",), "same schema": (url, SCHEMA),
            "other schema": (url, OTHER_SCHEMA)}[opener]
    for _attempt in range(2):
        with pytest.raises(CorruptStoreError):
            open_store(*args).close()
    assert digest(store_dir) == files


def test_a_creation_cut_short_before_flat_json_is_made_afresh(tmp_path):
    # flat.json is written last: a crash before it leaves an empty rows.bin and a manifest that
    # names nothing. That is no store (nothing to report as damaged) and a new one can be made there.
    store_dir = tmp_path / "s"
    with open_store(f"flat://{store_dir}", SCHEMA):
        pass
    (store_dir / "flat.json").unlink()
    assert (store_dir / "rows.bin").stat().st_size == 0
    with pytest.raises(StoreNotFoundError):
        open_store(f"flat://{store_dir}")
    ids = np.arange(5)
    with open_store(f"flat://{store_dir}", SCHEMA) as s:
        s.put_many(ids, make_batch(ids))
    with open_store(f"flat://{store_dir}") as s:
        assert_batch_equal(s.get_many(ids), make_batch(ids))
