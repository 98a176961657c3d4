"""``CarouselStorage``: a TorchRL replay-buffer storage whose data lives in a carousel storage tier.

TorchRL's replay buffers split the job in three: a *writer* picks the positions new data goes to
(``RoundRobinWriter``: a ring over ``max_size`` positions), a *sampler* picks the positions a batch
is drawn from (``RandomSampler``, ``PrioritizedSampler``, ``SliceSampler``...), and a *storage*
holds what is at each position. :class:`CarouselStorage` is that storage, kept on flash (LMDB),
disk (Zarr) or in one memory-mapped file of fixed-size rows (flat: the fastest random reads, for
samplers that draw every batch at random) through :mod:`storage_backends`, with CRC-checked
records, crash-safe writes and only
the positions' index in RAM -- a buffer of millions of transitions that outlives the process::

    from torchrl.data import ReplayBuffer, RandomSampler, RoundRobinWriter
    from carousel.integrations.torchrl import CarouselStorage

    rb = ReplayBuffer(storage=CarouselStorage(1_000_000, "/var/lib/carousel/rb"),
                      sampler=RandomSampler(), writer=RoundRobinWriter(), batch_size=256)
    rb.extend(tensordict_batch)        # any TensorDict (nested keys too), tensorclass, tensor or pytree
    batch = rb.sample()                # a TensorDict of 256 transitions, read from the tier

It subclasses TorchRL's ``TensorStorage``, so every feature TorchRL grants its tensor storages
works: the identity default ``collate_fn`` (wherever TorchRL picks one), ``Sequence`` sample units,
``ConsumingSampler``, ``update_if_present``, ``TensorDictMaxValueWriter``, ``SliceSampler`` over
``ndim=2`` (``[time, envs]``) layouts, ``PrioritizedSampler`` (whose test skips, saying why, where
TorchRL's C++ extension does not load beside the installed torch).

Supported, and tested side by side with ``LazyTensorStorage`` (``tests/integrations/test_torchrl_contract.py``;
files, locks and processes in ``test_torchrl_process.py``):

- data: TensorDicts (nested keys, extra batch dims such as ``[n, 3]``), ``@tensorclass`` (comes
  back as its class), plain tensors, pytrees (dicts/tuples/lists of tensors); dtypes bool,
  (u)int8..int64, float16/32/64 and bfloat16; non-tensor leaves (``set_non_tensor``, ``str``
  fields) kept per position as JSON (str, numbers, bools, None, lists and dicts of those: never
  pickled, so other objects are refused, before anything is stored, and tuples come back as lists); a key added after the first write (the store is rewritten once with
  the new field, zeros where it was never written, as TorchRL's storages do);
- indices: ints (negative ones count from the end), slices, integer arrays of any shape (the
  batch takes their shape), boolean masks, tuples over ``ndim > 1`` storages, nested keys (a column);
- in place: ``rb[:]`` is a TensorDict whose ``set_``/``set_at_``/``update_``/item assignment write
  through to the tier, so ``rb.set_``, ``rb.set_at_``, ``rb.update_`` and ``rb[i, j] = ...`` work;
- persistence: a storage pickles as its folder (``torch.save(rb)``, ``copy.deepcopy``, worker
  processes) and reopens there; ``state_dict()`` has TorchRL's tensor-storage form (``_storage``,
  ``initialized``, ``_len``), so state dicts move between this storage and
  ``LazyTensorStorage``/``LazyMemmapStorage`` both ways (``state_dict_data=False`` keeps only where
  the data is, for buffers too large to copy); ``dumps``/``loads`` snapshot the data (a copy
  that later writes do not touch) with the default checkpointer, or run any ``checkpointer=`` written
  for tensor storages (``TensorStorageCheckpointer``, ``FlatStorageCheckpointer``...) on a RAM copy
  (a ``ReplayBuffer`` gives its storage the buffer's own ``checkpointer=``, as TorchRL does);
- failures: a failed ``load_state_dict``/``loads`` leaves the storage as it was (the new data is
  written to a new generation folder, made current by one rename); a collected storage lets go
  of its store and writer lock.

Not supported:

- writing from two processes, by design. A store has one writer process (its ``flock``, which
  keeps it crash-safe), so a copy of the storage in another process (a worker given the buffer,
  a forked child) reads and samples -- the length is shared with the writer as TorchRL shares it
  -- but its writes (and emptying or loading it) raise :class:`~storage_backends.StoreLockedError`
  before the writer's cursor moves (except ``rb.empty()``, where TorchRL resets the writer's
  shared cursor before it asks the storage: do not call it there); a Zarr or flat store cannot even be read by another process while its writer holds
  it (use ``kind="lmdb"``, whose readers never block the writer). Hence no ``shared_init`` either.
- ragged data: a lazy stack of TensorDicts whose leaves differ in shape has no fixed-size record.
- reaching into ``storage._storage`` (None here: the data is not a TensorDict in RAM). TorchRL
  code that does falls back to ``storage[...]`` (``SliceSampler``, staleness), except
  ``TensorDictMap``'s automatic ``out_keys`` (pass ``out_keys=``) and ``Sequence``'s check that a
  tensor storage holds a TensorDict.
- in-place ops on a leaf of ``rb[:]`` (``rb[:]["obs"].zero_()``): ``rb[:]`` is a copy that writes
  back its own in-place methods, not its tensors' (use ``rb.set_``/``set_at_``/``update_``).
- ``compilable=True``, and save/load hooks on the default checkpointer (pass ``checkpointer=``).

Costs: ``state_dict()``, a tensor-storage checkpointer and ``flatten()`` copy the data into RAM;
a key added after the first write rewrites the store once; ``storage[:]`` reads every position.

Needs ``torchrl`` (``pip install carousel[torchrl]``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import weakref
from collections.abc import Iterator
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, is_tensor_collection, unravel_key
from torch.utils._pytree import tree_map
from torchrl.data.replay_buffers.checkpointers import StorageCheckpointerBase, TensorStorageCheckpointer
from torchrl.data.replay_buffers.storages import LazyTensorStorage, Storage, TensorStorage

from storage_backends import MissingIdsError, StoreLockedError

from . import torchrl_tier as tier
from .torchrl_layout import Layout, split

__all__ = ["CarouselStorage", "CarouselStorageCheckpointer"]

_META = "carousel-storage.json"
_COPY_ROWS = 4096  # positions per transaction when a store is copied (bounds the RAM a copy takes)


class CarouselStorageCheckpointer(StorageCheckpointerBase):
    """The default checkpointer of :class:`CarouselStorage`: ``dumps(path)`` writes a snapshot
    (a CarouselStorage folder holding a copy of the data; dumping into the storage's own folder
    only flushes it), ``loads(path)`` copies one back -- or a dump of one of TorchRL's tensor
    storages (``LazyMemmapStorage``...), migrating it in. Save and load hooks need tensors in RAM:
    pass ``checkpointer=TensorStorageCheckpointer()`` (or another tensor-storage checkpointer) to
    the storage for those.

    Examples:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> storage = CarouselStorage(10, root / "rb")  # its checkpointer: this class
        >>> storage.set(torch.arange(3), torch.arange(3.0))
        >>> storage.dumps(root / "snapshot")
        >>> storage.set(torch.arange(3), torch.zeros(3))  # later writes do not reach the snapshot
        >>> storage.loads(root / "snapshot")
        >>> storage.get(torch.arange(3)).tolist()
        [0.0, 1.0, 2.0]
        >>> storage.close()
    """

    def register_save_hook(self, hook: Any) -> None:
        raise NotImplementedError("CarouselStorageCheckpointer copies stores, not tensors: pass "
                                  "checkpointer=TensorStorageCheckpointer() to the storage to use save hooks")

    def register_load_hook(self, hook: Any) -> None:
        raise NotImplementedError("CarouselStorageCheckpointer copies stores, not tensors: pass "
                                  "checkpointer=TensorStorageCheckpointer() to the storage to use load hooks")

    def dumps(self, storage: CarouselStorage, path: str | os.PathLike[str]) -> None:
        storage._snapshot_to(Path(path))

    def loads(self, storage: CarouselStorage, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not (path / _META).exists() and (path / "storage_metadata.json").exists():
            # A dump of one of TorchRL's tensor storages: migrate it in (through RAM).
            staging = LazyTensorStorage(storage._requested_max_size, ndim=storage.ndim)
            TensorStorageCheckpointer().loads(staging, path)
            storage._replace_with(staging)
            return
        storage._restore_from(path)


class CarouselStorage(TensorStorage):
    """A TorchRL storage of ``max_size`` positions kept in a carousel storage tier in folder ``path``.

    Args:
        max_size: positions (elements, for ``ndim > 1``: ``max_size`` counts every element of the
            first ``ndim`` dims, as in ``LazyTensorStorage``).
        path: the folder; an existing storage there is reopened with its layout and length.
        kind: ``"lmdb"`` (flash; default), ``"zarr"`` (disk; ``chunk`` rows per chunk) or
            ``"flat"`` (one memory-mapped file: a random batch is one gather, ~2.5x faster to
            sample than LMDB's per-key reads; no ``codec``; one process, as Zarr).
        sync: fsync every write (durable against power loss; off by default, as TorchRL's own
            storages are not durable at all).
        codec: ``"zstd"`` compresses records (``"none"`` by default).
        device: where read batches go.
        ndim: the dims TorchRL's samplers index (``2`` for ``[time, envs]`` data).
        checkpointer: what ``dumps``/``loads`` run (default :class:`CarouselStorageCheckpointer`).
        state_dict_data: whether ``state_dict()`` holds the data (TorchRL's form) or only where it is.

    Raises:
        ValueError: an unknown ``kind``, or a ``codec`` for a flat store.

    Examples:
        >>> import tempfile, torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import ReplayBuffer
        >>> rb = ReplayBuffer(storage=CarouselStorage(100, tempfile.mkdtemp()), batch_size=4)
        >>> rb.extend(TensorDict({"obs": torch.arange(10.0)}, batch_size=[10])).tolist()  # the positions written
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        >>> len(rb), rb.sample()["obs"].shape, rb[-1]["obs"].item()
        (10, torch.Size([4]), 9.0)
        >>> rb.storage.close()
    """

    _default_checkpointer = CarouselStorageCheckpointer

    def __init__(self, max_size: int, path: str | os.PathLike[str], *, kind: str = "lmdb", sync: bool = False,
                 codec: str = "none", chunk: int = 64, device: str | torch.device = "cpu", ndim: int = 1,
                 checkpointer: StorageCheckpointerBase | None = None, state_dict_data: bool = True) -> None:
        if kind not in ("lmdb", "zarr", "flat"):
            raise ValueError(f"kind must be lmdb, zarr or flat, got {kind!r}")
        if kind == "flat" and codec != "none":
            raise ValueError(f"a flat store keeps fixed-size rows: codec must be 'none', got {codec!r}")
        super().__init__(storage=None, max_size=max_size, device=device, ndim=ndim)
        self.checkpointer = checkpointer
        self.path = Path(path)
        self.kind, self.sync, self.codec, self.chunk = kind, bool(sync), codec, int(chunk)
        self.state_dict_data = bool(state_dict_data)
        self._requested_max_size = int(max_size)
        self._layout: Layout | None = None
        self._gen: str | None = None  # the generation folder (under path) holding the store
        self._handle: tier.TierHandle | None = None
        self._pid: int | None = None
        self._finalizer: weakref.finalize | None = None
        meta = self._read_meta()
        if meta is not None:
            self._take_meta(meta, take_len=True)

    # ---- the Storage contract ----------------------------------------------------------------
    def set(self, cursor: Any, data: Any, *, set_cursor: bool = True) -> None:
        """Write ``data`` (a batch, or one element when ``cursor`` is an int) at positions ``cursor``."""
        self._set(cursor, data, set_cursor=set_cursor)
        self._bump_mutation_revision()

    def _set(self, cursor: Any, data: Any, *, set_cursor: bool) -> None:
        """``set`` without bumping the mutation revision (a write-back, whose caller bumps)."""
        if isinstance(cursor, tuple):  # coordinates over ndim > 1 dims: read, modify, write the rows
            self._set_coordinates(cursor, data)
            if set_cursor:
                self._set_last_cursor(cursor)
            return
        if isinstance(data, list):
            data = _stack(data)
        single = _is_scalar(cursor)
        leaves = split(data, single)
        layout = leaves.layout if self._layout is None else self._layout.merged(leaves.layout)
        cap0 = self._capacity0(layout)
        ids = _positions(cursor, cap0, "storage capacity").reshape(-1)
        fields = layout.fields_of(leaves)
        n = ids.size
        for (name, value), f in zip(fields.items(), layout.fields):
            if value is not None and value.shape != (n, *f.shape):
                if value.shape[1:] != f.shape:
                    raise ValueError(f"leaf {f.key!r}: records of shape {f.shape} in this storage, the data's are "
                                     f"{value.shape[1:]}")
                raise ValueError(f"{n} positions but data of batch size {value.shape[0]}")
        # Validated: now act. A layout grown by a new key rewrites the store once.
        if self._layout is None:
            self._create(layout)
        elif layout is not self._layout:
            self._grow(layout)
        handle = self._writable()
        # A ring that wraps within one write names a position twice: the last value wins, as in a tensor.
        if n < 2 or bool((ids[1:] > ids[:-1]).all()):  # the usual write, ascending positions: no repeat
            keep = slice(None)
        else:
            last = np.unique(ids[::-1], return_index=True)[1]
            keep = np.sort(n - 1 - last)
        ids_k = ids[keep]
        missing = [name for name, v in fields.items() if v is None]
        if missing:  # leaves this data lacks keep their stored values (zeros where none were written)
            old = self._read_fields(handle, ids_k)
            fields = {name: (old[name] if v is None else v[keep]) for name, v in fields.items()}
        else:
            fields = {name: v[keep] for name, v in fields.items()}
        if leaves.objects:
            tier.check_objects(leaves.objects)  # refused before anything is stored
        handle.store.put_many(ids_k, fields)
        if leaves.objects:
            rows = handle.get_objects(ids_k)
            for j, pos in enumerate(range(n) if isinstance(keep, slice) else keep.tolist()):
                rows[j] = dict(rows[j] or {})
                rows[j].update({key: values[pos] for key, values in leaves.objects.items()})
            handle.put_objects(ids_k, rows)
        if set_cursor:  # only once the write went through: a refused one changes nothing
            self._set_last_cursor(cursor)
            self._len = min(self._len + n * math.prod(self._lead_shape()), self.max_size)
        # No meta write here: reopening counts the stored positions, which a crash cannot leave
        # behind the data (a meta file rewritten per write cost ~1 ms, more than the write).

    def get(self, index: Any) -> Any:
        """What is at ``index``: one element for an int, else a batch shaped like the index.

        ``index`` may be an int (negative: from the end), a slice, an integer array or tensor of
        any shape, a boolean mask, a tuple of those over ``ndim > 1`` dims, or a nested key (that
        column of every stored position). Raises ``IndexError`` for a position not stored.
        """
        if not self.initialized:
            raise RuntimeError("Cannot get elements out of an empty CarouselStorage")
        if isinstance(index, str) or (isinstance(index, tuple) and index and _is_key(index)):
            return self.get(slice(None)).get(index)
        len0 = self._len_along_dim0
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        if first is Ellipsis:
            first = slice(None)
        if isinstance(first, (torch.Tensor, np.ndarray)) and first.dtype in (torch.bool, np.bool_):
            mask = np.asarray(first.detach().cpu() if isinstance(first, torch.Tensor) else first)
            coords = np.nonzero(mask)  # a mask over k dims is k coordinate arrays
            first, rest = coords[0], (*map(torch.from_numpy, coords[1:]), *rest)
        if all(r == slice(None) for r in rest if isinstance(r, slice)) and all(isinstance(r, slice) for r in rest):
            rest = ()  # storage[:, :] of an ndim > 1 storage is storage[:]
        if isinstance(first, slice):
            ids = np.arange(*first.indices(len0), dtype=np.int64)
            out = self._read(ids, view=not rest)
            return self._layout.wrap(_index(out, (slice(None), *rest)) if rest else out)
        ids = _positions(first, len0, "stored positions")
        if ids.ndim == 1 and not rest:
            # A sampler's batch of positions: read in its order, repeats and all (a store returns
            # a repeated id repeatedly), and assembled once -- no dedup, no second gather of the
            # assembled batch (that indexing cost ~85 us of a 256-row sample's ~500).
            return self._layout.wrap(self._read(ids, view=False))
        flat = ids.reshape(-1)
        uniq, inv = np.unique(flat, return_inverse=True)
        out = self._read(uniq, view=False)
        local = int(inv[0]) if _is_scalar(first) else torch.from_numpy(inv.reshape(ids.shape))
        return self._layout.wrap(_index(out, (local, *rest)))

    def __len__(self) -> int:
        return self._len

    def contains(self, item: Any) -> Any:
        # docstring inherited
        if not self.initialized:
            return torch.zeros(torch.as_tensor(item).shape, dtype=torch.bool) if not _is_scalar(item) else False
        if _is_scalar(item):
            item = int(item)
            return 0 <= (item + self._len_along_dim0 if item < 0 else item) < self._len_along_dim0
        return super().contains(torch.as_tensor(item))

    def state_dict(self) -> dict[str, Any]:
        """TorchRL's tensor-storage state (``_storage``: the data, read into RAM; ``initialized``;
        ``_len``), loadable by ``LazyTensorStorage``/``LazyMemmapStorage``, plus ``carousel``: the
        folder and layout. With ``state_dict_data=False``, ``_storage`` is left out."""
        meta = {**self._meta(), "path": str(self.path)}
        if not self.state_dict_data:
            return {"initialized": self.initialized, "_len": self._len, "carousel": meta}
        if not self.initialized:
            return {"_storage": {}, "initialized": False, "_len": 0, "carousel": meta}
        return {**self._to_tensor_storage().state_dict(), "carousel": meta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the state ``state_dict`` describes: TorchRL's tensor-storage form (from this class or
        ``LazyTensorStorage``/``LazyMemmapStorage``; the data is copied in) or ``state_dict_data=False``'s
        (the data is copied from that folder, or taken as it is when it is this storage's own).
        Raises ``ValueError`` for more positions than this storage has; a refused or failed load
        changes nothing."""
        self._check_writer()
        if "_storage" in state_dict:
            if not state_dict["initialized"]:
                self._empty()
                return
            staging = LazyTensorStorage(self._requested_max_size, ndim=self.ndim)
            shape = _state_shape(state_dict["_storage"])
            cap0 = -(self._requested_max_size // -math.prod(shape[1:self.ndim]))
            if shape[0] > cap0:
                raise ValueError(f"the state holds {shape[0]} positions along dim 0; this storage has {cap0} positions")
            staging.load_state_dict(state_dict)
            self._replace_with(staging)
            self._bump_mutation_revision()
            return
        meta = state_dict["carousel"]
        if int(meta["max_size"]) != self.max_size:
            raise ValueError(f"the state is of a storage of {meta['max_size']} positions, this one has "
                             f"{self.max_size}")
        src = Path(meta["path"])
        if src.resolve() != self.path.resolve():
            self._restore_from(src)
        elif self._read_meta() is None and state_dict["_len"]:
            raise FileNotFoundError(f"no CarouselStorage data at {self.path}")
        self._len = int(state_dict["_len"])
        self._save_meta()
        self._bump_mutation_revision()

    def _empty(self) -> None:
        """Forget every position (the store is deleted; the next write may start another layout)."""
        self._check_writer()
        gen = self._gen
        self._drop_handle()
        if gen is not None:
            self._delete_gen(gen)
        (self.path / _META).unlink(missing_ok=True)
        self._layout, self._gen, self.initialized = None, None, False
        self._len = 0
        self._bump_mutation_revision()

    def dumps(self, path: str | os.PathLike[str]) -> None:
        """Snapshot the data to ``path`` with this storage's checkpointer."""
        if isinstance(self.checkpointer, CarouselStorageCheckpointer):
            self.checkpointer.dumps(self, path)
        else:  # a checkpointer written for tensor storages: give it one, holding a RAM copy
            self.checkpointer.dumps(self._to_tensor_storage(), path)

    def loads(self, path: str | os.PathLike[str]) -> None:
        """Replace the data by the snapshot at ``path``; a failed load changes nothing."""
        if isinstance(self.checkpointer, CarouselStorageCheckpointer):
            self.checkpointer.loads(self, path)
        else:
            staging = LazyTensorStorage(self._requested_max_size, ndim=self.ndim)
            self.checkpointer.loads(staging, Path(path))
            self._replace_with(staging)
        self._bump_mutation_revision()

    def flatten(self) -> Storage:
        """This storage over its first ``ndim`` dims flattened: itself for ``ndim == 1``, else a
        ``TensorStorage`` holding a RAM copy."""
        if self.ndim == 1:
            return self
        return TensorStorage(tree_map(lambda x: x.flatten(0, self.ndim - 1), self.get(slice(None))))

    def __repr__(self) -> str:
        return f"CarouselStorage(max_size={self.max_size}, len={len(self)}, {self.kind}:{self.path})"

    # ---- carousel's side ------------------------------------------------------------------------
    @property
    def store(self) -> Any:
        """The tier's store (None until the first write)."""
        handle = self._tier()
        return None if handle is None else handle.store

    def flush(self) -> None:
        """Make every write durable (fsync), whatever ``sync`` says."""
        handle = self._tier()
        if handle is not None and handle.writable:
            handle.flush()
            self._save_meta(durable=True)

    def close(self) -> None:
        """Let go of the store (the last copy of this storage in the process closes it)."""
        if self._handle is not None and self._pid == os.getpid() and self._handle.writable:
            self._save_meta()  # the length and cursor as of now, for a reader of the folder
        self._drop_handle()

    @staticmethod
    def collate(batch: Any) -> Any:
        """The identity: ``get`` returns ready batches (TorchRL picks it by default for tensor storages)."""
        return batch

    def __getstate__(self) -> dict[str, Any]:
        # A storage pickles as its folder: the handle stays in this process, the copy reopens.
        state = Storage.__getstate__(self)
        if get_spawning_popen() is None:  # a snapshot (torch.save, deepcopy); else the length stays shared
            state["len__context"] = self._len
            state.pop("_len_value", None)
        for name in ("_handle", "_pid", "_finalizer"):
            state[name] = None
        return state

    # ---- internals: the folder -------------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / _META).read_text())
        except FileNotFoundError:
            return None

    def _take_meta(self, meta: dict[str, Any], *, take_len: bool) -> None:
        if "layout" in meta:
            self._layout, self._gen = Layout.from_json(meta["layout"]), meta["gen"]
            self.kind = meta.get("kind", self.kind)
        else:  # written before layouts: the store is path/store, the keys name the fields
            self._gen = "."
            handle = self._tier()
            self._layout = Layout.from_legacy_keys(meta["keys"], handle.store.schema)
        self.initialized = True
        self._fix_max_size()
        if take_len:  # what the store holds (see set); the meta's length is only as of its last write
            self._len = min(len(self._tier().store) * math.prod(self._lead_shape()), self.max_size)
            if meta.get("last_cursor") is not None:
                self._set_last_cursor(int(meta["last_cursor"]))

    def _meta(self) -> dict[str, Any]:
        return {"format": 2, "gen": self._gen, "kind": self.kind, "len": self._len, "max_size": self.max_size,
                "ndim": self.ndim, "layout": None if self._layout is None else self._layout.to_json(),
                "last_cursor": self._last_cursor_index}

    def _save_meta(self, meta: dict[str, Any] | None = None, *, durable: bool | None = None) -> None:
        """Write the meta file (renamed into place: a crash leaves the old one or the new one).
        Every write updates the length here, so it is fsynced only where it commits a generation
        or where ``sync`` asks every write to be durable; else it costs a rename, not two fsyncs."""
        meta = self._meta() if meta is None else meta
        if meta["layout"] is None:
            return
        _atomic_write(self.path / _META, json.dumps(meta), durable=self.sync if durable is None else durable)

    def _gen_dir(self, gen: str, root: Path | None = None) -> Path:
        return (self.path if root is None else root) / gen

    def _urls(self, folder: Path, create: bool) -> tuple[str, str]:
        """The store's URL (writer) and its read-only URL; the codec and chunking are fixed when it is
        created (reopening reads them)."""
        base = f"{self.kind}://{folder / 'store'}?sync={int(self.sync)}"
        if create:
            base += ("" if self.kind == "flat" else f"&codec={self.codec}") + (
                f"&chunk={self.chunk}" if self.kind in ("zarr", "flat") else "")
        return base, f"{self.kind}://{folder / 'store'}?mode=ro"

    def _delete_gen(self, gen: str, root: Path | None = None) -> None:
        folder = self._gen_dir(gen, root)
        if gen == ".":  # the pre-layout folder: the store and object table sit beside the meta
            shutil.rmtree(folder / "store", ignore_errors=True)
            shutil.rmtree(folder / "objects", ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- internals: handles ---------------------------------------------------------------------
    def _tier(self) -> tier.TierHandle | None:
        """This process's handle (opened on first use, and again in a child process)."""
        if self._handle is not None and self._pid == os.getpid():
            return self._handle
        if self._handle is not None:  # a forked child holds the parent's: never use or close it
            if self._finalizer is not None:
                self._finalizer.detach()
            self._handle = self._finalizer = None
            meta = self._read_meta()  # the writer may have grown the layout since
            if meta is not None and "layout" in meta:
                self._take_meta(meta, take_len=False)
        if self._gen is None:
            return None
        folder = self._gen_dir(self._gen)
        rw, ro = self._urls(folder, create=False)
        handle = tier.acquire(folder, rw, ro, None)
        self._attach(handle)
        if handle.writable:
            self._remove_orphans()
        return handle

    def _remove_orphans(self) -> None:
        """Delete generation folders a crash left behind (written, never made current by the meta
        rename). Only the current generation's writer does this: no other process writes here."""
        for folder in self.path.glob("gen-*"):
            if folder.name != self._gen and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def _attach(self, handle: tier.TierHandle) -> None:
        self._handle, self._pid = handle, os.getpid()
        # A collected storage lets go of its store (and the writer lock with it).
        self._finalizer = weakref.finalize(self, tier.release, handle)

    def _drop_handle(self) -> None:
        if self._finalizer is not None and self._pid == os.getpid():
            self._finalizer()
        elif self._finalizer is not None:
            self._finalizer.detach()
        self._handle = self._finalizer = self._pid = None

    def _check_writer(self) -> None:
        """Refuse (``StoreLockedError``) to replace or delete the data from a read-only copy: it
        would pull the folder from under the process that writes it."""
        if self._gen is not None:
            self._writable()

    def _writable(self) -> tier.TierHandle:
        handle = self._tier()
        if not handle.writable:
            raise StoreLockedError(
                f"{self.path}: another process writes this CarouselStorage, so this one (pid {os.getpid()}) "
                "opened it read-only; one writer per store: write from the process that holds it")
        return handle

    # ---- internals: layouts and generations -------------------------------------------------------
    def _lead_shape(self, layout: Layout | None = None) -> tuple[int, ...]:
        """The dims after dim 0 that count as positions (``ndim > 1``)."""
        layout = self._layout if layout is None else layout
        if self.ndim == 1 or layout is None:
            return ()
        inner = layout.batch_shape if layout.kind == "td" else layout.fields[0].shape
        if len(inner) < self.ndim - 1:
            raise ValueError(f"a storage of ndim={self.ndim} needs data of {self.ndim} batch dims; got "
                             f"{layout.describe()}")
        return tuple(inner[: self.ndim - 1])

    def _capacity0(self, layout: Layout | None) -> int:
        """Positions along dim 0: ``max_size`` over the product of the other indexed dims."""
        return -(self._requested_max_size // -math.prod(self._lead_shape(layout)))

    def _fix_max_size(self) -> None:
        # As LazyTensorStorage does for ndim > 1: the capacity rounds up to whole dim-0 positions.
        if self.ndim > 1:
            self.max_size = self._capacity0(self._layout) * math.prod(self._lead_shape())

    def _max_size_along_dim0(self, *, single_data: Any = None, batched_data: Any = None) -> int:
        # docstring inherited
        if (single_data is not None or batched_data is not None) and self._gen is not None:
            # TorchRL's writers ask this just before they move their (process-shared) cursor and
            # write: a copy that cannot write here must refuse now, or the cursor skips positions.
            self._writable()
        return super()._max_size_along_dim0(single_data=single_data, batched_data=batched_data)

    @property
    def _total_shape(self) -> torch.Size | None:
        if self._layout is None:
            return None
        return torch.Size([self._capacity0(self._layout), *self._lead_shape()])

    def _create(self, layout: Layout) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        gen = self._next_gen()
        folder = self._gen_dir(gen)
        rw, ro = self._urls(folder, create=True)
        handle = tier.acquire(folder, rw, None, layout.schema())
        self._layout, self._gen, self.initialized = layout, gen, True
        self._attach(handle)
        self._fix_max_size()
        self._save_meta(durable=True)  # the generation's first commit

    def _next_gen(self, root: Path | None = None) -> str:
        root = self.path if root is None else root
        taken = [int(p.name[4:]) for p in root.glob("gen-*") if p.name[4:].isdigit()]
        return f"gen-{max(taken, default=-1) + 1}"

    def _write_gen(self, root: Path, layout: Layout, rows: Iterator[tuple[np.ndarray, dict, list | None]]) -> str:
        """A new generation folder under ``root`` holding ``rows`` (ids, fields, object rows); removed
        again if anything fails, so the caller's current generation is untouched."""
        root.mkdir(parents=True, exist_ok=True)
        gen = self._next_gen(root)
        folder = self._gen_dir(gen, root)
        rw, _ = self._urls(folder, create=True)
        try:
            handle = tier.acquire(folder, rw, None, layout.schema())
            try:
                for ids, fields, objects in rows:
                    handle.store.put_many(ids, fields)
                    if objects is not None and any(o is not None for o in objects):
                        keep = [i for i, o in enumerate(objects) if o is not None]
                        handle.put_objects(ids[keep], [objects[i] for i in keep])
                handle.flush()
            finally:
                tier.release(handle)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return gen

    def _switch(self, gen: str, layout: Layout, length: int, last_cursor: int | None) -> None:
        """Make generation ``gen`` current (the meta file's rename is the commit) and drop the old one."""
        old = self._gen
        meta = {**self._meta(), "gen": gen, "layout": layout.to_json(), "len": length, "last_cursor": last_cursor}
        self._save_meta(meta, durable=True)
        self._drop_handle()
        if old is not None and old != gen:
            self._delete_gen(old)
        self._layout, self._gen, self.initialized = layout, gen, True
        self._fix_max_size()
        self._len = min(length, self.max_size)
        self._set_last_cursor(last_cursor)
        self._tier()

    def _copy_rows(self, handle: tier.TierHandle, layout: Layout, grow_to: Layout | None = None
                   ) -> Iterator[tuple[np.ndarray, dict, list | None]]:
        """Every stored position of ``handle``, ``_COPY_ROWS`` at a time (new fields of ``grow_to`` zero)."""
        ids = np.sort(handle.store.ids())
        target = layout if grow_to is None else grow_to
        for start in range(0, ids.size, _COPY_ROWS):
            chunk = ids[start:start + _COPY_ROWS]
            old = handle.store.get_many(chunk)
            fields = {}
            for i, f in enumerate(target.fields):
                j = layout.index_of(f.key)
                fields[f"f{i}"] = old[f"f{j}"] if j is not None else np.zeros((chunk.size, *f.shape), f.store_dtype)
            objects = handle.get_objects(chunk) if layout.objects else None
            yield chunk, fields, objects

    def _grow(self, layout: Layout) -> None:
        handle = self._writable()
        if layout.fields == self._layout.fields:  # only a new non-tensor leaf: the records stay as they are
            self._layout = layout
            self._save_meta(durable=True)
            return
        gen = self._write_gen(self.path, layout, self._copy_rows(handle, self._layout, layout))
        self._switch(gen, layout, self._len, self._last_cursor_index)

    def _snapshot_to(self, dest: Path) -> None:
        if dest.exists() and dest.resolve() == self.path.resolve():
            self.flush()  # the data is in this folder already
            return
        if not self.initialized:
            raise RuntimeError("Cannot save a non-initialized storage.")
        handle = self._tier()
        old = json.loads((dest / _META).read_text()) if (dest / _META).exists() else None
        gen = self._write_gen(dest, self._layout, self._copy_rows(handle, self._layout))
        _atomic_write(dest / _META, json.dumps({**self._meta(), "gen": gen}))
        if old is not None and old.get("gen") not in (None, gen):
            self._delete_gen(old["gen"], dest)

    def _restore_from(self, src: Path) -> None:
        self._check_writer()
        meta = json.loads((src / _META).read_text())
        if "path" in meta and "layout" not in meta:  # a dump that only named its folder
            src, meta = Path(meta["path"]), json.loads((Path(meta["path"]) / _META).read_text())
        source = CarouselStorage(meta["max_size"], src, ndim=meta.get("ndim", 1))
        try:
            layout = source._layout
            if layout is None:
                raise ValueError(f"{src}: an empty CarouselStorage cannot be loaded")
            if source._capacity0(layout) > self._capacity0(layout):
                raise ValueError(f"the snapshot at {src} has {source._capacity0(layout)} positions along dim 0; "
                                 f"this storage has {self._capacity0(layout)}")
            gen = self._write_gen(self.path, layout, self._copy_rows(source._tier(), layout))
            self._switch(gen, layout, int(meta["len"]), meta.get("last_cursor"))
        finally:
            source.close()

    def _to_tensor_storage(self) -> TensorStorage:
        """A ``TensorStorage`` holding a RAM copy of every position (zeros where none was written),
        with this storage's length and cursor: what TorchRL's state dicts and checkpointers expect."""
        cap0 = self._capacity0(self._layout)
        handle = self._tier()
        full = self._layout.assemble(
            {f"f{i}": np.zeros((cap0, *f.shape), f.store_dtype) for i, f in enumerate(self._layout.fields)},
            [None] * cap0 if self._layout.objects else None, cap0, torch.device("cpu"))
        ids = np.sort(handle.store.ids())
        if ids.size:
            rows = self._read(ids, view=False, device=torch.device("cpu"))
            if is_tensor_collection(full):
                full[torch.from_numpy(ids)] = rows
            else:
                tree_map(lambda dst, src: dst.index_copy_(0, torch.from_numpy(ids), src), full, rows)
        staging = TensorStorage(self._layout.wrap(full), ndim=self.ndim)
        staging.max_size = self.max_size
        staging._len = self._len
        staging._set_last_cursor(self._last_cursor_index)
        return staging

    def _replace_with(self, staging: TensorStorage) -> None:
        """Make this storage hold what TorchRL storage ``staging`` holds (positions [0, its length along dim 0))."""
        self._check_writer()
        n0 = staging._len_along_dim0 or 0
        if not staging.initialized or n0 == 0:
            self._empty()
            return
        data = staging.get(slice(0, n0))
        leaves = split(data, single=False)
        layout = leaves.layout
        if self._capacity0(layout) < n0:
            raise ValueError(f"the data has {n0} positions along dim 0; this storage has {self._capacity0(layout)}")
        fields = layout.fields_of(leaves)

        def rows() -> Iterator[tuple[np.ndarray, dict, list | None]]:
            for start in range(0, n0, _COPY_ROWS):
                ids = np.arange(start, min(n0, start + _COPY_ROWS), dtype=np.int64)
                objects = [{k: v[i] for k, v in leaves.objects.items()} for i in ids.tolist()] \
                    if leaves.objects else None
                yield ids, {k: v[ids] for k, v in fields.items()}, objects

        gen = self._write_gen(self.path, layout, rows())
        self._switch(gen, layout, int(staging._len), staging._last_cursor_index)

    # ---- internals: reading and in-place writes ------------------------------------------------------
    def _read_fields(self, handle: tier.TierHandle, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The stored fields at ``ids``; positions never written read as zeros."""
        present = handle.store.contains(ids)
        out = {f"f{i}": np.zeros((ids.size, *f.shape), f.store_dtype) for i, f in enumerate(self._layout.fields)}
        if present.any():
            got = handle.store.get_many(ids[present])
            for name in out:
                out[name][present] = got[name]
        return out

    def _read(self, ids: np.ndarray, *, view: bool, device: torch.device | None = None) -> Any:
        """The batch at positions ``ids`` (dim 0 in that order); ``view``: a :class:`_StorageRows`
        that writes in-place changes through to these positions."""
        handle = self._tier()
        try:
            fields = handle.store.get_many(ids)
        except MissingIdsError:  # positions inside the length never written (set_cursor=False writes): zeros
            fields = self._read_fields(handle, ids)
        objects = handle.get_objects(ids) if self._layout.objects else None
        use_view = view and self._layout.kind == "td"
        out = self._layout.assemble(fields, objects, ids.size, self.device if device is None else device,
                                    td_type=_StorageRows if use_view else TensorDict)
        if use_view:
            out._carousel_rows = (self, ids)
        return out

    def _set_coordinates(self, index: tuple, data: Any) -> None:
        rows_index = index[0]
        ids = _positions(rows_index, self._len_along_dim0, "stored positions").reshape(-1)
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = self._read(uniq, view=False)
        local = int(inv[0]) if _is_scalar(rows_index) else torch.from_numpy(inv)
        if is_tensor_collection(rows) or isinstance(rows, torch.Tensor):
            rows[(local, *index[1:])] = data
        else:  # a pytree: the same cells of every leaf
            tree_map(lambda leaf, value: leaf.__setitem__((local, *index[1:]), value), rows, data)
        self._set(uniq, rows, set_cursor=False)

    def _conditional_patch_leaf(self, key: Any) -> Any:
        # docstring inherited
        key = unravel_key(key)
        key = key if isinstance(key, tuple) else (key,)
        if self._layout is None or self._layout.kind != "td":
            raise RuntimeError("Conditional updates require an initialized TensorDict storage. Write some "
                               "data to the buffer before calling update_if_present.")
        i = self._layout.index_of(key)
        if i is None:
            raise KeyError(f"Key {key} does not exist in the storage. Conditional patches can only target "
                           "existing tensor fields of a tensordict storage.")
        return _Column(self, key, self._layout.fields[i])

    def _apply_conditional_patch(self, index: torch.Tensor, patch: dict[Any, torch.Tensor]) -> None:
        # docstring inherited
        coords = tuple(index.unbind(-1)) if index.ndim > 1 else (index,)
        ids = coords[0].reshape(-1).cpu().numpy().astype(np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = self._read(uniq, view=False)
        at = (torch.from_numpy(inv), *coords[1:])
        for key, value in patch.items():
            rows.get(key)[at] = value.to(rows.device) if rows.device is not None else value
        self.set(uniq, rows, set_cursor=False)


class _Column:
    """One leaf of a CarouselStorage as TorchRL's conditional updates read it: dtype, full shape, and
    ``column[coords]`` read from the tier (the column is never loaded whole)."""

    def __init__(self, storage: CarouselStorage, key: tuple[str, ...], field: Any) -> None:
        self._storage, self._key = storage, key
        self.dtype = getattr(torch, field.dtype)
        self.shape = torch.Size([storage._capacity0(storage._layout), *field.shape])
        self.device = storage.device

    def __getitem__(self, coords: Any) -> torch.Tensor:
        return self._storage.get(coords).get(self._key)


class _StorageRows(TensorDict):
    """``storage[a:b]`` of a CarouselStorage: a TensorDict (a copy of those rows) whose in-place
    changes -- ``set_``, ``set_at_``, ``update_``, ``update_at_``, item assignment -- are written back
    to the storage. TorchRL's ``rb.set_``/``set_at_``/``update_`` and ``rb[i, j] = ...`` change
    ``storage[:]`` in place, which a tensor storage hands out as a view. ``set``/``update`` stay
    local, as on a view (a buffer's transforms ``set`` their outputs on what ``rb[:]`` returns);
    an in-place op on a leaf tensor (``rows["obs"].zero_()``) is not seen, unlike on a view."""

    _carousel_rows: tuple[CarouselStorage, np.ndarray] | None = None  # None: a derived TensorDict, no write-back
    _carousel_depth = 0

    def _written_through(name: str):  # noqa: N805 - a decorator factory in the class body
        def method(self, *args, **kwargs):
            self._carousel_depth += 1
            try:
                out = getattr(TensorDict, name)(self, *args, **kwargs)
            finally:
                self._carousel_depth -= 1
            # Only the outermost call writes back (update_ calls set_ per key, for one).
            if self._carousel_depth == 0:
                self._carousel_write_back()
            return out
        method.__name__ = name
        return method

    _carousel_source: _StorageRows | None = None  # the rows a transpose of them shares memory with

    def _carousel_write_back(self) -> None:
        if self._carousel_source is not None:
            self._carousel_source._carousel_write_back()
        elif self._carousel_rows is not None:
            storage, ids = self._carousel_rows
            # No revision bump: as with a view, whoever changes rows in place bumps (TorchRL's
            # rb.set_/set_at_/update_ do).
            storage._set(ids, self, set_cursor=False)

    def transpose(self, dim0: int, dim1: int) -> TensorDict:
        # An ndim > 1 buffer hands out storage[:] transposed (its dim_extend): the transpose shares
        # these rows' memory, so its in-place changes are these rows' to write back.
        out = TensorDict.transpose(self, dim0, dim1)
        if isinstance(out, _StorageRows) and out is not self:
            out._carousel_source = self
        return out

    set_ = _written_through("set_")
    set_at_ = _written_through("set_at_")
    update_ = _written_through("update_")
    update_at_ = _written_through("update_at_")
    __setitem__ = _written_through("__setitem__")
    del _written_through


def _atomic_write(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` by ``text``: temp file, rename; ``durable``: fsync the file before the
    rename and the folder after (survives power loss, not only a crash of the process)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_shape(raw: Any) -> torch.Size:
    """The shape of the data in a tensor storage's state dict (a tensor, or a TensorDict's state)."""
    if isinstance(raw, torch.Tensor):
        return raw.shape
    return TensorDict().load_state_dict(raw, strict=False).batch_size


def _is_scalar(index: Any) -> bool:
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        return True
    return isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim == 0 and index.dtype not in (torch.bool,
                                                                                                     np.bool_)


def _is_key(index: tuple) -> bool:
    return all(isinstance(k, str) for k in index)


def _positions(index: Any, length: int, what: str) -> np.ndarray:
    """``index`` (an int, slice, range, list, array or tensor; negative counts from ``length``) as
    int64 positions in [0, length), shaped like the index. Raises ``IndexError`` outside."""
    if isinstance(index, slice):
        return np.arange(*index.indices(length), dtype=np.int64)
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    ids = np.asarray(index)
    # A boolean mask selects where it is True; cast to int64 first, it would read as positions 0/1.
    ids = np.nonzero(ids)[0] if ids.dtype == np.bool_ else ids.astype(np.int64)
    if not ids.size:
        return ids
    # The usual index (a sampler's, a writer's cursor) has no negative positions: then no shifted
    # copy and no masks, only the bounds (this runs twice per step of a replay loop).
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        ids = np.where(ids < 0, ids + length, ids)
        lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= length:
        bad = ids[(ids < 0) | (ids >= length)]
        raise IndexError(f"positions {bad.reshape(-1)[:5].tolist()} are outside the {length} {what}")
    return ids


def _index(batch: Any, index: tuple) -> Any:
    if isinstance(batch, torch.Tensor) or is_tensor_collection(batch):
        return batch[index]
    return tree_map(lambda t: t[index], batch)


def _stack(data: list) -> Any:
    """A list of elements (``extend`` of a list) as one batch along a new dim 0."""
    if not data:
        raise ValueError("cannot write an empty list")
    try:
        if is_tensor_collection(data[0]):
            return torch.stack(data)
        return tree_map(lambda *xs: torch.stack(xs), *data)
    except (RuntimeError, ValueError, TypeError) as exc:  # TorchRL's words, for callers that match them
        raise RuntimeError(f"Stacking the elements of the list resulted in an error: {exc}. The elements of a "
                           "list written to a storage must have the same structure and shapes; a compact batch "
                           "goes in as a tuple") from exc
