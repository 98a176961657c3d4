"""How a TorchRL batch maps onto the fixed-schema records of a carousel store, and back.

A storage position (one index along TorchRL's dim 0) is one record. Every tensor leaf of the
data is one field ``f{i}`` of that record, shaped like the leaf without its dim 0 (so a
TensorDict of batch size ``[n, 3]`` keeps its ``3`` inside each record); every non-tensor leaf
(``set_non_tensor``, a ``str`` field of a ``@tensorclass``) is kept per position in the tier's
object table, not in the record. :class:`Layout` is that mapping, saved as JSON beside the store:

- ``kind``: ``"tensor"`` (a plain tensor), ``"td"`` (a TensorDict or a ``@tensorclass``, named by
  ``cls``) or ``"pytree"`` (dicts/tuples/lists of tensors, ``treespec`` as
  ``torch.utils._pytree.treespec_dumps`` writes it);
- ``fields``: per field, its leaf key (a nested-key tuple; a pytree leaf's position), the
  torch dtype and the record shape; ``objects``: the non-tensor leaf keys; ``batch_shape``: the
  TensorDict batch dims after dim 0.

A torch dtype numpy lacks (``bfloat16``) is kept as the integer of its width and viewed back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tensordict import (NonTensorStack, TensorDict, is_leaf_nontensor, is_non_tensor, is_tensor_collection,
                        is_tensorclass)
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

__all__ = ["Layout", "Leaves", "split"]

# torch dtypes numpy has no type for, stored as the integer of the same width: a view, not a
# conversion, so every bit pattern survives (NaN payloads included).
_VIEW_AS = {torch.bfloat16: torch.int16}
_NUMPY_OK = {torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
             torch.float16, torch.float32, torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# Tensorclasses written in this process, by the name a layout keeps: a class defined inside a
# function has no importable name, and is found here instead.
_CLASSES: dict[str, type] = {}


@dataclass(frozen=True)
class FieldLayout:
    """One tensor leaf: its key, torch dtype name and record shape (the leaf's shape after dim 0)."""

    key: tuple[Any, ...] | None
    dtype: str
    shape: tuple[int, ...]

    @property
    def store_dtype(self) -> str:
        """The numpy dtype the store keeps this field as."""
        dtype = _torch_dtype(self.dtype)
        return str(torch.empty(0, dtype=_VIEW_AS.get(dtype, dtype)).numpy().dtype)


@dataclass(frozen=True)
class Layout:
    """The mapping of one storage's data onto records (see the module docstring)."""

    kind: str
    fields: tuple[FieldLayout, ...]
    objects: tuple[tuple[str, ...], ...] = ()
    batch_shape: tuple[int, ...] = ()
    cls: str | None = None
    treespec: str | None = None
    _keys: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- persistence -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "batch_shape": list(self.batch_shape), "cls": self.cls,
                "treespec": self.treespec, "objects": [list(k) for k in self.objects],
                "fields": [{"key": None if f.key is None else list(f.key), "dtype": f.dtype,
                            "shape": list(f.shape)} for f in self.fields]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Layout:
        fields = tuple(FieldLayout(None if f["key"] is None else tuple(f["key"]), f["dtype"], tuple(f["shape"]))
                       for f in raw["fields"])
        return cls(raw["kind"], fields, tuple(tuple(k) for k in raw.get("objects", ())),
                   tuple(raw.get("batch_shape", ())), raw.get("cls"), raw.get("treespec"))

    @classmethod
    def from_legacy_keys(cls, keys: list[list[str] | None], schema: Any) -> Layout:
        """A storage written before layouts existed (``keys`` only; dtypes and shapes from the store)."""
        fields = []
        for i, key in enumerate(keys):
            spec = schema[f"f{i}"]
            fields.append(FieldLayout(None if key is None else tuple(key), str(spec.dtype), tuple(spec.shape)))
        return cls("tensor" if keys == [None] else "td", tuple(fields))

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The store schema: field ``f{i}`` -> (record shape, numpy dtype)."""
        return {f"f{i}": (f.shape, f.store_dtype) for i, f in enumerate(self.fields)}

    # ---- compatibility -------------------------------------------------------------------------
    def index_of(self, key: Any) -> int | None:
        if not self._keys:
            self._keys.update({f.key: i for i, f in enumerate(self.fields)})
        return self._keys.get(key)

    def merged(self, new: Layout) -> Layout:
        """This layout grown by the leaves ``new`` has and this one lacks (a key added after the
        first write, as TorchRL's tensor storages allow). Raises ``ValueError`` for data of another
        kind or batch shape, or a known key with another record shape."""
        if (new.kind, new.batch_shape, new.cls, new.treespec) != (self.kind, self.batch_shape, self.cls, self.treespec):
            raise ValueError(f"this storage holds {self.describe()}; the data is {new.describe()}")
        extra = []
        for f in new.fields:
            i = self.index_of(f.key)
            if i is None:
                extra.append(f)
            elif self.fields[i].shape != f.shape:
                raise ValueError(f"leaf {_show(f.key)} has records of shape {self.fields[i].shape} in this storage; "
                                 f"the data's are {f.shape}")
        objects = self.objects + tuple(k for k in new.objects if k not in self.objects)
        if not extra and objects == self.objects:
            return self
        return replace(self, fields=self.fields + tuple(extra), objects=objects, _keys={})

    def describe(self) -> str:
        what = {"tensor": "a tensor", "td": self.cls or "a TensorDict", "pytree": "a pytree"}[self.kind]
        return f"{what} of batch shape [n, {', '.join(map(str, self.batch_shape))}]" if self.batch_shape else what

    # ---- data -> fields ---------------------------------------------------------------------------
    def fields_of(self, leaves: Leaves) -> dict[str, np.ndarray | None]:
        """Field name -> numpy batch in the store's dtype (None: a field this data lacks)."""
        out: dict[str, np.ndarray | None] = {}
        for i, f in enumerate(self.fields):
            value = leaves.tensors.get(f.key)
            if value is None:
                out[f"f{i}"] = None
                continue
            want = _torch_dtype(f.dtype)
            value = value.detach().to("cpu", want)  # TorchRL's storages cast on write too
            out[f"f{i}"] = value.view(_VIEW_AS[want]).numpy() if want in _VIEW_AS else value.numpy()
        return out

    # ---- fields -> data -------------------------------------------------------------------------
    def assemble(self, fields: dict[str, np.ndarray], objects: list[dict[Any, Any]] | None, n: int,
                 device: torch.device, td_type: type = TensorDict) -> Any:
        """A batch of ``n`` positions (dim 0) from the store's fields and the object table's rows."""
        tensors = []
        for i, f in enumerate(self.fields):
            arr = fields[f"f{i}"]
            # A store may hand back a read-only or strided view of the bytes it read (the flat
            # store's rows); a batch must be writable and laid out as torch expects.
            ok = arr.flags.writeable and arr.flags.c_contiguous and arr.flags.aligned
            t = torch.from_numpy(arr if ok else np.array(arr, order="C"))
            dtype = _torch_dtype(f.dtype)
            tensors.append((t.view(dtype) if dtype in _VIEW_AS else t).to(device))
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "pytree":
            return tree_unflatten(tensors, treespec_loads(self.treespec))
        td = td_type({}, batch_size=[n, *self.batch_shape], device=device)
        for f, t in zip(self.fields, tensors):
            td.set(f.key, t)
        for key in self.objects:
            values = [None if row is None else row.get(key) for row in objects] if objects else [None] * n
            td.set(key, NonTensorStack.from_list(values) if n else NonTensorStack(batch_size=[0]))
        return td

    def wrap(self, td: Any) -> Any:
        """The tensorclass this layout was written from, around ``td`` (``td`` itself otherwise)."""
        if self.cls is None or not is_tensor_collection(td):
            return td
        klass = _CLASSES.get(self.cls)
        if klass is None:  # first use since a reopen: import it by its name
            module, _, name = self.cls.partition(":")
            klass = importlib.import_module(module)
            for part in name.split("."):
                klass = getattr(klass, part)
        return klass._from_tensordict(td)


@dataclass
class Leaves:
    """One write's data taken apart: tensor leaves and per-position non-tensor rows (dim 0 first)."""

    layout: Layout
    tensors: dict[Any, torch.Tensor]
    objects: dict[tuple[str, ...], list[Any]]
    n: int


def split(data: Any, single: bool) -> Leaves:
    """Take ``data`` (a batch along dim 0, or one element when ``single``) apart into its leaves.

    Raises ``TypeError`` for data that is none of a tensor, a tensor collection or a pytree of
    tensors (TorchRL's tensor storages take the same three).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> leaves = split(TensorDict({"obs": torch.zeros(4, 3), "n": {"r": torch.ones(4)}}, [4]), single=False)
        >>> [(f.key, f.dtype, f.shape) for f in leaves.layout.fields], leaves.n
        ([(('n', 'r'), 'float32', ()), (('obs',), 'float32', (3,))], 4)
        >>> leaves.layout.schema()
        {'f0': ((), 'float32'), 'f1': ((3,), 'float32')}
    """
    if single:  # one element: give it its dim 0
        data = data.unsqueeze(0) if is_tensor_collection(data) or isinstance(data, torch.Tensor) else \
            tree_unflatten([t.unsqueeze(0) for t in _tensor_leaves(data)[0]], _tensor_leaves(data)[1])
    if isinstance(data, torch.Tensor):
        f = FieldLayout(None, _dtype_name(data.dtype), tuple(data.shape[1:]))
        _check_dtype(data.dtype, "the data")
        return Leaves(Layout("tensor", (f,)), {None: data}, {}, data.shape[0])
    if is_tensor_collection(data):
        cls = None
        if is_tensorclass(data):
            cls = f"{type(data).__module__}:{type(data).__qualname__}"
            _CLASSES[cls] = type(data)
            data = data._tensordict
        n = data.batch_size[0] if data.batch_dims else None
        if n is None:
            raise ValueError("a TensorDict written to a storage needs a batch dimension (dim 0: the positions)")
        tensors, objects = {}, {}
        # Non-tensor data (NonTensorData/NonTensorStack) is a tensor collection too: ask for it as a leaf.
        for key, value in data.items(include_nested=True, leaves_only=True, is_leaf=is_leaf_nontensor):
            key = key if isinstance(key, tuple) else (key,)
            if is_non_tensor(value):
                rows = value.tolist()
                objects[key] = rows if isinstance(rows, list) and len(rows) == n else [value.data] * n
            elif isinstance(value, torch.Tensor):
                _check_dtype(value.dtype, f"leaf {_show(key)}")
                tensors[key] = value
            else:
                raise TypeError(f"leaf {_show(key)} is a {type(value).__name__}; a storage keeps tensors and "
                                "non-tensor data (NonTensorData/NonTensorStack)")
        fields = tuple(FieldLayout(k, _dtype_name(v.dtype), tuple(v.shape[1:]))
                       for k, v in sorted(tensors.items(), key=lambda kv: kv[0]))
        layout = Layout("td", fields, tuple(sorted(objects)), tuple(data.batch_size[1:]), cls)
        return Leaves(layout, tensors, objects, n)
    leaves, spec = _tensor_leaves(data)
    if not leaves:
        raise TypeError(f"a storage keeps tensors, tensor collections and pytrees of tensors, got "
                        f"{type(data).__name__}")
    n = leaves[0].shape[0]
    for i, t in enumerate(leaves):
        _check_dtype(t.dtype, f"pytree leaf {i}")
        if t.shape[:1] != leaves[0].shape[:1]:
            raise ValueError(f"pytree leaves have {n} and {t.shape[0]} positions along dim 0")
    fields = tuple(FieldLayout((i,), _dtype_name(t.dtype), tuple(t.shape[1:])) for i, t in enumerate(leaves))
    return Leaves(Layout("pytree", fields, treespec=treespec_dumps(spec)), {(i,): t for i, t in enumerate(leaves)},
                  {}, n)


def _tensor_leaves(data: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = tree_flatten(data)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"a storage keeps tensors, tensor collections and pytrees of tensors; "
                            f"this pytree has a {type(leaf).__name__} leaf")
    return leaves, spec


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _NUMPY_OK and dtype not in _VIEW_AS:
        raise TypeError(f"{what} is {dtype}; a CarouselStorage keeps bool, (u)int8-64, float16/32/64 and bfloat16")


def _show(key: Any) -> str:
    return repr(key[0] if isinstance(key, tuple) and len(key) == 1 else key)
