"""Real images through every store, byte for byte: CIFAR-10 when present, Fashion-MNIST too."""

from pathlib import Path

import numpy as np
import pytest

from storage_backends import open_store
from trainers.datasets import load_cifar, load_idx_set

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
URLS = ["lmdb://{d}/flash", "zarr://{d}/disk?chunk=32", "zarr://{d}/diskz?chunk=32&codec=zstd",
        "flat://{d}/flatdisk?chunk=32"]


def _round_trip(tmp_path, images, labels, url):
    n = 4096
    ids = np.arange(n) * 3 + 1
    fields = {"x": images[:n], "y": labels[:n], "task": (labels[:n] // 2).astype(np.int16)}
    schema = {"x": (images.shape[1:], "uint8"), "y": ((), "int64"), "task": ((), "int16")}
    url = url.format(d=tmp_path)
    with open_store(url, schema) as s:
        for lo in range(0, n, 256):
            s.put_many(ids[lo:lo + 256], {k: v[lo:lo + 256] for k, v in fields.items()})
    with open_store(url) as s:
        pick = np.random.default_rng(0).permutation(n)[:512]
        got = s.get_many(ids[pick])
        for k in fields:
            np.testing.assert_array_equal(got[k], fields[k][pick])


@pytest.mark.parametrize("url", URLS)
@pytest.mark.skipif(not (SHARED / "cifar-10-batches-py").is_dir(),
                    reason=f"CIFAR-10 is not in {SHARED} (see its README); the format is tested on written files")
def test_real_cifar10(tmp_path, url):
    split = load_cifar(SHARED, 10)
    _round_trip(tmp_path, split.images, split.labels, url)


@pytest.mark.parametrize("url", URLS)
@pytest.mark.skipif(not (SHARED / "FashionMNIST").is_dir(), reason=f"Fashion-MNIST is not in {SHARED}")
def test_real_fashion_mnist(tmp_path, url):
    split = load_idx_set("fashion-mnist", SHARED)
    _round_trip(tmp_path, split.images, split.labels, url)
