"""Class-incremental streams: a data set split into tasks of disjoint classes (Split-MNIST and kin).

A stream presents the classes in ``class_order`` and relabels them ``0..C-1`` in that order, so task
``k`` of ``c`` classes always holds labels ``k*c .. k*c+c-1`` whatever the permutation; the original
class of label ``i`` is ``class_order[i]``. Images stay uint8 ``(N, C, H, W)`` (what a replay memory
stores); :func:`trainers.augment.prepare` turns a batch into normalized floats at read time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import DatasetError, MissingDatasetError, Split, load_cifar, load_idx_set


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark is made of: its data set, its default task count and how to normalize it."""

    dataset: str                        # "mnist" | "fashion-mnist" | "cifar10" | "cifar100"
    num_classes: int
    tasks: int                          # default number of tasks
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool                       # random crop + flip at read time (CIFAR's usual training recipe)


BENCHMARKS: dict[str, Benchmark] = {
    "split-mnist": Benchmark("mnist", 10, 5, (1, 28, 28), (0.1307,), (0.3081,), False),
    "split-fashion-mnist": Benchmark("fashion-mnist", 10, 5, (1, 28, 28), (0.2860,), (0.3530,), False),
    "split-cifar10": Benchmark("cifar10", 10, 5, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615), True),
    "split-cifar100": Benchmark("cifar100", 100, 10, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                                (0.2673, 0.2564, 0.2762), True),
}

#: Searched in order when ``data_root`` is None (relative ones against the working directory), then
#: :data:`REPO_DATA_ROOT`; the same roots as ``python -m trainers demo``.
DEFAULT_ROOTS: tuple[str, ...] = ("../shared/datasets", "data", "/usr/share/datasets")
#: The shared data sets beside the repository (``trainers/../../shared/datasets``), found from any cwd.
REPO_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
#: Where ``download=True`` puts a set that no root holds when ``data_root`` is None (torchvision's habit).
DOWNLOAD_ROOT = "data"


# eq=False: the arrays make field-wise equality ambiguous; a task or stream is equal only to itself.
@dataclass(frozen=True, eq=False)
class Task:
    """One task: its classes (remapped labels) and their train and test samples."""

    index: int
    classes: tuple[int, ...]      # remapped labels of this task: task k of c classes holds k*c .. k*c+c-1
    train_x: np.ndarray           # uint8 (N, C, H, W)
    train_y: np.ndarray           # int64, remapped labels
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass(frozen=True, eq=False)
class Stream:
    """A class-incremental benchmark: its tasks in order plus what a trainer needs to read them."""

    name: str                     # benchmark name
    tasks: tuple[Task, ...]
    num_classes: int
    input_shape: tuple[int, int, int]   # (C, H, W)
    class_order: tuple[int, ...]  # original class ids in the order they are presented; remapped label i == class_order[i]
    mean: tuple[float, ...]       # per-channel normalization (of x/255)
    std: tuple[float, ...]
    augment: bool                 # True for CIFAR (random crop pad 4 + horizontal flip at read time, on replay too)
    source: str                   # where the data came from

    @property
    def classes_per_task(self) -> int:
        """Classes in each task (all tasks hold the same number)."""
        return self.num_classes // len(self.tasks)


def search_roots() -> list[Path]:
    """The existing data roots searched when ``data_root`` is None, in order, without duplicates."""
    roots, seen = [], set()
    for root in [Path(r) for r in DEFAULT_ROOTS] + [REPO_DATA_ROOT]:
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            roots.append(root)
    return roots


def _load(bench: Benchmark, root: Path, train: bool, verify: bool, download: bool) -> Split:
    if bench.dataset in ("cifar10", "cifar100"):
        return load_cifar(root, bench.num_classes, train, verify=verify, download=download)
    return load_idx_set(bench.dataset, root, train, verify=verify, download=download)


