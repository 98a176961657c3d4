"""LMDB store: the conformance suite plus what only LMDB has (map growth, sync modes)."""

import numpy as np
import pytest

from storage_backends import LMDBStore, StoreFullError, open_store
from tests.conformance.store_tests import SCHEMA, SampleStoreTests, assert_batch_equal, make_batch


class TestLMDBStore(SampleStoreTests):
    def make_url(self, path: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"map_size": "1MiB", **params}.items())
        return f"lmdb://{path}?{query}"

    def test_is_an_lmdb_store(self, store):
        assert isinstance(store, LMDBStore)

    def test_map_grows_instead_of_failing(self, path):
        with open_store(self.make_url(path, map_size="64KiB"), SCHEMA) as s:
            ids = np.arange(3000)  # ~1.2 MB of records into a 64 KiB map
            for part in np.array_split(ids, 10):
                s.put_many(part, make_batch(part))
            assert len(s) == 3000
            assert_batch_equal(s.get_many(ids[::97]), make_batch(ids[::97]))

    def test_max_size_caps_growth_with_a_typed_error(self, path):
        with open_store(self.make_url(path, map_size="64KiB", max_size="256KiB"), SCHEMA) as s:
            s.put_many([1], make_batch([1]))
            big = np.arange(100, 1100)
            with pytest.raises(StoreFullError) as err:
                s.put_many(big, make_batch(big))
            assert isinstance(err.value, OSError)
            assert s.ids().tolist() == [1]  # the failed batch left nothing
            assert_batch_equal(s.get_many([1]), make_batch([1]))

    @pytest.mark.parametrize("sync", ["0", "1"])
    def test_sync_modes_round_trip(self, path, sync):
        url = self.make_url(path, sync=sync, flush_s="0.05")
        with open_store(url, SCHEMA) as s:
            s.put_many([4, 5], make_batch([4, 5]))
        with open_store(url) as s:
            assert_batch_equal(s.get_many([4, 5]), make_batch([4, 5]))


class TestLMDBStoreZstd(TestLMDBStore):
    """The whole contract again with every value zstd-compressed (``codec=zstd``)."""

    def make_url(self, path: str, **params: str) -> str:
        return super().make_url(path, **{"codec": "zstd", **params})

    def test_padding_takes_no_room_and_the_codec_is_kept(self, path, tmp_path):
        schema = {"code": ((4096,), "uint8"), "y": ((), "int64")}
        ids = np.arange(2000)
        code = np.zeros((ids.size, 4096), np.uint8)
        code[:, :64] = np.random.default_rng(0).integers(0, 256, (ids.size, 64))  # 64 real bytes, then padding
        sizes = {}
        for codec in ("none", "zstd"):
            url = f"lmdb://{tmp_path / codec}?codec={codec}"
            with open_store(url, schema) as s:
                s.put_many(ids, {"code": code, "y": ids})
                s.flush()
                sizes[codec] = s.nbytes
        assert sizes["zstd"] * 10 < sizes["none"], sizes
        with open_store(f"lmdb://{tmp_path / 'zstd'}") as s:  # reopened without naming the codec
            assert s.codec == "zstd"
            np.testing.assert_array_equal(s.get_many(ids[::37])["code"], code[::37])
        with pytest.raises(ValueError, match="created with codec=zstd"):
            open_store(f"lmdb://{tmp_path / 'zstd'}?codec=none")

    def test_a_damaged_frame_is_a_corrupt_record(self, path):
        import lmdb
        with open_store(self.make_url(path), SCHEMA) as s:
            s.put_many([1, 2, 3], make_batch([1, 2, 3]))
        env = lmdb.open(path, max_dbs=4, subdir=True)
        db = env.open_db(b"data")
        with env.begin(write=True, db=db) as txn:
            key = (2).to_bytes(8, "big")
            value = bytearray(txn.get(key))
            value[len(value) // 2] ^= 0xFF
            txn.put(key, bytes(value))
        env.close()
        from storage_backends import CorruptRecordError
        with open_store(self.make_url(path)) as s:
            with pytest.raises(CorruptRecordError) as err:
                s.get_many([1, 2, 3])
            assert err.value.ids.tolist() == [2]
            assert_batch_equal(s.get_many([1, 3]), make_batch([1, 3]))
            assert s.quarantined_ids().tolist() == [2]
