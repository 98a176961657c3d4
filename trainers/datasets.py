"""Readers for the standard benchmark data sets in their original formats, with checksums and download.

- MNIST / Fashion-MNIST: IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``),
  found in a torchvision layout (``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``), flat in ``ROOT``,
  or in Debian's ``/usr/share/datasets/fashion-mnist``.
- CIFAR-10 / CIFAR-100: the python pickles of ``cifar-10-batches-py`` / ``cifar-100-python``.
  They are read with a restricted unpickler that admits only the builtins and numpy types those
  files contain, so a tampered file cannot run code.

The format parsers live in :mod:`carousel.formats` (``carousel import`` reads the same files and
carousel does not import trainers); this module adds the official checksums, the layouts and downloads.

Images come back as uint8 arrays ``(N, C, H, W)`` and labels as int64 ``(N,)``.

``verify=True`` (the default) checks every file against the official md5 in :data:`CHECKSUMS`; pass
``verify=False`` for custom files in the same formats. ``download=True`` fetches missing files from
:data:`SOURCES` (or first from the mirror named by ``$CAROUSEL_DATA_MIRROR``, laid out like a data root:
``MIRROR/MNIST/raw/train-images-idx3-ubyte.gz``, ``MIRROR/cifar-10-python.tar.gz``) into the
torchvision layout under the root, through a temporary name, so a failed download leaves no half file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from carousel import formats

IDX_SETS = {
    "mnist": ("MNIST", None),
    "fashion-mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist")),
}

#: Official md5s. IDX sets: of the *uncompressed* bytes (Debian recompressed Fashion-MNIST's .gz files,
#: so the .gz md5s differ between copies while the content does not). CIFAR: of the files themselves.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}

#: Base URLs tried in order by ``download=True`` (a file's URL is base + file name). Tests replace them.
SOURCES: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}
#: A base URL laid out like a data root (torchvision layout), tried before :data:`SOURCES`.
MIRROR_ENV = "CAROUSEL_DATA_MIRROR"
DOWNLOAD_TIMEOUT_S = 60.0

_FASHION_HINT = ("; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
                 "/usr/share/datasets/fashion-mnist, which is searched too")


class DatasetError(FileNotFoundError):
    """A data set is missing or its files are malformed; the message says where to put what."""


class MissingDatasetError(DatasetError):
    """The files are not there (and were not downloaded); the message says which files go where."""


class ChecksumError(DatasetError):
    """A file is not the official one: its md5 differs from :data:`CHECKSUMS`."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of one split (train or test)."""

    images: np.ndarray
    labels: np.ndarray
    source: str


# ---------------------------------------------------------------------------------------------- checks

def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_md5(path: str | Path, data: bytes, expected: str | None, what: str = "") -> None:
    if expected is None:
        return
    actual = _md5(data)
    if actual != expected:
        raise ChecksumError(
            f"{path}: md5{what} is {actual}, expected {expected} (the official file's); the file is damaged "
            f"or not the official one: delete it and download it again (download=True) or put the official "
            f"file there; for a custom file in the same format pass verify=False")


def _gunzip(path: str | Path, data: bytes) -> bytes:
    try:
        return formats.gunzip(path, data)
    except formats.FormatError as exc:
        raise DatasetError(f"{exc}; delete it and download it again (download=True) or put the original file "
                           f"there") from exc


# ------------------------------------------------------------------------------------------------- IDX

def read_idx(path: str | Path, expected_md5: str | None = None) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into an array of its declared shape.

    ``expected_md5`` is checked against the uncompressed bytes (raises :class:`ChecksumError`).
    The parser is :func:`carousel.formats.parse_idx` (``carousel import`` reads the same files).
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = _gunzip(path, raw)
    _check_md5(path, raw, expected_md5, " of the uncompressed IDX bytes")
    try:
        return formats.parse_idx(path, raw)
    except formats.FormatError as exc:
        raise DatasetError(str(exc)) from exc


def _idx_folders(root: Path, sub: str, extra: Path | None) -> list[Path]:
    return [f for f in (root / sub / "raw", root / sub, root, extra) if f is not None]


def _find(root: Path, sub: str, stem: str, extra: Path | None) -> Path | None:
    for folder in _idx_folders(root, sub, extra):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _idx_missing_message(name: str, root: Path, stems: list[str], downloading: bool = False) -> str:
    sub, extra = IDX_SETS[name]
    where = ", ".join(str(f) for f in _idx_folders(root, sub, extra))
    return (f"{name}: {', '.join(s + '[.gz]' for s in stems)} not found in any of {where}; put the original IDX "
            f"files (.gz or uncompressed) in {root / sub / 'raw'}"
            + ("" if downloading else " or pass download=True")
            + (_FASHION_HINT if name == "fashion-mnist" else ""))


