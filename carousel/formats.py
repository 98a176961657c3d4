"""Data sets in their original file formats, read without running anything they contain.

Two layers. The parsers, shared with :mod:`trainers.datasets` (which adds checksums and downloads):

- IDX (MNIST, Fashion-MNIST): :func:`parse_idx` / :func:`read_idx`, optionally gzip-compressed;
- CIFAR python batches: :func:`parse_cifar_batch` unpickles with :class:`CifarUnpickler`, which
  admits only the builtins and plain numpy arrays those files hold, so a tampered file cannot run
  code; :func:`cifar_arrays` checks the batch's layout.

And the *sources* ``carousel import`` reads (:func:`open_source`): a data set at a path, of any of

- IDX: ``*-images-idx3-ubyte[.gz]`` beside its ``*-labels-idx1-ubyte[.gz]``; the path is the
  images file or their folder (``train-`` or ``t10k-`` files by the split);
- CIFAR: a ``cifar-10-batches-py`` / ``cifar-100-python`` folder (or a folder holding one), or the
  official ``.tar.gz``, read in place (members are read, never extracted); CIFAR-100's fine labels;
- ``.npz``: arrays ``x`` (samples) and ``y`` (integer labels), optionally ``task`` (a task id per
  sample); other key names by ``x_key`` / ``y_key``; loaded with ``allow_pickle=False``;
- image folders: ``ROOT/CLASS_NAME/*.png``, classes in sorted name order are labels 0, 1, ...;
  decoded by ``storage_backends.png.decode_png`` (an image folder needs that module).

A :class:`Source` says which files it reads (for checksums), how many rows it has and their shape,
and reads rows ``[lo, hi)`` on demand. Every malformed input raises :class:`FormatError` naming the
file and what is wrong.

>>> import gzip, os, struct, tempfile, numpy as np
>>> folder = tempfile.mkdtemp()
>>> imgs = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
>>> with gzip.open(os.path.join(folder, "train-images-idx3-ubyte.gz"), "wb") as f:
...     _ = f.write(struct.pack(">BBBB3I", 0, 0, 8, 3, 2, 4, 4) + imgs.tobytes())
>>> with open(os.path.join(folder, "train-labels-idx1-ubyte"), "wb") as f:
...     _ = f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 2) + bytes([3, 1]))
>>> src = open_source(folder, split="train")
>>> src.kind, len(src), src.sample_shape, src.labels().tolist()
('idx', 2, (4, 4), [3, 1])
>>> x, y = src.read(1, 2); x.shape, y.tolist()
((1, 4, 4), [1])
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FormatError", "CifarUnpickler", "Source", "cifar_arrays", "gunzip", "open_source", "parse_cifar_batch",
           "parse_idx", "read_idx"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR_TOPS = {"cifar-10-batches-py": 10, "cifar-100-python": 100}


class FormatError(ValueError):
    """A file that is not what its format says (bad magic, truncated, wrong layout) or a path that
    holds no data set this module knows; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------- parsers

def gunzip(path: str | Path, data: bytes) -> bytes:
    """Decompress gzip ``data`` read from ``path``; a cut or corrupt file is a :class:`FormatError`."""
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut file is an EOFError
        raise FormatError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


def parse_idx(path: str | Path, raw: bytes) -> np.ndarray:
    """The array an IDX file's (uncompressed) bytes ``raw`` hold, of its declared shape, native byte order.

    >>> parse_idx("a", bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
    [7, 9]
    >>> parse_idx("b", b"PK..")
    Traceback (most recent call last):
    ...
    carousel.formats.FormatError: b: not an IDX file (bad magic b'PK..')
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FormatError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise FormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise FormatError(f"{path}: truncated IDX file ({len(body)} bytes of data, expected {count * dtype.itemsize})")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in ``.gz``); see :func:`parse_idx`."""
    path = Path(path)
    raw = path.read_bytes()
    return parse_idx(path, gunzip(path, raw) if path.name.endswith(".gz") else raw)


class CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's batches hold: builtin containers and plain numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def parse_cifar_batch(path: str | Path, data: bytes) -> dict:
    """A CIFAR python batch's dict, unpickled by :class:`CifarUnpickler` (nothing else is admitted).

    >>> parse_cifar_batch("evil", pickle.dumps(os.system))
    Traceback (most recent call last):
    ...
    carousel.formats.FormatError: evil: not a CIFAR python batch (refusing to load posix.system from a CIFAR batch)
    """
    try:
        batch = CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise FormatError(f"{path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise FormatError(f"{path}: not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
    return batch


def cifar_arrays(path: str | Path, batch: dict, label_key: str, name: str = "CIFAR") -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of a parsed batch, layout checked."""
    if "data" not in batch or label_key not in batch:
        raise FormatError(f"{path}: not a {name} batch (keys {sorted(map(str, batch))}, "
                          f"expected 'data' and {label_key!r})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise FormatError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise FormatError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


# ------------------------------------------------------------------------------------------- sources

class Source:
    """A data set to import: its files, rows, sample shape and dtype, labels, and rows on demand.

    ``files`` are the paths whose bytes make the data set (checksummed for the import's record);
    ``classes`` names the labels where the format has names (image folders), else None.
    """

    kind = ""

    def __init__(self, path: Path, files: list[Path], x: np.ndarray | None, y: np.ndarray,
                 task: np.ndarray | None = None, classes: list[str] | None = None) -> None:
        self.path, self.files, self._x, self._y, self.task, self.classes = path, files, x, y, task, classes

    def __len__(self) -> int:
        return int(self._y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._x.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._x.dtype

    def labels(self) -> np.ndarray:
        """Every row's label, int64 ``(N,)``."""
        return self._y

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[lo, hi)``: samples ``(n, *sample_shape)`` and labels ``(n,)`` int64."""
        return self._x[lo:hi], self._y[lo:hi]


class IdxSource(Source):
    kind = "idx"


class CifarSource(Source):
    kind = "cifar"


class NpzSource(Source):
    kind = "npz"


class ImageFolderSource(Source):
    """``ROOT/CLASS/*.png``: rows in (class name, file name) order, decoded as they are read."""

    kind = "images"

    def __init__(self, path: Path, files: list[Path], y: np.ndarray, classes: list[str],
                 decode: Callable[[bytes], np.ndarray]) -> None:
        super().__init__(path, files, None, y, None, classes)
        self._decode = decode
        first = self._image(0)
        self._shape, self._dtype = first.shape, first.dtype

    def _image(self, i: int) -> np.ndarray:
        try:
            return np.asarray(self._decode(self.files[i].read_bytes()))
        except (ValueError, OSError, EOFError, zlib.error) as exc:
            raise FormatError(f"{self.files[i]}: not a PNG image this decoder reads ({exc})") from exc

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((hi - lo, *self._shape), self._dtype)
        for k, i in enumerate(range(lo, hi)):
            img = self._image(i)
            if img.shape != self._shape or img.dtype != self._dtype:
                raise FormatError(f"{self.files[i]}: a {img.dtype} {img.shape} image among {self._dtype} "
                                  f"{self._shape} ones ({self.files[0]}); every image of a folder needs one shape")
            out[k] = img
        return out, self._y[lo:hi]


def _idx_pair(images: Path) -> Path:
    stem = images.name.replace("images-idx3", "labels-idx1").removesuffix(".gz")
    for name in (stem, stem + ".gz"):
        if (images.parent / name).is_file():
            return images.parent / name
    raise FormatError(f"{images}: no labels file beside it (expected {images.parent / stem}[.gz])")


def _open_idx(images: Path) -> IdxSource:
    labels_file = _idx_pair(images)
    x, y = read_idx(images), read_idx(labels_file)
    if x.ndim < 2 or y.shape != (x.shape[0],):
        raise FormatError(f"{images}: {x.shape} images do not match {y.shape} labels in {labels_file}")
    return IdxSource(images, [images, labels_file], x, y.astype(np.int64))


def _cifar_files(top: str, split: str) -> tuple[list[str], str]:
    if _CIFAR_TOPS[top] == 10:
        return ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]), "labels"
    return [split], "fine_labels"


def _open_cifar_folder(folder: Path, split: str) -> CifarSource:
    names, key = _cifar_files(folder.name, split)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FormatError(f"{folder}: CIFAR batch files {missing} missing for the {split} split")
    xs, ys = [], []
    for n in names:
        x, y = cifar_arrays(folder / n, parse_cifar_batch(folder / n, (folder / n).read_bytes()), key)
        xs.append(x)
        ys.append(y)
    return CifarSource(folder, [folder / n for n in names], np.concatenate(xs), np.concatenate(ys))


def _open_cifar_tar(archive: Path, split: str) -> CifarSource:
    """The batches of an official CIFAR archive, read from the tar stream (nothing is extracted)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            tops = {name.split("/")[0] for name in members} & set(_CIFAR_TOPS)
            if len(tops) != 1:
                raise FormatError(f"{archive}: not a CIFAR python archive (expected one of {sorted(_CIFAR_TOPS)}/ "
                                  f"inside)")
            top = tops.pop()
            names, key = _cifar_files(top, split)
            xs, ys = [], []
            for n in names:
                member = members.get(f"{top}/{n}")
                if member is None:
                    raise FormatError(f"{archive}: no {top}/{n} (a CIFAR batch of the {split} split) inside")
                data = tar.extractfile(member).read()
                x, y = cifar_arrays(f"{archive}:{top}/{n}", parse_cifar_batch(f"{archive}:{top}/{n}", data), key)
                xs.append(x)
                ys.append(y)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise FormatError(f"{archive}: corrupt or truncated archive ({exc})") from exc
    return CifarSource(archive, [archive], np.concatenate(xs), np.concatenate(ys))


def _open_npz(path: Path, x_key: str, y_key: str) -> NpzSource:
    try:
        with np.load(path, allow_pickle=False) as data:  # object arrays would need pickle: refused
            keys = set(data.files)
            if x_key not in keys or y_key not in keys:
                raise FormatError(f"{path}: needs arrays {x_key!r} (samples) and {y_key!r} (labels), has "
                                  f"{sorted(keys)}; name others with --x-key / --y-key")
            x, y = data[x_key], data[y_key]
            task = data["task"] if "task" in keys else None
    except FormatError:
        raise
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # a bad zip, a pickled array, a cut file
        raise FormatError(f"{path}: not a readable .npz of plain arrays ({exc})") from exc
    if x.ndim < 1 or y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
        raise FormatError(f"{path}: {y_key!r} must hold one integer label per sample of {x_key!r}: got {y.dtype} "
                          f"{y.shape} for {x.shape}")
    if task is not None and (task.shape != y.shape or task.dtype.kind not in "iu"):
        raise FormatError(f"{path}: 'task' must hold one integer per sample, got {task.dtype} {task.shape}")
    return NpzSource(path, [path], x, y.astype(np.int64), None if task is None else task.astype(np.int64))


def _png_decoder() -> Callable[[bytes], np.ndarray]:
    try:
        return importlib.import_module("storage_backends.png").decode_png
    except (ImportError, AttributeError) as exc:
        raise FormatError("image folders need a PNG decoder (storage_backends.png.decode_png), which this "
                          f"installation lacks ({exc}); convert the images to an .npz of arrays x and y") from exc


def _open_images(root: Path) -> ImageFolderSource:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        pngs = sorted(f for f in (root / name).iterdir() if f.suffix.lower() == ".png" and f.is_file())
        files += pngs
        labels += [label] * len(pngs)
    if not files:
        raise FormatError(f"{root}: no CLASS/*.png images in its subfolders")
    return ImageFolderSource(root, files, np.asarray(labels, np.int64), classes, _png_decoder())


def open_source(path: str | os.PathLike[str], split: str = "train", x_key: str = "x",
                y_key: str = "y") -> Source:
    """The data set at ``path``, its format found from the names there (see the module docstring).

    ``split`` (``"train"`` or ``"test"``) picks IDX and CIFAR files; ``x_key`` / ``y_key`` name an
    .npz's arrays. Raises :class:`FormatError` for a path holding no known format, or a bad file.
    """
    if split not in ("train", "test"):
        raise FormatError(f"split must be 'train' or 'test', got {split!r}")
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    name = p.name
    if p.is_file():
        if name.endswith(".npz"):
            return _open_npz(p, x_key, y_key)
        if name.endswith((".tar.gz", ".tgz")):
            return _open_cifar_tar(p, split)
        if "-images-idx" in name:
            return _open_idx(p)
        raise FormatError(f"{p}: not a format carousel imports (an IDX images file, a CIFAR .tar.gz, an .npz, "
                          "or a folder of these or of CLASS/*.png images)")
    if name in _CIFAR_TOPS:
        return _open_cifar_folder(p, split)
    for top in _CIFAR_TOPS:
        if (p / top).is_dir():
            return _open_cifar_folder(p / top, split)
    prefix = "train" if split == "train" else "t10k"
    for folder in (p, p / "raw"):
        found = sorted(folder.glob(f"*{prefix}-images-idx3-ubyte")) + sorted(folder.glob(f"*{prefix}-images-idx3-ubyte.gz"))
        if found:
            return _open_idx(found[0])
    if any(d.is_dir() and any(f.suffix.lower() == ".png" for f in d.iterdir()) for d in p.iterdir()):
        return _open_images(p)
    raise FormatError(f"{p}: holds no data set carousel imports: no {prefix}-images-idx3-ubyte[.gz] (IDX, "
                      f"{split} split), no {' or '.join(_CIFAR_TOPS)} folder, no CLASS/*.png subfolders")