def _load_both(name: str, bench: Benchmark, data_root: str | Path | None, verify: bool,
               download: bool) -> tuple[Split, Split]:
    """Train and test splits from ``data_root``, or from the first searched root that holds the set."""
    if data_root is not None:
        root = Path(data_root)
        return (_load(bench, root, True, verify, download), _load(bench, root, False, verify, download))
    roots = search_roots()
    errors = []
    for root in roots:
        try:  # only a set that is absent falls through to the next root; a damaged one is reported
            train = _load(bench, root, True, verify, False)
        except MissingDatasetError as exc:
            errors.append(str(exc))
            continue
        return train, _load(bench, root, False, verify, download)
    if download:
        root = Path(DOWNLOAD_ROOT)
        return _load(bench, root, True, verify, True), _load(bench, root, False, verify, True)
    if not errors:  # no root exists: say what would go into ./data (absent too, so this only words it)
        try:
            _load(bench, Path(DOWNLOAD_ROOT), True, verify, False)
        except MissingDatasetError as exc:
            errors.append(str(exc))
    searched = ", ".join(str(r) for r in roots) or "none of them exists"
    raise MissingDatasetError(
        f"{name}: no {bench.dataset} data under the searched roots {list(DEFAULT_ROOTS) + [str(REPO_DATA_ROOT)]} "
        f"(existing: {searched}); pass data_root=DIR, or download=True (into ./{DOWNLOAD_ROOT}). "
        f"{errors[0] if errors else ''}")