def load_idx_set(name: str, root: str | Path, train: bool = True, *, verify: bool = True,
                 download: bool = False) -> Split:
    """Load MNIST (``name="mnist"``) or Fashion-MNIST (``"fashion-mnist"``) from ``root``.

    ``verify`` checks the md5 of each file's uncompressed bytes; ``download`` fetches missing files
    into ``root/MNIST/raw`` (or ``root/FashionMNIST/raw``).
    """
    if name not in IDX_SETS:
        raise ValueError(f"unknown IDX data set {name!r}; known: {sorted(IDX_SETS)}")
    sub, extra = IDX_SETS[name]
    prefix = "train" if train else "t10k"
    root = Path(root)
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    found = {s: _find(root, sub, s, extra) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        if not download:
            raise MissingDatasetError(_idx_missing_message(name, root, missing))
        where = _idx_missing_message(name, root, missing, downloading=True)
        for stem in missing:
            found[stem] = _download_idx(name, root, stem, verify, where)
    sums = CHECKSUMS[name] if verify else {}
    img, lab = found[stems[0]], found[stems[1]]
    images, labels = read_idx(img, sums.get(stems[0])), read_idx(lab, sums.get(stems[1]))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DatasetError(f"{img}: {images.shape} images do not match {labels.shape} labels")
    return Split(images[:, None].copy(), labels.astype(np.int64), str(img.parent))


# ----------------------------------------------------------------------------------------------- CIFAR

def _read_cifar_batch(path: Path, expected_md5: str | None = None) -> dict:
    data = path.read_bytes()
    # The checksum first: a truncated official file then says "re-download", not "bad pickle".
    _check_md5(path, data, expected_md5)
    try:  # a restricted unpickler (carousel.formats.CifarUnpickler): a tampered file cannot run code
        return formats.parse_cifar_batch(path, data)
    except formats.FormatError as exc:
        raise DatasetError(f"{exc}; it may be truncated: unpack the official archive again, or pass "
                           f"download=True") from exc


def _cifar_layout(classes: int, train: bool) -> tuple[str, str, list[str], str]:
    """(set name, folder, batch files, label key) of CIFAR-``classes``."""
    if classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        return "cifar10", "cifar-10-batches-py", files, "labels"
    if classes == 100:
        return "cifar100", "cifar-100-python", ["train" if train else "test"], "fine_labels"
    raise ValueError(f"CIFAR has 10 or 100 classes, not {classes}")


def load_cifar(root: str | Path, classes: int = 10, train: bool = True, *, verify: bool = True,
               download: bool = False) -> Split:
    """Load CIFAR-10 (``classes=10``) or CIFAR-100 (``classes=100``, fine labels) from ``root``.

    ``verify`` checks each batch file's md5; ``download`` fetches and safely unpacks the official
    ``cifar-{classes}-python.tar.gz`` under ``root`` when batch files are missing.
    """
    root = Path(root)
    name, folder_name, files, key = _cifar_layout(classes, train)
    folder = root / folder_name
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        archive = f"cifar-{classes}-python.tar.gz"
        where = (f"CIFAR-{classes}: {missing} not found in {folder}; put the official {archive} "
                 f"(md5 {CHECKSUMS[name][archive]}, from {SOURCES[name][0] if SOURCES[name] else 'its authors'}) "
                 f"unpacked under {root} (it makes {folder_name}/)")
        if not download:
            raise MissingDatasetError(where + ", or pass download=True")
        _download_cifar(name, root, archive, folder_name, verify, where)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DatasetError(f"CIFAR-{classes}: the archive unpacked without {missing}; {where}")
    sums = CHECKSUMS[name] if verify else {}
    xs, ys = [], []
    for f in files:
        batch = _read_cifar_batch(folder / f, sums.get(f))
        try:
            data, labels = formats.cifar_arrays(folder / f, batch, key, f"CIFAR-{classes}")
        except formats.FormatError as exc:
            raise DatasetError(str(exc)) from exc
        xs.append(data)
        ys.append(labels)
    return Split(np.concatenate(xs), np.concatenate(ys), str(folder))


def load_any(root: str | Path, train: bool = True, *, verify: bool = True,
             download: bool = False) -> tuple[str, Split]:
    """The first data set found under ``root``: CIFAR-10, Fashion-MNIST, then MNIST.

    Only a missing set falls through to the next one; a damaged one raises. With ``download``, the
    sets are downloaded in the same order only when none is present.
    """
    loaders: list[tuple[str, Callable[[bool], Split]]] = [
        ("cifar10", lambda dl: load_cifar(root, 10, train, verify=verify, download=dl)),
        ("fashion-mnist", lambda dl: load_idx_set("fashion-mnist", root, train, verify=verify, download=dl)),
        ("mnist", lambda dl: load_idx_set("mnist", root, train, verify=verify, download=dl))]
    errors = []
    for dl in (False, True) if download else (False,):
        for name, loader in loaders:
            try:
                return name, loader(dl)
            except MissingDatasetError as exc:
                errors.append(str(exc))
    raise MissingDatasetError("no data set found:\n  " + "\n  ".join(errors))


# -------------------------------------------------------------------------------------------- download

def _urls(name: str, mirror_path: str, filename: str) -> list[str]:
    """The URLs of ``filename``: the mirror's (at ``mirror_path`` under it) first, then :data:`SOURCES`."""
    urls = []
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    if mirror:
        urls.append("/".join(p for p in (mirror, mirror_path.strip("/"), filename) if p))
    return urls + [base + filename for base in SOURCES.get(name, [])]


def _fetch(urls: list[str], dest: Path, check: Callable[[Path, str], None], where: str) -> Path:
    """Download the first of ``urls`` that works and passes ``check`` to ``dest``, atomically.

    The bytes go to a hidden temporary file beside ``dest`` that is renamed only after ``check``
    passed, so an interrupted or bad download never leaves a file that looks complete. ``check(tmp,
    label)`` raises :class:`DatasetError` naming ``label`` (the URL) when the bytes are wrong.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    bad_checksum = False
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
            check(tmp, url)
            os.replace(tmp, dest)
            return dest
        except ChecksumError as exc:
            bad_checksum = True
            errors.append(str(exc).split(";")[0])  # the advice part is about local files
        except DatasetError as exc:
            errors.append(str(exc).split(";")[0])
        except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
            errors.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    tried = "\n  ".join(errors) if errors else "no source configured"
    cls = ChecksumError if bad_checksum else MissingDatasetError
    raise cls(f"could not download {dest.name}:\n  {tried}\n{where}")


def _download_idx(name: str, root: Path, stem: str, verify: bool, where: str) -> Path:
    sub = IDX_SETS[name][0]
    dest = root / sub / "raw" / f"{stem}.gz"
    expected = CHECKSUMS[name].get(stem) if verify else None

    def check(tmp: Path, label: str) -> None:
        raw = _gunzip(label, tmp.read_bytes())
        _check_md5(label, raw, expected, " of the uncompressed IDX bytes")

    return _fetch(_urls(name, f"{sub}/raw", f"{stem}.gz"), dest, check, where)


def _safe_members(tar: tarfile.TarFile, top: str, archive: Path) -> list[tarfile.TarInfo]:
    """The archive's members, refusing anything that could land outside ``top/`` or is not a plain file."""
    members = []
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in m.name:
            raise DatasetError(f"{archive}: unsafe member {m.name!r} (absolute or '..' path); not unpacking it")
        if not (m.isfile() or m.isdir()):
            raise DatasetError(f"{archive}: member {m.name!r} is a link or special file; not unpacking it")
        if not p.parts or p.parts[0] != top:
            raise DatasetError(f"{archive}: member {m.name!r} is outside {top}/; not the official archive")
        members.append(m)
    return members


def _unpack(archive: Path, root: Path, top: str) -> None:
    """Unpack ``archive``'s ``top/`` folder into ``root/top`` through a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".part", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, top, archive)
                # The "data" filter (Python >= 3.11.4) is the stdlib's own second guard against escapes.
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **extra)
        except DatasetError:
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{archive}: corrupt or truncated archive ({exc}); delete it and download it "
                               f"again") from exc
        if not (tmp / top).is_dir():
            raise DatasetError(f"{archive}: holds no {top}/ folder; not the official archive")
        target = root / top
        if not target.exists():
            os.replace(tmp / top, target)
        else:  # a partly present folder: complete it file by file, each rename atomic
            for f in (tmp / top).iterdir():
                if f.is_file():
                    os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_cifar(name: str, root: Path, archive: str, top: str, verify: bool, where: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    path = root / archive
    expected = CHECKSUMS[name].get(archive) if verify else None

    def check(tmp: Path, label: str) -> None:
        _check_md5(label, tmp.read_bytes(), expected)

    present = path.is_file()  # an archive put here by hand (or by an earlier run) saves the download
    if present:
        try:
            check(path, str(path))
        except ChecksumError:
            present = False  # damaged or partial: the download below replaces it atomically
    if not present:
        _fetch(_urls(name, "", archive), path, check, where)
    _unpack(path, root, top)
