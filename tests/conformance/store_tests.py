"""The conformance suite every :class:`storage_backends.SampleStore` must pass.

A backend's test module subclasses :class:`SampleStoreTests` and implements :meth:`make_url`
(zarr-python's ``StoreTests`` pattern): the whole contract is then checked for it, for free.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from storage_backends import (
    CorruptRecordError,
    MissingIdsError,
    SampleStore,
    Schema,
    SchemaError,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StorePermissionError,
    open_store,
)

SCHEMA = {"x": ((3, 8, 8), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
WIDE = {"img": ((2, 3), "float16"), "mask": ((4,), "bool"), "logits": ((5,), "float32"),
        "w": ((), "float64"), "big": ((), "uint64"), "empty": ((0,), "int32")}


def make_batch(ids, seed: int = 0, schema=SCHEMA) -> dict[str, np.ndarray]:
    """Deterministic random fields for ``ids`` (content depends on the id and the seed)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = {}
    for name, (shape, dtype) in schema.items():
        dt = np.dtype(dtype)
        rows = []
        for i in ids:
            rng = np.random.default_rng([int(i), seed, len(name)])
            if dt.kind == "b":
                rows.append(rng.integers(0, 2, shape).astype(dt))
            elif dt.kind == "f":
                rows.append(rng.standard_normal(shape).astype(dt))
            else:
                info = np.iinfo(dt)
                rows.append(rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt))
        out[name] = np.stack(rows) if rows else np.zeros((0, *shape), dt)
    return out


def assert_batch_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