def _partition(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               order: np.ndarray, tasks: int) -> tuple[Task, ...]:
    """Relabel by ``order`` and split both sets into ``tasks`` tasks of consecutive remapped labels."""
    num_classes = len(order)
    per = num_classes // tasks
    remap = np.empty(num_classes, np.int64)
    remap[order] = np.arange(num_classes)
    parts = []
    for x, y in ((x_train, y_train), (x_test, y_test)):
        y = remap[y]
        # One stable sort by task groups every task's samples, keeping their original order inside it.
        by_task = np.argsort(y // per, kind="stable")
        bounds = np.searchsorted((y // per)[by_task], np.arange(tasks + 1))
        parts.append([(x[by_task[lo:hi]], y[by_task[lo:hi]]) for lo, hi in zip(bounds[:-1], bounds[1:])])
    return tuple(Task(k, tuple(range(k * per, (k + 1) * per)), *parts[0][k], *parts[1][k]) for k in range(tasks))


def _check_labels(split: Split, num_classes: int, name: str) -> None:
    if len(split.labels) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
        raise DatasetError(f"{split.source}: labels span {split.labels.min()}..{split.labels.max()}, "
                           f"but {name} has {num_classes} classes")


def _first_per_class(labels: np.ndarray, limit: int, num_classes: int) -> np.ndarray:
    """Indices of the first ``limit`` samples of every class, in their original order."""
    keep = np.zeros(len(labels), bool)
    for c in range(num_classes):
        keep[np.flatnonzero(labels == c)[:limit]] = True
    return np.flatnonzero(keep)


def _task_count(name: str, num_classes: int, tasks: int | None, default: int) -> int:
    tasks = default if tasks is None else tasks
    if not isinstance(tasks, (int, np.integer)) or tasks < 1 or num_classes % tasks:
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise ValueError(f"{name}: tasks must divide its {num_classes} classes evenly: "
                         f"one of {divisors}, not {tasks!r}")
    return int(tasks)


def make_stream(name: str, data_root: str | Path | None = None, *, seed: int = 0, tasks: int | None = None,
                class_order: str = "seed", download: bool = False, verify: bool = True,
                limit_per_class: int | None = None) -> Stream:
    """Build the class-incremental stream ``name`` (a key of :data:`BENCHMARKS`) from real files.

    ``class_order="seed"`` presents the classes in ``np.random.default_rng(seed).permutation``,
    ``"natural"`` in ``0..C-1``. ``tasks`` must divide the class count (default: the benchmark's).
    ``data_root=None`` searches :data:`DEFAULT_ROOTS` then :data:`REPO_DATA_ROOT`. ``limit_per_class``
    keeps the first N training samples of each class (test sets stay whole). ``verify`` and
    ``download`` are passed to the readers in :mod:`trainers.datasets`.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    n_tasks = _task_count(name, bench.num_classes, tasks, bench.tasks)
    if class_order == "seed":
        order = np.random.default_rng(seed).permutation(bench.num_classes)
    elif class_order == "natural":
        order = np.arange(bench.num_classes)
    else:
        raise ValueError(f"class_order must be 'seed' or 'natural', not {class_order!r}")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be at least 1, not {limit_per_class}")
    train, test = _load_both(name, bench, data_root, verify, download)
    for split in (train, test):
        _check_labels(split, bench.num_classes, name)
        if split.images.shape[1:] != bench.input_shape:
            raise DatasetError(f"{split.source}: images of shape {split.images.shape[1:]}, "
                               f"{name} expects {bench.input_shape}")
    x_train, y_train = train.images, train.labels
    if limit_per_class is not None:
        keep = _first_per_class(y_train, limit_per_class, bench.num_classes)
        x_train, y_train = x_train[keep], y_train[keep]
    return Stream(name=name, tasks=_partition(x_train, y_train, test.images, test.labels, order, n_tasks),
                  num_classes=bench.num_classes, input_shape=bench.input_shape,
                  class_order=tuple(int(c) for c in order), mean=bench.mean, std=bench.std,
                  augment=bench.augment, source=train.source)


def generated_stream(name: str = "split-generated", *, tasks: int = 5, classes_per_task: int = 2,
                     shape: tuple[int, int, int] = (1, 28, 28), train_per_class: int = 100,
                     test_per_class: int = 20, seed: int = 0, augment: bool = False) -> Stream:
    """A learnable synthetic stream: each class is a fixed random pattern plus fresh noise per sample.

    The patterns are coarse (4x4-pixel blocks), so a class stays recognizable under a crop shift of
    a few pixels; the noise (std 48 of 255) keeps samples distinct. Classes are presented in natural
    order; normalization constants are those of the generated training set. For tests and
    ``--benchmark generated`` runs that have no data set at hand.
    """
    if tasks < 1 or classes_per_task < 1 or train_per_class < 1 or test_per_class < 0:
        raise ValueError("tasks, classes_per_task and train_per_class must be positive, test_per_class >= 0")
    num_classes = tasks * classes_per_task
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape is (C, H, W), not {shape}")
    ch, h, w = shape
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (num_classes, ch, math.ceil(h / 4), math.ceil(w / 4))).astype(np.float32)
    protos = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w]

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((num_classes * per_class, ch, h, w), np.uint8)
        for c in range(num_classes):  # per class, so the float noise never holds the whole set
            noise = rng.standard_normal((per_class, ch, h, w), dtype=np.float32) * 48
            x[c * per_class:(c + 1) * per_class] = np.clip(protos[c] + noise, 0, 255).round()
        y = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
        mix = rng.permutation(len(y))  # interleaved classes, like a real data set's file order
        return x[mix], y[mix]

    x_train, y_train = draw(train_per_class)
    x_test, y_test = draw(test_per_class)
    # One channel at a time, so the float copy is a third of the set at most.
    stats = [(float(v.mean()), float(v.std())) for v in (x_train[:, c] / 255.0 for c in range(ch))]
    mean, std = tuple(m for m, _ in stats), tuple(s for _, s in stats)
    order = np.arange(num_classes)
    return Stream(name=name, tasks=_partition(x_train, y_train, x_test, y_test, order, tasks),
                  num_classes=num_classes, input_shape=shape, class_order=tuple(range(num_classes)),
                  mean=mean, std=std, augment=augment, source=f"generated (seed={seed})")
