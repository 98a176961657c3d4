"""Data set readers on files the tests write in the original formats, and on the real sets."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from trainers.datasets import DatasetError, load_any, load_cifar, load_idx_set, read_idx

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    raw = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open(path.with_name(path.name + ".gz"), "wb") if gz else open(path, "wb")).write(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_in_torchvision_layout(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", images, gz)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte", labels, gz)
    split = load_idx_set("fashion-mnist", tmp_path)
    assert split.images.shape == (50, 1, 28, 28) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images[:, 0], images)
    assert split.labels.dtype == np.int64 and split.labels.tolist() == labels.tolist()


def test_idx_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "t", np.zeros((4, 2, 2), np.uint8), gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "t")


def test_missing_set_names_where_to_put_it(tmp_path):
    with pytest.raises(DatasetError, match="FashionMNIST"):
        load_idx_set("fashion-mnist", tmp_path / "nothing")
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_cifar(tmp_path, 10)


def write_cifar10(root: Path, n: int = 20) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, n, 3072), dtype=np.uint8)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        with open(folder / name, "wb") as fh:  # the original format: a protocol-2 pickle of a dict
            pickle.dump({"batch_label": name, "labels": list(range(i, i + n)), "data": data[i],
                         "filenames": [f"{k}.png" for k in range(n)]}, fh, protocol=2)
    return data


def test_cifar10_batches_in_the_original_format(tmp_path):
    data = write_cifar10(tmp_path)
    train = load_cifar(tmp_path, 10, train=True)
    assert train.images.shape == (100, 3, 32, 32)
    np.testing.assert_array_equal(train.images[:20].reshape(20, -1), data[0])
    assert train.labels[:3].tolist() == [0, 1, 2]
    test = load_cifar(tmp_path, 10, train=False)
    np.testing.assert_array_equal(test.images.reshape(20, -1), data[5])
    assert load_any(tmp_path)[0] == "cifar10"


def test_a_cifar_file_cannot_run_code(tmp_path):
    data = write_cifar10(tmp_path)
    evil = pickle.dumps({"data": data[0], "labels": [0] * 20, "x": __import__("os").getcwd})
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(DatasetError, match="refusing"):
        load_cifar(tmp_path, 10)


@pytest.mark.skipif(not (SHARED / "FashionMNIST").is_dir(), reason=f"real Fashion-MNIST not at {SHARED}")
def test_real_fashion_mnist():
    split = load_idx_set("fashion-mnist", SHARED)
    assert split.images.shape == (60000, 1, 28, 28)
    assert np.bincount(split.labels).tolist() == [6000] * 10
    assert load_idx_set("fashion-mnist", SHARED, train=False).images.shape == (10000, 1, 28, 28)


@pytest.mark.skipif(not (SHARED / "MNIST").is_dir(), reason=f"real MNIST not at {SHARED}")
def test_real_mnist():
    split = load_idx_set("mnist", SHARED, train=False)
    assert split.images.shape == (10000, 1, 28, 28) and split.labels.max() == 9
