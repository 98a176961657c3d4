"""Persistent stores for fixed-schema records, keyed by int64 id: the tiers below RAM.

>>> import tempfile, numpy as np
>>> from storage_backends import open_store
>>> root = tempfile.mkdtemp()
>>> schema = {"x": ((2, 2), "uint8"), "y": ((), "int64")}
>>> with open_store(f"lmdb://{root}/flash", schema) as store:
...     store.put_many(np.array([7, 3]), {"x": np.ones((2, 2, 2), np.uint8), "y": np.array([1, 0])})
...     store.get_many([3])["y"].tolist(), len(store)
([0], 2)
>>> with open_store(f"zarr://{root}/disk?chunk=8", schema) as store:  # same contract, another tier
...     store.put_many([1], {"x": np.zeros((1, 2, 2), np.uint8), "y": [5]})
...     store.contains([1, 2]).tolist()
[True, False]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .base import Chunk, SampleStore
from .errors import (
    CorruptRecordError,
    CorruptStoreError,
    InvalidURLError,
    MissingIdsError,
    SchemaError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
    StorePermissionError,
)
from .files_store import FilesStore
from .flat_store import FlatStore
from .lmdb_store import LMDBStore
from .schema import ALLOWED_DTYPES, FieldSpec, Schema
from .url import StoreURL, parse_url
from .zarr_store import ZarrStore

__all__ = [
    "ALLOWED_DTYPES", "Chunk", "CorruptRecordError", "CorruptStoreError", "FieldSpec", "FilesStore", "FlatStore",
    "InvalidURLError",
    "LMDBStore", "MissingIdsError", "SampleStore", "Schema", "SchemaError", "StoreClosedError", "StoreError",
    "StoreFullError", "StoreLockedError", "StoreNotFoundError", "StorePermissionError", "ZarrStore",
    "open_store", "register_backend", "backends",
]



def _open_files(url: StoreURL, schema: Schema | None) -> SampleStore:
    """``files://``: a :class:`FilesStore`, or with ``layout=imagefolder`` an
    ``image_folder.ImageFolderStore`` (imported only then)."""
    layout = url.params.get("layout", "records")
    if layout == "imagefolder":
        try:
            from .image_folder import ImageFolderStore
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.image_folder":
                raise
            raise InvalidURLError(f"{url.text}: layout=imagefolder needs storage_backends.image_folder, "
                                  "which this installation does not have") from None
        return ImageFolderStore(url, schema)
    if layout != "records":
        raise InvalidURLError(f"{url.text}: layout must be records or imagefolder, got {layout!r}")
    return FilesStore(url, schema)


_BACKENDS: dict[str, Callable[[StoreURL, Schema | None], SampleStore]] = {
    "lmdb": LMDBStore,
    "zarr": ZarrStore,
    "flat": FlatStore,
    "files": _open_files,
}


def register_backend(scheme: str, opener: Callable[[StoreURL, Schema | None], SampleStore]) -> None:
    """Make ``open_store("scheme://...")`` use ``opener(parsed_url, schema_or_None)``."""
    _BACKENDS[scheme.lower()] = opener


def backends() -> list[str]:
    """URL schemes :func:`open_store` understands."""
    return sorted(_BACKENDS)


def open_store(url: str, schema: Mapping[str, Any] | Schema | None = None) -> SampleStore:
    """Open (or, given a ``schema``, create) the store at ``url``.

    ``lmdb:///path?map_size=64MiB&max_size=0&sync=1&flush_s=1&mode=rw`` (flash tier),
    ``zarr:///path?chunk=64&codec=none|zstd&level=3&sync=1&readers=0&mode=rw`` (disk tier) or
    ``flat:///path?chunk=64&sync=1&mode=rw`` (fixed-size rows in one memory-mapped file: the
    fastest random reads, no compression) or
    ``files:///path?inflight=32&sync=1&codec=none|zstd&level=3&chunk=256&mode=rw`` (one file per
    record in sharded folders, ``inflight`` reads at once through aiofiles; ``chunk`` files per
    folder). ``files:///path?layout=imagefolder&mode=ro`` opens a folder of ``class_name/*.png``
    images read-only (``storage_backends.image_folder``).
    Reopening needs only the URL: the schema is stored inside. A ``schema`` that differs from the
    stored one raises :class:`SchemaError`; a missing store without a schema raises
    :class:`StoreNotFoundError`; a store another process writes raises :class:`StoreLockedError`.
    """
    parsed = parse_url(url)
    opener = _BACKENDS.get(parsed.scheme)
    if opener is None:
        raise InvalidURLError(f"{url!r}: unknown store scheme {parsed.scheme!r}; known: {backends()}")
    return opener(parsed, Schema(schema) if schema is not None else None)