class SampleStoreTests:
    """Subclass and implement :meth:`make_url`; every test below then runs for that backend."""

    def make_url(self, path: str, **params: str) -> str:
        raise NotImplementedError("a backend's test class returns the URL of a store at path")

    # ---- fixtures -------------------------------------------------------------------------------
    @pytest.fixture
    def path(self, tmp_path) -> str:
        return str(tmp_path / "store")

    @pytest.fixture
    def store(self, path):
        with open_store(self.make_url(path), SCHEMA) as s:
            yield s

    # ---- create, reopen, schema -----------------------------------------------------------------
    def test_create_and_reopen_with_url_only(self, path):
        url = self.make_url(path)
        with open_store(url, SCHEMA) as s:
            assert isinstance(s, SampleStore)
            s.put_many([1, 2], make_batch([1, 2]))
        with open_store(url) as s:
            assert s.schema == Schema(SCHEMA)
            assert len(s) == 2
            assert_batch_equal(s.get_many([2, 1]), make_batch([2, 1]))

    def test_missing_store_without_schema(self, path):
        with pytest.raises(StoreNotFoundError) as err:
            open_store(self.make_url(path))
        assert isinstance(err.value, FileNotFoundError)
        assert path in str(err.value)

    def test_reopen_with_other_schema_is_refused(self, path):
        url = self.make_url(path)
        with open_store(url, SCHEMA):
            pass
        with pytest.raises(SchemaError):
            open_store(url, {"x": ((3, 8, 8), "uint8")})
        with open_store(url, SCHEMA) as s:  # the same schema is fine
            assert len(s) == 0

    def test_every_allowed_dtype_and_shape_round_trips(self, path):
        with open_store(self.make_url(path), WIDE) as s:
            ids = np.array([5, 1, 9])
            s.put_many(ids, make_batch(ids, schema=WIDE))
            assert_batch_equal(s.get_many([9, 5]), make_batch([9, 5], schema=WIDE))

    # ---- put / get / delete -----------------------------------------------------------------------
    def test_get_many_returns_fields_in_the_order_of_ids(self, store):
        ids = np.arange(100, 164)
        store.put_many(ids, make_batch(ids))
        order = np.random.default_rng(1).permutation(ids)
        assert_batch_equal(store.get_many(order), make_batch(order))

    def test_repeated_ids_in_get_many(self, store):
        store.put_many([3, 4], make_batch([3, 4]))
        assert_batch_equal(store.get_many([4, 3, 4, 4]), make_batch([4, 3, 4, 4]))

    def test_put_replaces_an_existing_record(self, store):
        store.put_many([1, 2, 3], make_batch([1, 2, 3], seed=0))
        store.put_many([2], make_batch([2], seed=7))
        assert len(store) == 3
        assert_batch_equal(store.get_many([1, 2, 3]),
                           {k: np.concatenate([a, b, c]) for (k, a), b, c in zip(
                               make_batch([1], 0).items(), make_batch([2], 7).values(), make_batch([3], 0).values())})

    def test_unknown_ids_raise_keyerror_naming_them(self, store):
        store.put_many([1], make_batch([1]))
        with pytest.raises(MissingIdsError) as err:
            store.get_many([1, 42, 43])
        assert isinstance(err.value, KeyError)
        assert sorted(err.value.ids.tolist()) == [42, 43]
        assert "42" in str(err.value)

    def test_delete_many(self, store):
        ids = np.arange(10)
        store.put_many(ids, make_batch(ids))
        store.delete_many([3, 7])
        assert len(store) == 8
        assert store.contains([3, 4, 7]).tolist() == [False, True, False]
        with pytest.raises(MissingIdsError):
            store.get_many([3])

    def test_delete_of_unknown_id_deletes_nothing(self, store):
        store.put_many([1, 2], make_batch([1, 2]))
        with pytest.raises(MissingIdsError):
            store.delete_many([1, 99])
        assert store.ids().tolist() == [1, 2]

    def test_contains_ids_len(self, store):
        assert len(store) == 0 and store.ids().dtype == np.int64 and store.ids().size == 0
        ids = np.array([50, 3, 2**40, 17])
        store.put_many(ids, make_batch(ids))
        assert store.ids().tolist() == sorted(ids.tolist())
        assert store.contains([3, 4, 2**40]).tolist() == [True, False, True]
        assert len(store) == 4

    def test_empty_calls_are_no_ops(self, store):
        store.put_many(np.zeros(0, np.int64), make_batch([]))
        got = store.get_many([])
        assert got["x"].shape == (0, 3, 8, 8) and got["y"].dtype == np.int64
        store.delete_many([])
        assert store.contains([]).shape == (0,)
        assert len(store) == 0

    def test_ids_accept_other_integer_dtypes_and_lists(self, store):
        store.put_many(np.array([1, 2], dtype=np.uint8), make_batch([1, 2]))
        assert_batch_equal(store.get_many([2]), make_batch([2]))
        assert store.contains(np.array([1], np.int32)).tolist() == [True]

    def test_narrower_integer_values_that_fit_are_cast(self, store):
        batch = make_batch([1])
        batch["task"] = np.array([7], dtype=np.int64)  # fits int16
        store.put_many([1], batch)
        assert store.get_many([1])["task"].dtype == np.int16

    # ---- bad input: typed error, nothing changed ---------------------------------------------------
    @pytest.mark.parametrize("mutate, exc", [
        (lambda ids, b: (ids, {**b, "x": b["x"][:, :2]}), SchemaError),
        (lambda ids, b: (ids, {**b, "x": b["x"].astype(np.float64)}), SchemaError),
        (lambda ids, b: (ids, {**b, "task": np.full(len(ids), 70000)}), SchemaError),
        (lambda ids, b: (ids, {k: v for k, v in b.items() if k != "y"}), SchemaError),
        (lambda ids, b: (ids, {**b, "extra": b["y"]}), SchemaError),
        (lambda ids, b: (np.array([5, 5, 6]), b), SchemaError),
        (lambda ids, b: (np.array([5, -1, 6]), b), SchemaError),
        (lambda ids, b: (ids.reshape(1, 3), b), SchemaError),
        (lambda ids, b: (ids.astype(np.float64), b), SchemaError),
        (lambda ids, b: (ids[:2], b), SchemaError),
        (lambda ids, b: (ids, "not a mapping"), SchemaError),
    ])
    def test_bad_batches_are_rejected_without_a_trace(self, store, mutate, exc):
        store.put_many([1], make_batch([1]))
        ids = np.array([5, 6, 7])
        bad_ids, bad_fields = mutate(ids, make_batch(ids))
        with pytest.raises(exc) as err:
            store.put_many(bad_ids, bad_fields)
        assert isinstance(err.value, ValueError) and isinstance(err.value, StoreError)
        assert store.ids().tolist() == [1]
        store.put_many(ids, make_batch(ids))  # still usable
        assert len(store) == 4

    @pytest.mark.parametrize("bad", [[-3], [[1, 2]], [1.5]])
    def test_bad_ids_in_reads(self, store, bad):
        with pytest.raises(SchemaError):
            store.get_many(bad)
        with pytest.raises(SchemaError):
            store.contains(bad)

    # ---- size, durability, lifecycle ---------------------------------------------------------------
    def test_nbytes_reports_disk_usage(self, store):
        before = store.nbytes
        ids = np.arange(2000)
        store.put_many(ids, make_batch(ids))
        store.flush()
        assert store.nbytes >= before
        assert store.nbytes >= 2000 * Schema(SCHEMA).record_nbytes * 0.5  # random bytes barely compress

    def test_close_is_idempotent_and_closed_store_refuses(self, path):
        s = open_store(self.make_url(path), SCHEMA)
        s.put_many([1], make_batch([1]))
        s.flush()
        s.close()
        s.close()
        for call in (lambda: s.get_many([1]), lambda: s.put_many([2], make_batch([2])), lambda: len(s),
                     lambda: s.ids(), lambda: s.flush()):
            with pytest.raises(StoreClosedError):
                call()

    def test_second_writer_is_refused_until_the_first_closes(self, path):
        url = self.make_url(path)
        first = open_store(url, SCHEMA)
        with pytest.raises(StoreLockedError):
            open_store(url)
        first.put_many([1], make_batch([1]))
        first.close()
        with open_store(url) as again:
            assert again.ids().tolist() == [1]

    def test_read_only_mode(self, path):
        url = self.make_url(path)
        with open_store(url, SCHEMA) as s:
            s.put_many([1, 2], make_batch([1, 2]))
        with open_store(url + ("&" if "?" in url else "?") + "mode=ro") as ro:
            assert_batch_equal(ro.get_many([2]), make_batch([2]))
            with pytest.raises(StorePermissionError):
                ro.put_many([3], make_batch([3]))
            with pytest.raises(StorePermissionError):
                ro.delete_many([1])

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_use_after_fork_is_refused(self, store):
        store.put_many([1], make_batch([1]))
        pid = os.fork()
        if pid == 0:  # child: the inherited handle must refuse, not corrupt
            try:
                store.get_many([1])
            except StoreClosedError:
                os._exit(0)
            except BaseException:
                os._exit(2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert_batch_equal(store.get_many([1]), make_batch([1]))

    def test_concurrent_readers_and_a_writer(self, store):
        ids = np.arange(512)
        store.put_many(ids, make_batch(ids))
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    pick = rng.choice(ids, 32, replace=False)
                    assert_batch_equal(store.get_many(pick), make_batch(pick))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for start in range(1000, 1000 + 64 * 20, 64):  # the writer adds while they read
            new = np.arange(start, start + 64)
            store.put_many(new, make_batch(new))
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:1]
        assert len(store) == 512 + 64 * 20

    # ---- chunk-granular reads -------------------------------------------------------------------------
    def test_iter_chunks_yields_every_record_once(self, store):
        ids = np.random.default_rng(3).choice(10_000, 700, replace=False)
        store.put_many(ids, make_batch(ids))
        store.delete_many(ids[:50])
        seen = []
        for chunk in store.iter_chunks():
            assert 0 < chunk.ids.size <= store.chunk_rows
            assert_batch_equal(chunk.fields, make_batch(chunk.ids))
            seen.append(chunk.ids)
        seen = np.concatenate(seen)
        assert sorted(seen.tolist()) == sorted(ids[50:].tolist())

    def test_get_chunk_covers_the_store_and_checks_its_range(self, store):
        ids = np.arange(300)
        store.put_many(ids, make_batch(ids))
        got = [store.get_chunk(i) for i in range(store.num_chunks())]
        all_ids = np.concatenate([c.ids for c in got])
        assert sorted(all_ids.tolist()) == ids.tolist()
        for c in got:
            if c.ids.size:
                assert_batch_equal(c.fields, make_batch(c.ids))
        with pytest.raises(IndexError):
            store.get_chunk(store.num_chunks())
        with pytest.raises(IndexError):
            store.get_chunk(-1)

    def test_chunk_of_names_the_chunk_get_chunk_returns(self, store):
        ids = np.random.default_rng(5).choice(5000, 200, replace=False)
        store.put_many(ids, make_batch(ids))
        pick = ids[::17]
        for i, c in zip(pick, store.chunk_of(pick)):
            assert int(i) in store.get_chunk(int(c)).ids.tolist()
        with pytest.raises(MissingIdsError):
            store.chunk_of([int(ids.max()) + 1])

    def test_nothing_quarantined_in_a_healthy_store(self, store):
        store.put_many([1], make_batch([1]))
        assert store.quarantined_ids().size == 0
        with pytest.raises(CorruptRecordError.__mro__[1]):  # StoreError base: unknown id
            store.get_many([2])
