"""``CarouselStorage``: a TorchRL replay-buffer ``Storage`` whose data lives in a carousel tier.

TorchRL's replay buffers split the job in three: a *writer* picks the positions new data goes to
(``RoundRobinWriter``: a ring over ``max_size`` positions), a *sampler* picks the positions a batch
is drawn from (``RandomSampler``, ``PrioritizedSampler``, ``SliceSampler``...), and a *storage*
holds what is at each position. :class:`CarouselStorage` is that storage, kept on flash (LMDB) or
disk (Zarr) through :mod:`storage_backends`, with CRC-checked records, crash-safe writes and only
the positions' index in RAM -- a buffer of millions of transitions that outlives the process::

    from torchrl.data import ReplayBuffer, RandomSampler, RoundRobinWriter
    from carousel.integrations.torchrl import CarouselStorage

    rb = ReplayBuffer(storage=CarouselStorage(1_000_000, "/var/lib/carousel/rb"),
                      sampler=RandomSampler(), writer=RoundRobinWriter(), batch_size=256)
    rb.extend(tensordict_batch)        # any TensorDict (nested keys too) or a plain tensor
    batch = rb.sample()                # a TensorDict of 256 transitions, read from the tier

Every leaf is one field of a fixed schema learned from the first write (shapes and dtypes of a
TensorDict's leaves, nested keys included); a position overwritten by the ring is replaced in place.
``state_dict()`` holds where the data is and how much of it there is, not the data: loading it into
a storage on the same folder (after a restart too) gives back the same buffer. Importing this
module lets TorchRL pick ``CarouselStorage.collate`` (the identity) as the buffer's default
``collate_fn``, as it does for its own tensor storages. Needs ``torchrl`` (``pip install
carousel[torchrl]``).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, is_tensor_collection
from torchrl.data.replay_buffers.storages import Storage

from storage_backends import SampleStore, open_store

__all__ = ["CarouselStorage"]

_META = "carousel-storage.json"


class CarouselStorage(Storage):
    """A TorchRL ``Storage`` of ``max_size`` positions kept in a carousel storage tier at ``path``.

    ``kind``: ``"lmdb"`` (flash; default) or ``"zarr"`` (disk; ``chunk`` rows per chunk);
    ``sync``: fsync every write (durable against power loss; off by default, as TorchRL's own
    storages are not durable at all); ``codec``: ``"zstd"`` compresses records; ``device``: where
    sampled batches go. An existing storage at ``path`` is reopened with its schema and length.
    """

    def __init__(self, max_size: int, path: str | os.PathLike[str], *, kind: str = "lmdb", sync: bool = False,
                 codec: str = "none", chunk: int = 64, device: str | torch.device = "cpu",
                 checkpointer: Any = None) -> None:
        super().__init__(max_size, checkpointer=checkpointer)
        if kind not in ("lmdb", "zarr"):
            raise ValueError(f"kind must be lmdb or zarr, got {kind!r}")
        self.path = Path(path)
        self.kind, self.sync, self.codec, self.chunk = kind, bool(sync), codec, int(chunk)
        self.device = torch.device(device)
        self._store: SampleStore | None = None
        self._keys: list[tuple[str, ...] | None] | None = None  # field f{i} <- leaf key (None: a plain tensor)
        self._len = 0
        self._reopen()

    # ---- the Storage contract ----------------------------------------------------------------
    def set(self, cursor: int | Sequence[int] | slice | torch.Tensor, data: Any, *, set_cursor: bool = True) -> None:
        """Write ``data`` (a batch, or one element when ``cursor`` is an int) at positions ``cursor``."""
        single = isinstance(cursor, (int, np.integer))
        ids = self._positions(cursor)
        if isinstance(data, list):
            data = torch.stack(data) if data and isinstance(data[0], torch.Tensor) else \
                TensorDict.maybe_dense_stack(data) if data else data
        leaves = self._leaves(data, single)
        if self._store is None:
            self._create(leaves)
        if set(leaves) != set(self._keys):
            raise ValueError(f"this storage holds the keys {self._keys}; the data has {sorted(leaves, key=str)}")
        fields = {f"f{i}": leaves[key] for i, key in enumerate(self._keys)}
        n = ids.size
        if any(v.shape[0] != n for v in fields.values()):
            raise ValueError(f"{n} positions but data of batch size {next(iter(fields.values())).shape[0]}")
        # A ring that wraps within one write names a position twice: the last value wins, as in a tensor.
        last = np.unique(ids[::-1], return_index=True)[1]
        keep = np.sort(n - 1 - last)
        self._store.put_many(ids[keep], {k: v[keep] for k, v in fields.items()})
        if set_cursor:  # only once the write went through: a refused one changes nothing
            self._set_last_cursor(cursor)
            self._len = min(self._len + n, self.max_size)
        self._save_meta()
        self._bump_mutation_revision()

    def get(self, index: int | Sequence[int] | slice | torch.Tensor) -> Any:
        """What is at ``index``: one element for an int, else a batch (a TensorDict or a tensor)."""
        if self._store is None:
            raise RuntimeError("Cannot get elements out of an empty CarouselStorage")
        single = isinstance(index, (int, np.integer))
        ids = self._positions(index, limit=self._len)
        if ids.size and (ids.min() < 0 or ids.max() >= self._len):
            raise IndexError(f"positions {ids[(ids < 0) | (ids >= self._len)][:5].tolist()} are outside "
                             f"the {self._len} stored")
        fields = self._store.get_many(ids)
        out = self._assemble({key: _tensor(fields[f"f{i}"]) for i, key in enumerate(self._keys)}, ids.size)
        return out[0] if single else out

    def __len__(self) -> int:
        return self._len

    def contains(self, item: Any) -> Any:
        if isinstance(item, (int, np.integer)):
            return 0 <= int(item) < self._len
        ids = torch.as_tensor(item)
        return (ids >= 0) & (ids < self._len)

    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "len": self._len, "max_size": self.max_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Point this storage at the data ``state_dict`` describes (on disk) and take its length."""
        if int(state_dict["max_size"]) != self.max_size:
            raise ValueError(f"the state is of a storage of {state_dict['max_size']} positions, this one has "
                             f"{self.max_size}")
        if Path(state_dict["path"]) != self.path or state_dict.get("kind", self.kind) != self.kind:
            self.close()
            self.path, self.kind = Path(state_dict["path"]), state_dict.get("kind", self.kind)
            self._reopen()
        if self._store is None and state_dict["len"]:
            raise FileNotFoundError(f"no CarouselStorage data at {self.path}")
        self._len = int(state_dict["len"])
        self._save_meta()
        self._bump_mutation_revision()

    def _empty(self) -> None:
        """Forget every position (the store is deleted; the next write starts a new one)."""
        self.close()
        shutil.rmtree(self.path / "store", ignore_errors=True)
        (self.path / _META).unlink(missing_ok=True)
        self._keys, self._len = None, 0
        self._bump_mutation_revision()

    def dumps(self, path: str | os.PathLike[str]) -> None:
        """The data is on disk already: flush it and write where it is to ``path``."""
        if self._store is not None:
            self._store.flush()
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "carousel-storage.json").write_text(json.dumps(self.state_dict()))

    def loads(self, path: str | os.PathLike[str]) -> None:
        self.load_state_dict(json.loads((Path(path) / "carousel-storage.json").read_text()))

    def __repr__(self) -> str:
        return f"CarouselStorage(max_size={self.max_size}, len={self._len}, {self.kind}:{self.path})"

    # ---- carousel's side ------------------------------------------------------------------------
    @property
    def store(self) -> SampleStore | None:
        """The tier's store (None until the first write)."""
        return self._store

    def flush(self) -> None:
        """Make every write durable (fsync), whatever ``sync`` says."""
        if self._store is not None:
            self._store.flush()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a CarouselStorage holds an open store (one writer per store); it cannot be pickled")

    # ---- internals ----------------------------------------------------------------------------------
    def _url(self, create: bool) -> str:
        """The store's URL; the codec and chunking are fixed when it is created (reopening reads them)."""
        url = f"{self.kind}://{self.path / 'store'}?sync={int(self.sync)}"
        if create:
            url += f"&codec={self.codec}" + (f"&chunk={self.chunk}" if self.kind == "zarr" else "")
        return url

    def _reopen(self) -> None:
        meta = self.path / _META
        if not meta.exists():
            return
        saved = json.loads(meta.read_text())
        self._keys = [tuple(k) if k is not None else None for k in saved["keys"]]
        self._len = min(int(saved["len"]), self.max_size)
        self._store = open_store(self._url(create=False))

    def _create(self, leaves: dict[Any, np.ndarray]) -> None:
        self._keys = sorted(leaves, key=lambda k: () if k is None else k)
        schema = {f"f{i}": (leaves[key].shape[1:], leaves[key].dtype.name) for i, key in enumerate(self._keys)}
        self.path.mkdir(parents=True, exist_ok=True)
        self._store = open_store(self._url(create=True), schema)
        self._save_meta()

    def _save_meta(self) -> None:
        if self._keys is None:
            return
        tmp = self.path / (_META + ".tmp")
        tmp.write_text(json.dumps({"keys": [list(k) if k is not None else None for k in self._keys],
                                   "len": self._len, "max_size": self.max_size}))
        os.replace(tmp, self.path / _META)

    def _positions(self, cursor: Any, limit: int | None = None) -> np.ndarray:
        if isinstance(cursor, slice):
            return np.arange(*cursor.indices(self.max_size if limit is None else limit), dtype=np.int64)
        if isinstance(cursor, torch.Tensor):
            cursor = cursor.detach().cpu().numpy()
        ids = np.asarray(cursor, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.max_size):
            raise IndexError(f"positions must lie in [0, {self.max_size}), got {ids.min()}..{ids.max()}")
        return ids

    @staticmethod
    def _leaves(data: Any, single: bool) -> dict[Any, np.ndarray]:
        """Leaf key -> numpy batch (a single element gets its batch axis)."""
        if is_tensor_collection(data):
            flat = {k if isinstance(k, tuple) else (k,): v for k, v in
                    data.items(include_nested=True, leaves_only=True)}
        elif isinstance(data, torch.Tensor):
            flat = {None: data}
        else:
            raise TypeError(f"CarouselStorage stores TensorDicts and tensors, got {type(data).__name__}")
        out = {}
        for key, value in flat.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"leaf {key} is a {type(value).__name__}; CarouselStorage stores tensors only")
            arr = value.detach().cpu().numpy()
            out[key] = arr[None] if single else arr
        return out

    def _assemble(self, leaves: dict[Any, torch.Tensor], n: int) -> Any:
        if list(leaves) == [None]:
            return leaves[None].to(self.device)
        td = TensorDict({}, batch_size=[n], device=self.device)
        for key, value in leaves.items():
            td.set(key, value.to(self.device))
        return td

    def _max_size_along_dim0(self, *, single_data: Any = None, batched_data: Any = None) -> int:
        return self.max_size

    @staticmethod
    def collate(batch: Any) -> Any:
        """The replay buffer's ``collate_fn`` for this storage: ``get`` returns ready batches."""
        return batch


def _tensor(arr: np.ndarray) -> torch.Tensor:
    # A store may hand back a read-only view of the bytes it read; a batch must be writable.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _teach_torchrl_the_default_collate() -> None:
    """TorchRL picks a buffer's default ``collate_fn`` from a fixed list of its own storage types
    and raises for any other, so ``ReplayBuffer(storage=CarouselStorage(...))`` would need
    ``collate_fn=CarouselStorage.collate``. Add this storage to that choice where TorchRL has the
    hook (checked for 0.14); elsewhere passing ``collate_fn`` still works."""
    for module in ("torchrl.data.replay_buffers.replay_buffers.base",
                   "torchrl.data.replay_buffers.replay_buffers.ensemble"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        original = getattr(mod, "_get_default_collate", None)
        if original is None or getattr(original, "_knows_carousel", False):
            continue

        def default_collate(storage: Any, _is_tensordict: bool = False, _original=original) -> Any:
            if isinstance(storage, CarouselStorage):
                return CarouselStorage.collate
            return _original(storage, _is_tensordict=_is_tensordict)

        default_collate._knows_carousel = True
        mod._get_default_collate = default_collate


_teach_torchrl_the_default_collate()

