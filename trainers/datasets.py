"""Readers for the standard benchmark data sets in their original formats.

- MNIST / Fashion-MNIST: IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``),
  found in a torchvision layout (``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``), flat in ``ROOT``,
  or in Debian's ``/usr/share/datasets/fashion-mnist``.
- CIFAR-10 / CIFAR-100: the python pickles of ``cifar-10-batches-py`` / ``cifar-100-python``.
  They are read with a restricted unpickler that admits only the builtins and numpy types those
  files contain, so a tampered file cannot run code.

Images come back as uint8 arrays ``(N, C, H, W)`` and labels as int64 ``(N,)``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_SETS = {
    "mnist": ("MNIST", None),
    "fashion-mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist")),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(FileNotFoundError):
    """A data set is missing or its files are malformed; the message says where to put what."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of one split (train or test)."""

    images: np.ndarray
    labels: np.ndarray
    source: str


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into an array of its declared shape."""
    raw = gzip.open(path).read() if str(path).endswith(".gz") else Path(path).read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise DatasetError(f"{path}: truncated IDX file ({len(body)} bytes of data, expected {count * dtype.itemsize})")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, sub: str, stem: str, extra: Path | None) -> Path | None:
    for folder in (root / sub / "raw", root / sub, root, extra):
        if folder is None:
            continue
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_idx_set(name: str, root: str | Path, train: bool = True) -> Split:
    """Load MNIST (``name="mnist"``) or Fashion-MNIST (``"fashion-mnist"``) from ``root``."""
    sub, extra = IDX_SETS[name]
    prefix = "train" if train else "t10k"
    root = Path(root)
    img = _find(root, sub, f"{prefix}-images-idx3-ubyte", extra)
    lab = _find(root, sub, f"{prefix}-labels-idx1-ubyte", extra)
    if img is None or lab is None:
        raise DatasetError(
            f"{name}: {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] not found under "
            f"{root / sub / 'raw'}, {root / sub}, {root}" + (f" or {extra}" if extra else "")
            + "; put the original IDX files there")
    images, labels = read_idx(img), read_idx(lab)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DatasetError(f"{img}: {images.shape} images do not match {labels.shape} labels")
    return Split(images[:, None].copy(), labels.astype(np.int64), str(img.parent))


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's batches hold: builtin containers and plain numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_cifar_batch(path: Path) -> dict:
    try:
        return _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python batch ({exc})") from exc


def load_cifar(root: str | Path, classes: int = 10, train: bool = True) -> Split:
    """Load CIFAR-10 (``classes=10``) or CIFAR-100 (``classes=100``, fine labels) from ``root``."""
    root = Path(root)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = "labels"
    elif classes == 100:
        folder = root / "cifar-100-python"
        files = ["train" if train else "test"]
        key = "fine_labels"
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {classes}")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-{classes}: {missing} not found in {folder}; unpack the official "
                           f"cifar-{classes}-python.tar.gz under {root}")
    xs, ys = [], []
    for f in files:
        batch = _read_cifar_batch(folder / f)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{folder / f}: data has shape {data.shape}, expected (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[key], dtype=np.int64))
    return Split(np.concatenate(xs), np.concatenate(ys), str(folder))


def load_any(root: str | Path, train: bool = True) -> tuple[str, Split]:
    """The first data set found under ``root``: CIFAR-10, Fashion-MNIST, then MNIST."""
    errors = []
    for name, loader in (("cifar10", lambda: load_cifar(root, 10, train)),
                         ("fashion-mnist", lambda: load_idx_set("fashion-mnist", root, train)),
                         ("mnist", lambda: load_idx_set("mnist", root, train))):
        try:
            return name, loader()
        except DatasetError as exc:
            errors.append(str(exc))
    raise DatasetError("no data set found:\n  " + "\n  ".join(errors))
