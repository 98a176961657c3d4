"""An image folder adopted as a read-only store: ``ROOT/class_name/*.png|jpg``, never copied.

Why: a continual learner's past samples often already sit on disk as a data set laid out the way
torchvision's ``ImageFolder`` (and CarM's code) reads it. Adopting that folder as a tier makes it
the store of past samples without writing a second copy; images are decoded where the swap engine
reads them (its I/O pool calls :meth:`ImageFolderStore.get_many`), never on the trainer's thread.

URL: ``files:///path/to/root?layout=imagefolder&mode=ro&classes_per_task=0&inflight=32&chunk=64``

- ``layout=imagefolder`` (required) and ``mode=ro`` (the only mode: nothing is ever written into
  the user's folder, not even an index file); ``sync`` is accepted and ignored (nothing to sync).
- ``classes_per_task=K``: a sample's task is ``label // K``; 0 (the default) gives every sample task 0.
- ``inflight``: file reads in flight at once (aiofiles on a thread pool of that size), as the
  files store's key of that name.
- ``chunk``: ids per chunk for :meth:`get_chunk` (chunks are id ranges, as LMDB's).

The listing, built once at open (nothing cached on disk), follows ``ImageFolder``'s rules:

- classes are the sorted names of ``ROOT``'s sub-folders; a sample's label (``y``) is its class's
  index in that order; files directly in ``ROOT`` are ignored;
- a class's images are found recursively under its folder (symlinks followed), walked in sorted
  order, file names sorted within a folder; ``.png``, ``.jpg`` and ``.jpeg`` (any case) count;
  other image types ``ImageFolder`` knows (``.bmp``, ``.webp``, ...) are skipped with a warning;
- ids are positions in that (class, path) order: ``0 .. N-1``, stable for as long as the folder's
  listing is (:attr:`ImageFolderStore.listing_digest` tells a changed listing), and equal to
  ``ImageFolder``'s sample indices when the folder holds only PNG and JPEG files.

Records: ``x`` uint8 ``(H, W)`` (gray) or ``(C, H, W)`` with C = 1 (gray), 3 (RGB) or 4 (RGBA),
``y`` the label, ``task`` from ``classes_per_task``. Images are converted to the schema's channels
as Pillow's ``convert`` does (RGB -> gray by ITU-R 601-2 luma, gray -> RGB by repetition, alpha
dropped or set to 255). Opened without a schema, the store infers one from its first image:
``(H, W)`` for a gray image, ``(3, H, W)`` for a colour one; ``y`` int64, ``task`` int16. A schema
with any other field (stored logits, a coreset weight, a saliency code) is refused with a
:class:`SchemaError` naming the fields a folder cannot supply.

Faults: an image that does not decode, or whose size differs from the schema's, raises
:class:`CorruptRecordError` for its id and is quarantined *in memory* (left out of ``ids()``,
``contains()`` and ``len()`` until the store is reopened; the file is never touched). PNGs are
decoded by :mod:`storage_backends.png` (zlib + numpy), JPEGs by Pillow when it is installed (the
error names ``pip install pillow`` otherwise). ``put_many`` and ``delete_many`` raise
:class:`StorePermissionError`.

Reads: ``get_many`` hands the paths to an asyncio loop and waits for the bytes, read by aiofiles
with ``inflight`` reads in flight (a cold folder on a disk or a network file system serves many
small files much faster with reads overlapped), then decodes them on the calling thread (zlib
releases the GIL while it inflates). The loop is the swap engine's once it offers it
(:meth:`~storage_backends.SampleStore.bind_loop`: the engine's I/O thread waits while the loop
reads), else one the store starts on a thread of its own (recovery, tests, the CLI), as the files
store (``files_store.py``) does.

>>> import tempfile, os, numpy as np
>>> from storage_backends.png import encode_png
>>> from storage_backends.url import parse_url
>>> root = tempfile.mkdtemp()
>>> for cls, value in (("cat", 10), ("dog", 200)):
...     os.mkdir(f"{root}/{cls}")
...     for i in range(2):
...         with open(f"{root}/{cls}/{i}.png", "wb") as fh:
...             _ = fh.write(encode_png(np.full((4, 5), value + i, np.uint8)))
>>> with ImageFolderStore(parse_url(f"files://{root}?layout=imagefolder&mode=ro"), None) as store:
...     batch = store.get_many([3, 0])
...     store.classes, len(store), batch["y"].tolist(), batch["x"][:, 0, 0].tolist(), store.schema["x"].shape
(['cat', 'dog'], 4, [1, 0], [201, 10], (4, 5))
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiofiles
import numpy as np

from .base import Chunk, SampleStore
from .errors import (
    CorruptRecordError,
    InvalidURLError,
    SchemaError,
    StoreError,
    StoreNotFoundError,
    StorePermissionError,
    format_ids,
)
from .loop_runner import LoopRunner
from .png import PNG_SIGNATURE, ImageDecodeError, UnsupportedImageError, decode_image, png_header
from .schema import Schema, validate_ids
from .url import StoreURL, parse_int

log = logging.getLogger("storage_backends.image_folder")

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderStore", "OTHER_IMAGE_EXTENSIONS"]

#: File endings read as images (lower-cased before the test).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: The rest of ``ImageFolder``'s image endings: skipped, with a warning (their ids would differ).
OTHER_IMAGE_EXTENSIONS = (".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_FIELDS = ("x", "y", "task")
_WAIT_S = 1.0  # how often a wait on the bound loop checks that the loop still runs


class ImageFolderStore(SampleStore):
    """A read-only :class:`SampleStore` over an ``ImageFolder``-style tree (see the module docstring).

    Attributes:
        classes: the class folder names, sorted; ``classes[y]`` is label ``y``'s folder.
        class_to_idx: folder name -> label, as ``ImageFolder`` has it.
        listing_digest: SHA-256 (hex) of the listing (class names and relative paths, in id
            order): equal digests mean every id names the same file as before.
    """

    scheme = "files"
    prefers_chunks = False  # a chunk is chunk_rows file reads: readers draw ids, not chunks

    def __init__(self, url: StoreURL, schema: Schema | None) -> None:
        opts = url.take({"layout": "", "mode": "ro", "classes_per_task": "0", "inflight": "32", "chunk": "64",
                         "sync": "0"})
        if opts["layout"] != "imagefolder":
            raise InvalidURLError(f"{url.text}: ImageFolderStore reads layout=imagefolder, got "
                                  f"layout={opts['layout']!r}")
        if opts["mode"] != "ro":
            raise InvalidURLError(f"{url.text}: an adopted image folder is read-only (mode=ro); nothing is ever "
                                  f"written into it, got mode={opts['mode']!r}")
        self._per_task = parse_int(opts["classes_per_task"], "classes_per_task", 0, 1 << 31)
        self._readers = parse_int(opts["inflight"], "inflight", 1, 1024)
        self._chunk = parse_int(opts["chunk"], "chunk", 1, 1 << 20)
        root = url.path.expanduser().absolute()
        if not root.is_dir():
            raise StoreNotFoundError(f"{url.text}: no folder at {root}")
        self.classes, self._paths, labels = _list(root, url.text)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.listing_digest = _digest(root, self.classes, self._paths)
        self._labels = labels
        self._tasks = labels // self._per_task if self._per_task else np.zeros_like(labels)
        stored = _infer_schema(self._paths, url.text) if schema is None else Schema(schema)
        _check_schema(stored, url.text)
        for name, values in (("y", self._labels), ("task", self._tasks)):
            dtype = stored[name].dtype
            if values.size and not (np.iinfo(dtype).min <= values.min() and values.max() <= np.iinfo(dtype).max):
                raise SchemaError(f"{url.text}: {name} values up to {int(values.max())} do not fit the schema's "
                                  f"{dtype.name}")
        x = stored["x"].shape
        self._hw = x if len(x) == 2 else x[1:]
        self._channels = 0 if len(x) == 2 else x[0]  # 0: (H, W) gray
        super().__init__(root, stored, url.text, readonly=True)
        self._bad = np.zeros(len(self._paths), dtype=bool)  # quarantined in memory (this open only)
        self._bad_lock = threading.Lock()
        self._nbytes: int | None = None
        # The reads' loop (the swap engine's once bound, else our own) and their threads.
        self._runner = LoopRunner("carousel-imagefolder", self._readers, _WAIT_S)

    # ---- the listing's face ---------------------------------------------------------------------
    def get_labels(self, ids) -> dict[str, np.ndarray]:
        """``{"y", "task"}`` of ``ids`` from the listing: no file is read or decoded (what a memory
        learns its catalog from at open). Unknown or quarantined ids raise ``MissingIdsError``."""
        self._check_open()
        ids = validate_ids(ids)
        self._check_present(ids)
        return {"y": self._labels[ids].astype(self.schema["y"].dtype),
                "task": self._tasks[ids].astype(self.schema["task"].dtype)}

    def path_of(self, ids) -> list[str]:
        """The image file of each id (absolute paths)."""
        self._check_open()
        ids = validate_ids(ids)
        self._check_present(ids)
        return [self._paths[i] for i in ids.tolist()]

    @property
    def nbytes(self) -> int:
        """Bytes the folder's images occupy on disk (allocated blocks), counted once."""
        self._check_open()
        if self._nbytes is None:
            total = 0
            for p in self._paths:
                try:
                    total += os.stat(p).st_blocks * 512
                except OSError:
                    continue
            self._nbytes = total
        return self._nbytes

    # ---- reads ----------------------------------------------------------------------------------
    def _get(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        self._check_present(ids)
        uniq, inverse = np.unique(ids, return_inverse=True)
        images, bad = self._read_decode(uniq)
        if bad:
            self._fail(bad)
        return self._assemble(uniq, images, inverse)

    def _assemble(self, uniq: np.ndarray, images: list[np.ndarray], inverse: np.ndarray | None) -> dict[str, np.ndarray]:
        x = np.stack(images) if images else np.zeros((0, *self.schema["x"].shape), np.uint8)
        out = {"x": x, "y": self._labels[uniq].astype(self.schema["y"].dtype),
               "task": self._tasks[uniq].astype(self.schema["task"].dtype)}
        if inverse is not None:  # back to the order asked, repeats included
            out = {k: v[inverse] for k, v in out.items()}
        return {name: out[name] for name in self.schema}  # in the schema's order

    def _read_decode(self, ids: np.ndarray) -> tuple[list[np.ndarray], dict[int, str]]:
        """Read ``ids``' files (many in flight) and decode them here: the images, and what was
        wrong with each id that failed (``{id: reason}``; then the images list is incomplete)."""
        paths = [self._paths[i] for i in ids.tolist()]
        blobs = self._read_files(paths)
        images: list[np.ndarray] = []
        bad: dict[int, str] = {}
        for i, blob in zip(ids.tolist(), blobs):
            if isinstance(blob, BaseException):
                bad[i] = f"cannot be read ({blob})"
                continue
            try:
                images.append(self._to_schema(decode_image(blob)))
            except UnsupportedImageError as exc:
                bad[i] = str(exc)
            except (ImageDecodeError, ValueError) as exc:
                bad[i] = str(exc)
        return images, bad

    def _to_schema(self, img: np.ndarray) -> np.ndarray:
        """A decoded ``(H, W)`` / ``(H, W, C)`` image in the schema's layout (channels converted)."""
        if img.shape[:2] != tuple(self._hw):
            raise ValueError(f"image is {img.shape[0]} x {img.shape[1]} pixels, the schema's x is "
                             f"{self._hw[0]} x {self._hw[1]}")
        return _convert(img, self._channels)

    def _fail(self, bad: dict[int, str]) -> None:
        ids = np.array(sorted(bad), dtype=np.int64)
        with self._bad_lock:
            self._bad[ids] = True
        first = ids[0]
        raise CorruptRecordError(f"{self.url}: {ids.size} image(s) cannot be used: {format_ids(ids)}; "
                                 f"quarantined for this open, files left in place (read-only); id {first} "
                                 f"({self._paths[first]}): {bad[int(first)]}", ids)

    def _check_present(self, ids: np.ndarray) -> None:
        found = (ids >= 0) & (ids < len(self._paths))
        found[found] = ~self._bad[ids[found]]
        if not found.all():
            raise self._missing(ids, found)

    # ---- the reader: aiofiles on the swap engine's loop, or on one this store owns -----------------
    def bind_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        # docstring inherited
        self._runner.bind(loop)

    def _read_files(self, paths: list[str]) -> list[bytes | BaseException]:
        """The bytes of each file (or the error reading it), ``inflight`` reads in flight, on the
        bound loop while it runs, else on the store's own (``loop_runner.py``)."""
        return self._runner.run(lambda: self._read_all(paths))

    async def _read_all(self, paths: list[str]) -> list[bytes | BaseException]:
        """Every file of ``paths``: ``inflight`` workers each take the next path as their read returns."""
        out: list[bytes | BaseException] = [b""] * len(paths)
        todo = iter(range(len(paths)))
        pool = self._io_pool()

        async def worker() -> None:
            for i in todo:
                try:
                    async with aiofiles.open(paths[i], "rb", buffering=0, executor=pool) as fh:
                        out[i] = await fh.read()
                except OSError as exc:
                    out[i] = exc

        await asyncio.gather(*(worker() for _ in range(min(self._readers, len(paths)))))
        return out

    def _io_pool(self) -> ThreadPoolExecutor:
        """``inflight`` threads for the reads (the loop's default executor is sized for the cores)."""
        return self._runner.pool()

    # ---- presence -------------------------------------------------------------------------------
    def _contains(self, ids: np.ndarray) -> np.ndarray:
        found = (ids >= 0) & (ids < len(self._paths))
        found[found] = ~self._bad[ids[found]]
        return found

    def _ids(self) -> np.ndarray:
        return np.flatnonzero(~self._bad).astype(np.int64)

    def _len(self) -> int:
        return int(len(self._paths) - self._bad.sum())

    def _quarantined(self) -> np.ndarray:
        return np.flatnonzero(self._bad).astype(np.int64)

    # ---- chunks: id ranges ------------------------------------------------------------------------
    @property
    def chunk_rows(self) -> int:
        return self._chunk

    def num_chunks(self) -> int:
        self._check_open()
        return -(-len(self._paths) // self._chunk)

    def chunk_of(self, ids) -> np.ndarray:
        self._check_open()
        ids = validate_ids(ids)
        self._check_present(ids)
        return ids // self._chunk

    def get_chunk(self, index: int) -> Chunk:
        """The live ids in ``[index * chunk_rows, (index + 1) * chunk_rows)``, read together; images
        that fail are quarantined and raise :class:`CorruptRecordError` (as other stores' chunks)."""
        self._check_open()
        n_chunks = self.num_chunks()
        if not 0 <= index < n_chunks:
            raise IndexError(f"{self.url}: chunk {index} out of range [0, {n_chunks})")
        lo = index * self._chunk
        ids = np.arange(lo, min(lo + self._chunk, len(self._paths)), dtype=np.int64)
        ids = ids[~self._bad[ids]]
        if not ids.size:
            return Chunk(ids, {k: np.zeros((0, *v.shape), v.dtype) for k, v in self.schema.items()})
        images, bad = self._read_decode(ids)
        if bad:
            self._fail(bad)
        return Chunk(ids, self._assemble(ids, images, None))

    def iter_chunks(self) -> Iterator[Chunk]:
        self._check_open()
        for i in range(self.num_chunks()):
            chunk = self.get_chunk(i)
            if chunk.ids.size:
                yield chunk

    # ---- writes: refused --------------------------------------------------------------------------
    def _put(self, ids: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        raise StorePermissionError(f"{self.url}: an adopted image folder is read-only")

    def _delete(self, ids: np.ndarray) -> None:
        raise StorePermissionError(f"{self.url}: an adopted image folder is read-only")

    def _flush(self) -> None:
        """Nothing is ever written."""

    def _close(self) -> None:
        self._runner.close()


# ---- the listing --------------------------------------------------------------------------------------
def _list(root: Path, text: str) -> tuple[list[str], list[str], np.ndarray]:
    """``(classes, paths, labels)`` by ImageFolder's rules (see the module docstring)."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as exc:
        raise StoreNotFoundError(f"{text}: cannot list {root}: {exc}") from None
    if not classes:
        raise StoreNotFoundError(f"{text}: {root} has no class sub-folders (ROOT/class_name/*.png is expected)")
    paths: list[str] = []
    counts: list[int] = []
    skipped = 0
    for name in classes:
        before = len(paths)
        for folder, _dirs, files in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(files):
                low = fname.lower()
                if low.endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(folder, fname))
                elif low.endswith(OTHER_IMAGE_EXTENSIONS):
                    skipped += 1
        counts.append(len(paths) - before)
        if counts[-1] == 0:
            log.warning("%s: class folder %r holds no PNG or JPEG image", text, name)
    if skipped:
        log.warning("%s: skipped %d image(s) that are neither PNG nor JPEG (ids follow the PNG and JPEG files "
                    "only, so they differ from ImageFolder's indices)", text, skipped)
    if not paths:
        raise StoreNotFoundError(f"{text}: no PNG or JPEG images under {root}'s class folders")
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return classes, paths, labels


def _digest(root: Path, classes: list[str], paths: list[str]) -> str:
    h = hashlib.sha256()
    h.update("\0".join(classes).encode("utf-8", "surrogateescape") + b"\1")
    start = len(str(root)) + 1
    for p in paths:
        h.update(p[start:].encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _infer_schema(paths: list[str], text: str) -> Schema:
    """The schema of the first image: ``(H, W)`` gray or ``(3, H, W)`` colour; y int64, task int16."""
    with open(paths[0], "rb") as fh:
        head = fh.read(1 << 16)
    try:
        if head[:8] == PNG_SIGNATURE:
            try:
                height, width, channels = png_header(head)
            except ImageDecodeError:  # a header past the first 64 KiB (large ancillary chunks)
                height, width, channels = png_header(Path(paths[0]).read_bytes())
        else:
            with open(paths[0], "rb") as fh:
                img = decode_image(fh.read())
            height, width = img.shape[:2]
            channels = 1 if img.ndim == 2 else img.shape[2]
    except ImageDecodeError as exc:
        raise StoreError(f"{text}: cannot infer a schema from {paths[0]}: {exc}; give the schema") from None
    x = (height, width) if channels in (1, 2) else (3, height, width)
    return Schema({"x": (x, "uint8"), "y": ((), "int64"), "task": ((), "int16")})


def _check_schema(schema: Schema, text: str) -> None:
    extra = [name for name in schema if name not in _FIELDS]
    missing = [name for name in _FIELDS if name not in schema]
    if extra or missing:
        raise SchemaError(f"{text}: an image folder supplies the fields x (the image), y (its class) and task only; "
                          + (f"the schema also has {extra}, which a folder of images cannot supply (a memory with "
                             f"stored logits, coreset weights or a saliency code cannot adopt a folder)"
                             if extra else f"the schema lacks {missing}"))
    x = schema["x"]
    if x.dtype != np.uint8 or not (len(x.shape) == 2 or (len(x.shape) == 3 and x.shape[0] in (1, 3, 4))):
        raise SchemaError(f"{text}: an image folder gives x as uint8 (H, W) or (C, H, W) with C = 1, 3 or 4; "
                          f"the schema asks for {x.dtype.name} {x.shape}")
    for name in ("y", "task"):
        if schema[name].shape != () or schema[name].dtype.kind not in "iu":
            raise SchemaError(f"{text}: {name} must be an integer scalar, the schema has "
                              f"{schema[name].dtype.name} {schema[name].shape}")


def _convert(img: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W)`` / ``(H, W, C)`` -> ``(H, W)`` (channels 0) or ``(channels, H, W)``, Pillow's way."""
    have = 1 if img.ndim == 2 else img.shape[2]
    if have in (1, 2):
        gray = img if img.ndim == 2 else img[:, :, 0]
        alpha = img[:, :, 1] if have == 2 else None
    else:
        gray = alpha = None
        alpha = img[:, :, 3] if have == 4 else None
    if channels in (0, 1):
        if gray is None:  # ITU-R 601-2 luma, with Pillow's integer rounding
            rgb = img[:, :, :3].astype(np.uint32)
            gray = ((rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 0x8000) >> 16).astype(np.uint8)
        return gray if channels == 0 else gray[None]
    rgb = np.repeat(gray[:, :, None], 3, axis=2) if gray is not None else img[:, :, :3]
    if channels == 3:
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    a = alpha if alpha is not None else np.full(img.shape[:2], 255, np.uint8)
    return np.ascontiguousarray(np.concatenate([rgb, a[:, :, None]], axis=2).transpose(2, 0, 1))
