"""Zarr store: the conformance suite plus what only Zarr has (chunks, codecs, manifest)."""

import numpy as np
import pytest
import zarr

from storage_backends import ZarrStore, open_store, row_manifest
from tests.conformance.store_tests import SCHEMA, SampleStoreTests, assert_batch_equal, make_batch


class TestZarrStore(SampleStoreTests):
    def make_url(self, path: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"chunk": "16", **params}.items())
        return f"zarr://{path}?{query}"

    def test_is_a_zarr_store(self, store):
        assert isinstance(store, ZarrStore)
        assert store.chunk_rows == 16


class TestZarrStoreZstdThreaded(TestZarrStore):
    """The whole suite again with compression and concurrent chunk readers."""

    def make_url(self, path: str, **params: str) -> str:
        return super().make_url(path, codec="zstd", readers="2", **params)


def test_arrays_are_plain_zarr_v3_readable_by_zarr(tmp_path):
    path = tmp_path / "disk"
    ids = np.arange(40)
    with open_store(f"zarr://{path}?chunk=8", SCHEMA) as s:
        s.put_many(ids, make_batch(ids))
        rows = s._manifest.lookup(ids)[1]
    group = zarr.open_group(str(path), mode="r")
    assert group["x"].metadata.zarr_format == 3
    np.testing.assert_array_equal(group["x"][:][rows], make_batch(ids)["x"])


def test_zstd_stores_fewer_bytes_on_compressible_data(tmp_path):
    ids = np.arange(2000)
    batch = make_batch(ids)
    batch["x"] = np.zeros_like(batch["x"]) + (ids % 3).astype(np.uint8)[:, None, None, None]
    sizes = {}
    for codec in ("none", "zstd"):
        with open_store(f"zarr://{tmp_path / codec}?chunk=64&codec={codec}", SCHEMA) as s:
            s.put_many(ids, batch)
            s.flush()
            sizes[codec] = s.nbytes
            assert_batch_equal(s.get_many(ids[::13]), {k: v[::13] for k, v in batch.items()})
    assert sizes["zstd"] < sizes["none"] / 4


def test_replaced_and_deleted_rows_are_reused(tmp_path):
    with open_store(f"zarr://{tmp_path / 'd'}?chunk=8", SCHEMA) as s:
        ids = np.arange(64)
        s.put_many(ids, make_batch(ids))
        capacity = s._manifest.capacity
        for seed in range(20):  # rewrite everything many times: rows must be recycled
            s.put_many(ids, make_batch(ids, seed=seed))
            s.delete_many(ids[:8])
            s.put_many(ids[:8], make_batch(ids[:8], seed=seed))
        assert s._manifest.capacity == capacity
        assert_batch_equal(s.get_many(ids), make_batch(ids, seed=19))


def test_manifest_survives_compaction_and_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr(row_manifest, "COMPACT_MIN_BYTES", 4096)
    url = f"zarr://{tmp_path / 'd'}?chunk=8&sync=0"
    with open_store(url, SCHEMA) as s:
        for seed in range(400):  # enough journal entries to force several compactions
            s.put_many([seed % 50, 100 + seed], make_batch([seed % 50, 100 + seed], seed=seed))
            if seed % 3 == 0:
                s.delete_many([100 + seed])
        gen = s._manifest.generation
        expect = sorted(s.ids().tolist())
    assert gen > 1
    with open_store(url) as s:
        assert s.ids().tolist() == expect
        assert_batch_equal(s.get_many([49]), make_batch([49], seed=399))


@pytest.mark.parametrize("chunk", ["0", "x", "-4"])
def test_bad_chunk_parameter(tmp_path, chunk):
    from storage_backends import InvalidURLError

    with pytest.raises(InvalidURLError):
        open_store(f"zarr://{tmp_path / 'd'}?chunk={chunk}", SCHEMA)
