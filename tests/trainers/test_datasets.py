"""Data set readers on files the tests write in the original formats, and on the real sets.

Downloads are served by a real ``http.server`` on 127.0.0.1 from files the tests generate; nothing here
touches the network outside this machine.
"""

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from trainers import datasets
from trainers.datasets import (CHECKSUMS, ChecksumError, DatasetError, MissingDatasetError, load_any, load_cifar,
                               load_idx_set, read_idx)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
DEAD = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused at once


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> bytes:
    """Write ``arr`` as an IDX file at ``path`` (``path.gz`` when ``gz``); returns the uncompressed bytes."""
    raw = idx_bytes(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return raw


def write_idx_set(folder: Path, images: np.ndarray, labels: np.ndarray, train: bool = True, gz: bool = True) -> dict:
    """One split of an IDX set in ``folder``; returns {stem: md5 of the uncompressed bytes}."""
    prefix = "train" if train else "t10k"
    return {f"{prefix}-images-idx3-ubyte": md5(write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)),
            f"{prefix}-labels-idx1-ubyte": md5(write_idx(folder / f"{prefix}-labels-idx1-ubyte",
                                                          labels.astype(np.uint8), gz))}


def cifar_batch_bytes(data: np.ndarray, labels, key: str = "labels", name: str = "batch") -> bytes:
    """A batch in the original format: a protocol-2 pickle of a dict of numpy arrays and lists."""
    buf = io.BytesIO()
    pickle.dump({"batch_label": name, key: list(labels), "data": data,
                 "filenames": [f"{k}.png" for k in range(len(data))]}, buf, protocol=2)
    return buf.getvalue()


