"""Class-incremental streams on data sets written in their original formats, and read-time augmentation.

Every written image carries its original label in pixel (0, 0, 0) and its rank among the samples of
its class in pixel (0, 0, 1), so the tests can check relabelling and ``limit_per_class`` sample by sample.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainers.test_datasets import cifar_batch_bytes, write_idx_set
from trainers import streams
from trainers.augment import PAD, crop_flip, prepare
from trainers.datasets import ChecksumError, MissingDatasetError
from trainers.streams import BENCHMARKS, Stream, generated_stream, make_stream

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
TRAIN_PER_CLASS, TEST_PER_CLASS = 7, 2


def labelled_images(num_classes: int, per_class: int, shape: tuple, rng) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled images whose pixel (0,0,0) is the label and (0,0,1) the rank within the class."""
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    x = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
    rank = np.zeros(len(labels), np.int64)
    for c in range(num_classes):
        rank[labels == c] = np.arange(per_class)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = labels, rank
    return x, labels


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root holding small MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 in their original layouts."""
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    for sub in ("MNIST", "FashionMNIST"):
        for train, per in ((True, TRAIN_PER_CLASS), (False, TEST_PER_CLASS)):
            x, y = labelled_images(10, per, (1, 28, 28), rng)
            write_idx_set(root / sub / "raw", x[:, 0], y, train=train)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    x, y = labelled_images(10, TRAIN_PER_CLASS, (3, 32, 32), rng)
    for i in range(5):  # five batches of the one shuffled training set, as in the original
        part = slice(i * len(y) // 5, (i + 1) * len(y) // 5)
        (folder / f"data_batch_{i + 1}").write_bytes(cifar_batch_bytes(x[part].reshape(-1, 3072), y[part]))
    x, y = labelled_images(10, TEST_PER_CLASS, (3, 32, 32), rng)
    (folder / "test_batch").write_bytes(cifar_batch_bytes(x.reshape(-1, 3072), y))
    folder = root / "cifar-100-python"
    folder.mkdir()
    for name, per in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        x, y = labelled_images(100, per, (3, 32, 32), rng)
        (folder / name).write_bytes(cifar_batch_bytes(x.reshape(-1, 3072), y, key="fine_labels"))
    return root


def check_stream(stream: Stream, tasks: int, per_task: int, train_total: int) -> None:
    assert len(stream.tasks) == tasks and stream.classes_per_task == per_task
    assert sorted(stream.class_order) == list(range(stream.num_classes)) == list(range(tasks * per_task))
    order = np.array(stream.class_order)
    seen = 0
    for k, task in enumerate(stream.tasks):
        assert task.index == k and task.classes == tuple(range(k * per_task, (k + 1) * per_task))
        for x, y in ((task.train_x, task.train_y), (task.test_x, task.test_y)):
            assert x.dtype == np.uint8 and y.dtype == np.int64 and x.shape == (len(y), *stream.input_shape)
            assert set(y.tolist()) == set(task.classes)
            np.testing.assert_array_equal(order[y], x[:, 0, 0, 0])  # remapped label i is class_order[i]
        seen += len(task.train_y)
    assert seen == train_total


@pytest.mark.parametrize("name, tasks, per_task, shape, augment", [
    ("split-mnist", None, 2, (1, 28, 28), False),
    ("split-fashion-mnist", None, 2, (1, 28, 28), False),
    ("split-cifar10", None, 2, (3, 32, 32), True),
    ("split-cifar100", None, 10, (3, 32, 32), True),
    ("split-cifar100", 20, 5, (3, 32, 32), True),
])
def test_each_benchmark_partitions_its_classes(data_root, name, tasks, per_task, shape, augment):
    stream = make_stream(name, data_root, tasks=tasks, verify=False)
    bench = BENCHMARKS[name]
    num_classes = bench.num_classes
    check_stream(stream, num_classes // per_task, per_task, num_classes * TRAIN_PER_CLASS)
    assert stream.name == name and stream.num_classes == num_classes and stream.input_shape == shape
    assert stream.augment is augment and (stream.mean, stream.std) == (bench.mean, bench.std)
    assert len(stream.mean) == shape[0] and Path(stream.source).parent.is_relative_to(data_root)
    assert sum(len(t.test_y) for t in stream.tasks) == num_classes * TEST_PER_CLASS


def test_normalization_constants():
    assert BENCHMARKS["split-mnist"].mean == (0.1307,) and BENCHMARKS["split-mnist"].std == (0.3081,)
    assert BENCHMARKS["split-fashion-mnist"].mean == (0.2860,) and BENCHMARKS["split-fashion-mnist"].std == (0.3530,)
    assert BENCHMARKS["split-cifar10"].std == (0.2470, 0.2435, 0.2615)
    assert BENCHMARKS["split-cifar100"].mean == (0.5071, 0.4865, 0.4409)
    assert [BENCHMARKS[n].tasks for n in BENCHMARKS] == [5, 5, 5, 10]


def test_seed_sets_the_class_order_deterministically(data_root):
    a = make_stream("split-mnist", data_root, seed=0, verify=False)
    assert a.class_order == tuple(np.random.default_rng(0).permutation(10).tolist())
    assert make_stream("split-mnist", data_root, seed=0, verify=False).class_order == a.class_order
    b = make_stream("split-mnist", data_root, seed=1, verify=False)
    assert b.class_order != a.class_order
    # The same images, regrouped: task 0 of seed 1 holds the classes seed 1 presents first.
    assert set(b.tasks[0].train_x[:, 0, 0, 0].tolist()) == set(b.class_order[:2])
    assert make_stream("split-mnist", data_root, class_order="natural", verify=False).class_order == tuple(range(10))
    with pytest.raises(ValueError, match="'seed' or 'natural'"):
        make_stream("split-mnist", data_root, class_order="random", verify=False)


def test_samples_keep_their_file_order_inside_a_task(data_root):
    stream = make_stream("split-cifar10", data_root, class_order="natural", verify=False)
    ranks = stream.tasks[0].train_x[:, 0, 0, 1][stream.tasks[0].train_y == 0]
    assert ranks.tolist() == list(range(TRAIN_PER_CLASS))


def test_limit_per_class_keeps_the_first_n(data_root):
    stream = make_stream("split-fashion-mnist", data_root, limit_per_class=3, verify=False)
    check_stream(stream, 5, 2, 10 * 3)
    for task in stream.tasks:
        assert np.bincount(task.train_y, minlength=10)[list(task.classes)].tolist() == [3, 3]
        assert sorted(set(task.train_x[:, 0, 0, 1].tolist())) == [0, 1, 2]  # the first three of each class
        assert len(task.test_y) == 2 * TEST_PER_CLASS  # test sets stay whole
    big = make_stream("split-fashion-mnist", data_root, limit_per_class=1000, verify=False)
    assert sum(len(t.train_y) for t in big.tasks) == 10 * TRAIN_PER_CLASS
    with pytest.raises(ValueError, match="at least 1"):
        make_stream("split-fashion-mnist", data_root, limit_per_class=0, verify=False)


def test_bad_names_and_task_counts(data_root):
    with pytest.raises(ValueError, match="split-mnist, split-fashion-mnist, split-cifar10, split-cifar100"):
        make_stream("split-imagenet", data_root)
    with pytest.raises(ValueError, match=r"one of \[1, 2, 4, 5, 10, 20, 25, 50, 100\], not 7"):
        make_stream("split-cifar100", data_root, tasks=7, verify=False)
    assert len(make_stream("split-mnist", data_root, tasks=10, verify=False).tasks[0].classes) == 1


def test_verify_is_on_by_default(data_root):
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz: md5"):
        make_stream("split-mnist", data_root)  # the written files are not the official ones


def test_default_roots_are_searched_in_order(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "REPO_DATA_ROOT", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data_root)
    stream = make_stream("split-cifar100", verify=False)
    assert stream.source == str(Path("data") / "cifar-100-python")
    (tmp_path / "data").unlink()
    with pytest.raises(MissingDatasetError) as err:
        make_stream("split-cifar100")
    msg = str(err.value)
    assert "'../shared/datasets', 'data', '/usr/share/datasets'" in msg and "data_root=DIR" in msg
    assert "cifar-100-python.tar.gz" in msg


def test_generated_stream_is_learnable_and_reproducible():
    stream = generated_stream(tasks=3, classes_per_task=2, train_per_class=30, test_per_class=10, seed=7)
    check_stream_shapes = [(t.train_x.shape, t.test_x.shape) for t in stream.tasks]
    assert check_stream_shapes == [((60, 1, 28, 28), (20, 1, 28, 28))] * 3
    assert stream.class_order == tuple(range(6)) and stream.classes_per_task == 2 and not stream.augment
    assert 0.2 < stream.mean[0] < 0.8 and 0.1 < stream.std[0] < 0.5
    # Learnable: the nearest class mean of the training images classifies the test images.
    x = np.concatenate([t.train_x for t in stream.tasks]).reshape(180, -1).astype(np.float32)
    y = np.concatenate([t.train_y for t in stream.tasks])
    means = np.stack([x[y == c].mean(0) for c in range(6)])
    tx = np.concatenate([t.test_x for t in stream.tasks]).reshape(60, -1).astype(np.float32)
    ty = np.concatenate([t.test_y for t in stream.tasks])
    guess = ((tx[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (guess == ty).mean() > 0.95
    again = generated_stream(tasks=3, classes_per_task=2, train_per_class=30, test_per_class=10, seed=7)
    np.testing.assert_array_equal(again.tasks[2].train_x, stream.tasks[2].train_x)
    other = generated_stream(tasks=3, classes_per_task=2, train_per_class=30, test_per_class=10, seed=8)
    assert not np.array_equal(other.tasks[2].train_x, stream.tasks[2].train_x)
    rgb = generated_stream(shape=(3, 32, 32), augment=True, train_per_class=5, test_per_class=1)
    assert rgb.input_shape == (3, 32, 32) and len(rgb.mean) == 3 and rgb.augment


# ------------------------------------------------------------------------------------------------ augment

def cifar_like(b: int = 32, seed: int = 0) -> tuple[torch.Tensor, Stream]:
    stream = generated_stream(shape=(3, 32, 32), augment=True, tasks=1, train_per_class=2, test_per_class=1)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8), stream


def normalized(x: torch.Tensor, stream: Stream) -> torch.Tensor:
    mean = torch.tensor(stream.mean).view(1, -1, 1, 1)
    std = torch.tensor(stream.std).view(1, -1, 1, 1)
    return (x.double() / 255 - mean) / std


def test_prepare_normalizes_without_augmentation_at_test_time():
    x, stream = cifar_like()
    out = prepare(x, stream, train=False)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), normalized(x, stream), rtol=1e-6, atol=1e-5)
    plain = generated_stream(tasks=1, train_per_class=2, test_per_class=1)  # augment=False
    mx = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(prepare(mx, plain, train=True).double(), normalized(mx, plain), rtol=1e-6, atol=1e-5)


def test_crop_and_flip_change_pixels_and_are_true_crops():
    x, stream = cifar_like(b=48)
    out = prepare(x, stream, train=True, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and out.shape == x.shape
    changed = (out.double() - normalized(x, stream)).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert changed.sum() >= 40  # 1 in 162 draws is the identity
    # Every output is one of the 81 crops of the zero-padded image, flipped or not (checked one by one here).
    raw = crop_flip(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    flips = 0
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1) for f in (False, True)
                   if torch.equal(raw[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert matches, f"sample {i} is not a crop of its padded image"
        flips += matches[0][2]
    assert 10 <= flips <= 38  # both branches taken
    torch.testing.assert_close(out.double(), normalized(raw, stream), rtol=1e-6, atol=1e-5)


def test_same_generator_seed_same_batch():
    x, stream = cifar_like()
    a = prepare(x, stream, train=True, generator=torch.Generator().manual_seed(3))
    b = prepare(x, stream, train=True, generator=torch.Generator().manual_seed(3))
    c = prepare(x, stream, train=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert prepare(x, stream, train=True).shape == x.shape  # the global generator works too


def test_prepare_refuses_the_wrong_batch():
    x, stream = cifar_like()
    with pytest.raises(ValueError, match="uint8"):
        prepare(x.float(), stream, train=True)
    with pytest.raises(ValueError, match=r"\(3, 28, 28\)"):
        prepare(x[:, :, :28, :28], stream, train=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; prepare on CPU is tested above")
def test_prepare_on_cuda_matches_cpu():
    x, stream = cifar_like()
    out = prepare(x.cuda(), stream, train=True, generator=torch.Generator().manual_seed(5))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), prepare(x, stream, train=True, generator=torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------------------------- real set

@pytest.mark.skipif(not (SHARED / "FashionMNIST").is_dir(), reason=f"real Fashion-MNIST not at {SHARED}")
def test_real_split_fashion_mnist():
    stream = make_stream("split-fashion-mnist", SHARED, seed=0, verify=True)
    assert [len(t.train_y) for t in stream.tasks] == [12000] * 5 and [len(t.test_y) for t in stream.tasks] == [2000] * 5
    assert stream.source == str(SHARED / "FashionMNIST" / "raw")
    x = torch.from_numpy(stream.tasks[0].train_x[:4096])
    out = prepare(x, stream, train=True)
    # The published constants fit the real images: a task's batch is roughly centred and scaled.
    assert abs(out.mean().item()) < 0.3 and 0.7 < out.std().item() < 1.3
