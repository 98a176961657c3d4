"""Files store: the conformance suite plus what only a folder of files has (shards, reads in
flight, its loops, its garbage)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage_backends import (
    CorruptRecordError,
    FilesStore,
    InvalidURLError,
    MissingIdsError,
    Schema,
    StoreError,
    open_store,
)
from tests.conformance.store_tests import SCHEMA, SampleStoreTests, assert_batch_equal, make_batch


class TestFilesStore(SampleStoreTests):
    def make_url(self, path: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"chunk": "16", "sync": "0", **params}.items())
        return f"files://{path}?{query}"

    def test_is_a_files_store(self, store):
        assert isinstance(store, FilesStore)
        assert store.chunk_rows == 16 and not store.prefers_chunks and store.inflight == 32


class TestFilesStoreSyncZstd(TestFilesStore):
    """The suite again with every write fsynced and compressed files (one read at a time is
    checked below: with it, 1,280 fsyncs in a row cost seconds here)."""

    def make_url(self, path: str, **params: str) -> str:
        return super().make_url(path, **{"sync": "1", "codec": "zstd", "inflight": "4", **params})

    def test_is_a_files_store(self, store):
        assert store.codec == "zstd" and store.inflight == 4


# ---- what only a folder of files has ----------------------------------------------------------------
def files_url(path: Path, query: str = "chunk=16&sync=0") -> str:
    return f"files://{path}?{query}"


def rec_files(store_dir: Path) -> list[Path]:
    return sorted((store_dir / "data").rglob("*.rec"))


def test_one_file_per_record_in_sharded_leaf_directories(tmp_path):
    store_dir = tmp_path / "s"
    ids = np.arange(1000, 1100)
    with open_store(files_url(store_dir), SCHEMA) as store:
        store.put_many(ids, make_batch(ids))
        files = rec_files(store_dir)
        assert len(files) == ids.size
        leaves = {p.parent for p in files}
        assert len(leaves) == -(-ids.size // 16)  # a chunk of 16 rows per leaf directory
        assert all(len(list(leaf.iterdir())) <= 16 for leaf in leaves)
        # a chunk is a leaf directory: its records are the files in it
        for c in range(store.num_chunks()):
            chunk = store.get_chunk(c)
            if chunk.ids.size:
                names = {p.name for p in files if p.parent == Path(store._leaf(c * 16))}
                assert {n.split("-")[1][:-4] for n in names} == {str(i) for i in chunk.ids.tolist()}
        # replacing writes new files and removes the old ones; deleting removes them
        store.put_many(ids[:10], make_batch(ids[:10], seed=3))
        store.delete_many(ids[10:20])
        assert len(rec_files(store_dir)) == ids.size - 10
        assert_batch_equal(store.get_many(ids[:10]), make_batch(ids[:10], seed=3))


@pytest.mark.parametrize("inflight", [1, 8])
def test_reads_in_flight_overlap_up_to_inflight_and_no_further(tmp_path, inflight):
    ids = np.arange(200)
    with open_store(files_url(tmp_path / "s", f"inflight={inflight}&sync=0"), SCHEMA) as store:
        store.put_many(ids, make_batch(ids))
        assert store.inflight_high_water == 0
        assert_batch_equal(store.get_many(ids[::-1]), make_batch(ids[::-1]))
        assert store.inflight_high_water == inflight  # never more; with 8, 8 at once
        assert_batch_equal(asyncio.run(store.aget_many(ids[:50])), make_batch(ids[:50]))
        assert store.inflight_high_water == inflight


def test_reads_run_on_a_bound_loop_and_survive_it_stopping(tmp_path):
    """Bound to a running loop (the swap engine's), reads from other threads run on it; after it
    stops (or is unbound) they run on the store's own loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ids = np.arange(64)
    try:
        with open_store(files_url(tmp_path / "s", "inflight=4&sync=0"), SCHEMA) as store:
            store.put_many(ids, make_batch(ids))
            store.bind_loop(loop)
            seen = []
            real = store._read_paths

            async def spy(paths):
                seen.append(asyncio.get_running_loop())
                return await real(paths)

            store._read_paths = spy
            assert_batch_equal(store.get_many(ids), make_batch(ids))
            assert seen == [loop] and store._runner.own is None
            # The loop stops with this read queued behind a busy callback: it never runs there,
            # and the read is redone on the store's own loop instead of waiting for ever.
            loop.call_soon_threadsafe(time.sleep, 0.3)
            loop.call_soon_threadsafe(loop.stop)
            assert_batch_equal(store.get_many(ids[:5]), make_batch(ids[:5]))
            thread.join(5)
            assert seen[-1] is store._runner.own is not None and loop not in seen[1:]
            assert_batch_equal(store.get_many(ids[:5]), make_batch(ids[:5]))  # no hang: its own loop
    finally:
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        loop.close()


def test_damaged_missing_and_foreign_files_are_corrupt_records_and_quarantined(tmp_path):
    store_dir = tmp_path / "s"
    url = files_url(store_dir)
    ids = np.arange(40)
    with open_store(url, SCHEMA) as store:
        store.put_many(ids, make_batch(ids))
        path = {i: store._file(int(r), i) for i, r in zip(ids.tolist(), store._manifest.lookup(ids)[1].tolist())}
    with open(path[5], "r+b") as fh:  # a flipped byte
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    os.unlink(path[6])  # a missing file
    Path(path[7]).write_bytes(Path(path[8]).read_bytes())  # an intact record of another id
    os.truncate(path[9], 10)  # a short file
    bad = [5, 6, 7, 9]
    with open_store(url + "&mode=ro") as ro:
        with pytest.raises(CorruptRecordError) as info:
            ro.get_many(ids)
        assert sorted(info.value.ids.tolist()) == bad and ro.quarantined_ids().size == 0
    with open_store(url) as store:
        with pytest.raises(CorruptRecordError, match="quarantined") as info:
            store.get_many(ids)
        assert sorted(info.value.ids.tolist()) == bad
        assert store.quarantined_ids().tolist() == bad and len(store) == 36
        keep = np.setdiff1d(ids, bad)
        assert_batch_equal(store.get_many(keep), make_batch(keep))
        with pytest.raises(MissingIdsError):
            store.get_many([5])
        store.put_many([5], make_batch([5], seed=9))  # the id can be written afresh
        assert_batch_equal(store.get_many([5]), make_batch([5], seed=9))
    assert len(list((store_dir / "quarantine").iterdir())) == 3  # the missing file had nothing to keep
    with open_store(url) as store:
        assert store.quarantined_ids().tolist() == bad


def test_read_error_other_than_missing_is_a_store_error_and_quarantines_nothing(tmp_path):
    store_dir = tmp_path / "s"
    with open_store(files_url(store_dir), SCHEMA) as store:
        store.put_many([1, 2], make_batch([1, 2]))
        target = store._file(int(store._manifest.lookup(np.array([2]))[1][0]), 2)
        os.unlink(target)
        os.mkdir(target)  # reading a directory: EISDIR, an I/O error that says nothing about the record
        with pytest.raises(StoreError) as info:
            store.get_many([1, 2])
        assert not isinstance(info.value, CorruptRecordError)
        assert store.quarantined_ids().size == 0 and len(store) == 2
        os.rmdir(target)


def test_crash_garbage_is_swept_on_the_next_open(tmp_path):
    store_dir = tmp_path / "s"
    url = files_url(store_dir)
    with open_store(url, SCHEMA) as store:
        store.put_many(np.arange(20), make_batch(np.arange(20)))
        leaf = Path(store._leaf(0))
    # What a killed writer leaves: a temp file, a renamed file no journal entry names.
    (leaf / "3-999.tmp").write_bytes(b"half")
    (leaf / "900-5.rec").write_bytes(b"orphan")
    (leaf / "README").write_text("not ours")
    with open_store(url) as store:  # a clean close before: no sweep needed
        assert (leaf / "3-999.tmp").exists()
    (store_dir / "session.dirty").touch()  # as a killed session leaves it
    with open_store(url) as store:
        assert not (leaf / "3-999.tmp").exists() and not (leaf / "900-5.rec").exists()
        assert (leaf / "README").exists()
        assert_batch_equal(store.get_many(np.arange(20)), make_batch(np.arange(20)))
    assert not (store_dir / "session.dirty").exists()


@pytest.mark.parametrize("query", ["inflight=0", "inflight=1025", "inflight=many", "layout=tiles", "codec=lz4",
                                   "chunk=0", "map_size=1GiB"])
def test_bad_url_is_refused_and_creates_nothing(tmp_path, query):
    with pytest.raises(InvalidURLError):
        open_store(files_url(tmp_path / "s", query), SCHEMA)
    assert not (tmp_path / "s").exists()


def test_imagefolder_layout_dispatches_to_its_module(tmp_path):
    try:
        from storage_backends.image_folder import ImageFolderStore
        from storage_backends.png import encode_png
    except ModuleNotFoundError:  # another module's; only the dispatch is tested here
        with pytest.raises(InvalidURLError, match="image_folder"):
            open_store(f"files://{tmp_path}/imgs?layout=imagefolder&mode=ro")
        return
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "0.png").write_bytes(encode_png(np.zeros((4, 4), np.uint8)))
    with open_store(f"files://{tmp_path}/imgs?layout=imagefolder&mode=ro&sync=1&inflight=4") as store:
        assert isinstance(store, ImageFolderStore) and len(store) == 1
    assert sorted(p.name for p in (tmp_path / "imgs").rglob("*")) == ["0.png", "cat"]  # nothing written