def write_cifar10(root: Path, n: int = 20) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, n, 3072), dtype=np.uint8)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(cifar_batch_bytes(data[i], range(i, i + n), name=name))
    return data


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    """A mirror set in the environment must not change what these tests fetch."""
    monkeypatch.delenv(datasets.MIRROR_ENV, raising=False)


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving the folder it yields (as ``(folder, base_url)``)."""
    folder = tmp_path / "www"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".part"))


# ------------------------------------------------------------------------------------------ IDX format

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_in_torchvision_layout(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    write_idx_set(tmp_path / "FashionMNIST" / "raw", images, labels, gz=gz)
    split = load_idx_set("fashion-mnist", tmp_path, verify=False)
    assert split.images.shape == (50, 1, 28, 28) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images[:, 0], images)
    assert split.labels.dtype == np.int64 and split.labels.tolist() == labels.tolist()
    assert split.source == str(tmp_path / "FashionMNIST" / "raw")


def test_idx_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "t", np.zeros((4, 2, 2), np.uint8), gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-3])
    with pytest.raises(DatasetError, match="truncated IDX file"):
        read_idx(tmp_path / "t")
    (tmp_path / "h").write_bytes(b"\x00\x00\x08\x03\x00\x00")  # three dims declared, half of one given
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(tmp_path / "h")


def test_truncated_or_corrupt_gzip_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((100, 28, 28), np.uint8), gz=True)
    gz = tmp_path / "x.gz"
    whole = gz.read_bytes()
    gz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match=r"x\.gz: corrupt or truncated gzip.*download"):
        read_idx(gz)
    gz.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(DatasetError, match="corrupt or truncated gzip"):
        read_idx(gz)


def test_missing_set_names_where_to_put_it(tmp_path):
    with pytest.raises(MissingDatasetError) as err:
        load_idx_set("fashion-mnist", tmp_path / "nothing")
    msg = str(err.value)
    assert str(tmp_path / "nothing" / "FashionMNIST" / "raw") in msg
    assert "train-images-idx3-ubyte[.gz]" in msg and "train-labels-idx1-ubyte[.gz]" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "/usr/share/datasets/fashion-mnist" in msg
    assert "download=True" in msg
    with pytest.raises(MissingDatasetError, match=r"t10k-labels.*MNIST/raw") as err:
        load_idx_set("mnist", tmp_path, train=False)
    assert "apt-get" not in str(err.value)
    with pytest.raises(MissingDatasetError, match="cifar-10-python.tar.gz") as err:
        load_cifar(tmp_path, 10)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    with pytest.raises(MissingDatasetError, match=r"\['train'\].*cifar-100-python.tar.gz"):
        load_cifar(tmp_path, 100)
    with pytest.raises(ValueError, match="known"):
        load_idx_set("kmnist", tmp_path)


# ------------------------------------------------------------------------------------------- checksums

def test_idx_checksums_of_the_uncompressed_bytes(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30)
    folder = tmp_path / "MNIST" / "raw"
    sums = write_idx_set(folder, images, labels)
    # Generated files at the official names fail the official checksums, naming file, both md5s and the fix.
    with pytest.raises(ChecksumError) as err:
        load_idx_set("mnist", tmp_path)
    msg = str(err.value)
    assert str(folder / "train-images-idx3-ubyte.gz") in msg
    assert CHECKSUMS["mnist"]["train-images-idx3-ubyte"] in msg and sums["train-images-idx3-ubyte"] in msg
    assert "verify=False" in msg and "download" in msg
    # The same md5 holds whatever the compression: the uncompressed bytes are what is checked.
    monkeypatch.setitem(CHECKSUMS, "mnist", sums)
    assert load_idx_set("mnist", tmp_path).labels.tolist() == labels.tolist()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels.astype(np.uint8)), 1))
    load_idx_set("mnist", tmp_path)
    # One changed label is caught.
    labels[0] = (labels[0] + 1) % 10
    write_idx(folder / "train-labels-idx1-ubyte", labels.astype(np.uint8), gz=True)
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz: md5 of the uncompressed IDX bytes"):
        load_idx_set("mnist", tmp_path)
    assert load_idx_set("mnist", tmp_path, verify=False).labels[0] == labels[0]


def test_cifar10_batches_in_the_original_format(tmp_path):
    data = write_cifar10(tmp_path)
    train = load_cifar(tmp_path, 10, train=True, verify=False)
    assert train.images.shape == (100, 3, 32, 32)
    np.testing.assert_array_equal(train.images[:20].reshape(20, -1), data[0])
    assert train.labels[:3].tolist() == [0, 1, 2]
    test = load_cifar(tmp_path, 10, train=False, verify=False)
    np.testing.assert_array_equal(test.images.reshape(20, -1), data[5])
    assert load_any(tmp_path, verify=False)[0] == "cifar10"
    with pytest.raises(ChecksumError, match=r"data_batch_1: md5 is [0-9a-f]{32}, expected c99cafc1"):
        load_cifar(tmp_path, 10)
    with pytest.raises(ChecksumError):  # a damaged set is reported, not skipped for the next one
        load_any(tmp_path)


def test_cifar_truncated_or_malformed_batch(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    sums = {p.name: md5(p.read_bytes()) for p in folder.iterdir()}
    whole = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(whole[: len(whole) // 3])
    with pytest.raises(DatasetError, match="data_batch_2: not a CIFAR python batch.*truncated"):
        load_cifar(tmp_path, 10, verify=False)
    # With the checksums known, the same cut file says what is wrong first: it is not the expected file.
    monkeypatch.setitem(CHECKSUMS, "cifar10", sums)
    with pytest.raises(ChecksumError, match=f"data_batch_2: md5 is {md5(whole[: len(whole) // 3])}"):
        load_cifar(tmp_path, 10)
    (folder / "data_batch_2").write_bytes(cifar_batch_bytes(np.zeros((5, 100), np.uint8), range(5)))
    with pytest.raises(DatasetError, match=r"shape \(5, 100\), expected \(N, 3072\)"):
        load_cifar(tmp_path, 10, verify=False)
    (folder / "data_batch_2").write_bytes(cifar_batch_bytes(np.zeros((5, 3072), np.uint8), range(4)))
    with pytest.raises(DatasetError, match=r"\(4,\) labels for 5 images"):
        load_cifar(tmp_path, 10, verify=False)


def test_a_cifar_file_cannot_run_code(tmp_path):
    data = write_cifar10(tmp_path)
    evil = pickle.dumps({"data": data[0], "labels": [0] * 20, "x": __import__("os").getcwd})
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(DatasetError, match="refusing"):
        load_cifar(tmp_path, 10, verify=False)


# -------------------------------------------------------------------------------------------- download

def test_idx_download_from_a_local_server_with_fallback(tmp_path, http_root, monkeypatch):
    www, url = http_root
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40)
    sums = write_idx_set(www, images, labels, train=False)
    monkeypatch.setitem(CHECKSUMS, "mnist", sums)
    monkeypatch.setitem(datasets.SOURCES, "mnist", [DEAD, url])  # the first source is down: the next one serves
    root = tmp_path / "data"
    split = load_idx_set("mnist", root, train=False, download=True)
    np.testing.assert_array_equal(split.images[:, 0], images)
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    # Present now: a later load needs no server.
    monkeypatch.setitem(datasets.SOURCES, "mnist", [DEAD])
    assert load_idx_set("mnist", root, train=False, download=True).labels.tolist() == labels.tolist()


def test_a_download_failing_its_checksum_leaves_nothing(tmp_path, http_root, monkeypatch):
    www, url = http_root
    write_idx_set(www, np.zeros((4, 28, 28), np.uint8), np.zeros(4))
    monkeypatch.setitem(datasets.SOURCES, "fashion-mnist", [url])  # serves files that are not the official ones
    root = tmp_path / "data"
    with pytest.raises(ChecksumError) as err:
        load_idx_set("fashion-mnist", root, download=True)
    assert url + "train-images-idx3-ubyte.gz" in str(err.value)
    assert CHECKSUMS["fashion-mnist"]["train-images-idx3-ubyte"] in str(err.value)
    assert list((root / "FashionMNIST" / "raw").iterdir()) == []
    # A truncated download is refused the same way, even unverified.
    blob = (www / "train-images-idx3-ubyte.gz").read_bytes()
    (www / "train-images-idx3-ubyte.gz").write_bytes(blob[:-20])
    with pytest.raises(MissingDatasetError, match="corrupt or truncated gzip"):
        load_idx_set("fashion-mnist", root, download=True, verify=False)
    assert [p.name for p in (root / "FashionMNIST" / "raw").iterdir()] == []


def test_network_down_says_which_files_go_where(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SOURCES, "fashion-mnist", [DEAD])
    with pytest.raises(MissingDatasetError) as err:
        load_idx_set("fashion-mnist", tmp_path, download=True)
    msg = str(err.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg and DEAD in msg
    assert "train-labels-idx1-ubyte[.gz]" in msg  # every missing file is named, not only the first tried
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "apt-get install dataset-fashion-mnist" in msg
    monkeypatch.setitem(datasets.SOURCES, "cifar10", [DEAD])
    with pytest.raises(MissingDatasetError, match=r"(?s)could not download cifar-10-python.tar.gz.*unpacked under"):
        load_cifar(tmp_path, 10, download=True)
    assert leftovers(tmp_path) == []


def test_mirror_env_is_laid_out_like_a_data_root(tmp_path, http_root, monkeypatch):
    www, url = http_root
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10)
    monkeypatch.setitem(CHECKSUMS, "fashion-mnist", write_idx_set(www / "FashionMNIST" / "raw", images, labels))
    monkeypatch.setitem(datasets.SOURCES, "fashion-mnist", [DEAD])
    monkeypatch.setenv(datasets.MIRROR_ENV, url.rstrip("/"))
    split = load_idx_set("fashion-mnist", tmp_path / "data", download=True)
    assert split.labels.tolist() == labels.tolist()


def fake_cifar10_archive() -> tuple[bytes, dict, np.ndarray]:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (6, 8, 3072), dtype=np.uint8)
    files = {name: cifar_batch_bytes(data[i], rng.integers(0, 10, 8), name=name)
             for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"])}
    blob = tar_gz({"cifar-10-batches-py/" + k: v for k, v in files.items()}
                  | {"cifar-10-batches-py/readme.html": b"<html></html>"})
    return blob, {k: md5(v) for k, v in files.items()} | {"cifar-10-python.tar.gz": md5(blob)}, data


def test_cifar_download_unpacks_and_verifies(tmp_path, http_root, monkeypatch):
    www, url = http_root
    blob, sums, data = fake_cifar10_archive()
    (www / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setitem(CHECKSUMS, "cifar10", sums)
    monkeypatch.setitem(datasets.SOURCES, "cifar10", [url])
    root = tmp_path / "data"
    split = load_cifar(root, 10, train=False, download=True)
    np.testing.assert_array_equal(split.images.reshape(8, -1), data[5])
    assert (root / "cifar-10-python.tar.gz").read_bytes() == blob
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir())[:2] == ["data_batch_1", "data_batch_2"]
    assert leftovers(root) == []
    assert load_cifar(root, 10, train=True).images.shape == (40, 3, 32, 32)
    # A batch lost later is restored from the archive kept beside it, with no server.
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    monkeypatch.setitem(datasets.SOURCES, "cifar10", [DEAD])
    assert load_cifar(root, 10, train=True, download=True).images.shape == (40, 3, 32, 32)


@pytest.mark.parametrize("member", ["../evil", "/tmp/evil", "cifar-10-batches-py/../../evil", "elsewhere/x"])
def test_an_unsafe_archive_is_not_unpacked(tmp_path, http_root, monkeypatch, member):
    www, url = http_root
    blob = tar_gz({"cifar-10-batches-py/test_batch": b"x", member: b"pwned"})
    (www / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setitem(CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": md5(blob)})
    monkeypatch.setitem(datasets.SOURCES, "cifar10", [url])
    root = tmp_path / "a" / "b"
    with pytest.raises(DatasetError, match="not unpacking it|outside cifar-10-batches-py"):
        load_cifar(root, 10, train=False, download=True)
    assert not (root / "cifar-10-batches-py").exists()
    assert not list(tmp_path.rglob("evil")) and leftovers(root) == []


def test_an_archive_with_a_link_is_not_unpacked(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("cifar-100-python/train")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(buf.getvalue())  # put by hand: no download needed
    monkeypatch.setitem(datasets.SOURCES, "cifar100", [DEAD])
    with pytest.raises(DatasetError, match="is a link or special file"):
        load_cifar(root, 100, download=True, verify=False)
    assert not (root / "cifar-100-python").exists()


# ------------------------------------------------------------------------------------------- real sets

@pytest.mark.skipif(not (SHARED / "FashionMNIST").is_dir(), reason=f"real Fashion-MNIST not at {SHARED}")
def test_real_fashion_mnist():
    split = load_idx_set("fashion-mnist", SHARED, verify=True)
    assert split.images.shape == (60000, 1, 28, 28)
    assert np.bincount(split.labels).tolist() == [6000] * 10
    assert load_idx_set("fashion-mnist", SHARED, train=False, verify=True).images.shape == (10000, 1, 28, 28)


@pytest.mark.skipif(not (SHARED / "MNIST").is_dir(), reason=f"real MNIST not at {SHARED}")
def test_real_mnist():
    split = load_idx_set("mnist", SHARED, train=False, verify=True)
    assert split.images.shape == (10000, 1, 28, 28) and split.labels.max() == 9