def test_codec_is_fixed_when_the_store_is_made(tmp_path):
    url = files_url(tmp_path / "s", "codec=zstd&sync=0")
    with open_store(url, SCHEMA) as store:
        store.put_many([1], {**make_batch([1]), "x": np.zeros((1, 3, 8, 8), np.uint8)})
        assert os.path.getsize(store._file(0, 1)) < 100  # compressed
    with pytest.raises(InvalidURLError, match="codec=zstd"):
        open_store(files_url(tmp_path / "s", "codec=none"))
    with open_store(files_url(tmp_path / "s")) as store:
        assert store.codec == "zstd" and store.get_many([1])["x"].sum() == 0


def test_nbytes_is_kept_up_to_date_without_walking_the_files(tmp_path):
    """nbytes measures the record files once, then follows the writes: it matches a full walk."""
    from storage_backends.base import _disk_usage

    with open_store(files_url(tmp_path / "s"), SCHEMA) as store:
        store.put_many(np.arange(100), make_batch(np.arange(100)))
        assert store.nbytes == _disk_usage(store.path)  # measured here
        store.put_many(np.arange(50, 150), make_batch(np.arange(50, 150), seed=2))  # replaces 50, adds 50
        store.delete_many(np.arange(10))
        store.flush()
        assert store.nbytes == _disk_usage(store.path) > 140 * Schema(SCHEMA).record_nbytes
