"""Record schemas: the fixed set of fields every record of a store carries.

A schema maps a field name to ``(shape, dtype)``, e.g.::

    {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}

Later features add fields the same way (stored logits, a coreset weight, a saliency mask): a field
is a field. The schema is stored inside each store, so reopening needs only the URL.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SchemaError, format_ids

#: dtypes a field may have. Fixed-size, little-endian numerics only: nothing that needs pickling,
#: nothing whose byte layout differs between machines.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"]
)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: A single record may not exceed this (LMDB values and zarr chunks both hold whole records).
MAX_RECORD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class FieldSpec:
    """Shape (without the batch axis) and dtype of one field."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of one record's value of this field."""
        return math.prod(self.shape) * self.dtype.itemsize


class Schema(Mapping[str, FieldSpec]):
    """An ordered, immutable mapping ``field name -> FieldSpec``.

    The order of the fields is the order given; it fixes the byte layout of a packed record.

    >>> s = Schema({"x": ((2, 2), "uint8"), "y": ((), "int64")})
    >>> s.record_nbytes
    12
    >>> s["x"].shape, str(s["y"].dtype)
    ((2, 2), 'int64')
    """

    def __init__(self, fields: Mapping[str, Any]) -> None:
        if isinstance(fields, Schema):
            self._fields: dict[str, FieldSpec] = dict(fields._fields)
            return
        if not isinstance(fields, Mapping) or not fields:
            raise SchemaError(f"a schema is a non-empty mapping of field -> (shape, dtype), got {fields!r}")
        self._fields = {}
        for name, spec in fields.items():
            self._fields[name] = _parse_field(name, spec)
        if self.record_nbytes > MAX_RECORD_BYTES:
            raise SchemaError(f"one record would take {self.record_nbytes} bytes (> {MAX_RECORD_BYTES})")

    # Mapping protocol
    def __getitem__(self, name: str) -> FieldSpec:
        return self._fields[name]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Schema):
            return list(self._fields.items()) == list(other._fields.items())
        if isinstance(other, Mapping):
            try:
                return self == Schema(other)
            except SchemaError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple((k, v.shape, v.dtype.str) for k, v in self._fields.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: ({v.shape}, {v.dtype.name!r})" for k, v in self._fields.items())
        return f"Schema({{{inner}}})"

    @property
    def record_nbytes(self) -> int:
        """Bytes of one packed record (all fields, no checksum)."""
        return sum(f.nbytes for f in self._fields.values())

    def to_json(self) -> str:
        """Serialize; :meth:`from_json` reverses it."""
        return json.dumps({k: [list(v.shape), v.dtype.name] for k, v in self._fields.items()})

    @classmethod
    def from_json(cls, text: str | bytes) -> Schema:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SchemaError(f"stored schema is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise SchemaError(f"stored schema must be a JSON object, got {type(raw).__name__}")
        return cls({k: (tuple(v[0]), v[1]) for k, v in raw.items()})

    def validate_batch(self, ids: Any, fields: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Check a ``put_many`` batch and return it normalized (int64 ids, C-contiguous arrays of
        the schema's dtypes). Raises :class:`SchemaError` naming the field and what is wrong.

        Integer values are cast to a narrower integer field only when every value fits; floats
        are cast only where no precision is lost (numpy "safe" casting).
        """
        ids = validate_ids(ids, unique=True)
        n = ids.shape[0]
        if not isinstance(fields, Mapping):
            raise SchemaError(f"fields must be a mapping of field name -> array, got {type(fields).__name__}")
        missing = [k for k in self._fields if k not in fields]
        extra = [k for k in fields if k not in self._fields]
        if missing or extra:
            raise SchemaError(
                f"fields do not match the schema: missing {missing}, unexpected {extra}; schema has {list(self._fields)}"
            )
        out: dict[str, np.ndarray] = {}
        for name, spec in self._fields.items():
            arr = np.asarray(fields[name])
            want = (n, *spec.shape)
            if arr.shape != want:
                raise SchemaError(f"field {name!r}: expected shape {want} for {n} ids, got {arr.shape}")
            out[name] = np.ascontiguousarray(_cast(name, arr, spec.dtype))
        return ids, out


def validate_ids(ids: Any, unique: bool = False) -> np.ndarray:
    """Return ``ids`` as a 1-D int64 array of non-negative ids, or raise :class:`SchemaError`."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise SchemaError(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise SchemaError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > np.iinfo(np.int64).max:
        raise SchemaError("ids must fit in int64")
    arr = arr.astype(np.int64, copy=False)
    if int(arr.min()) < 0:
        raise SchemaError(f"ids must be non-negative, got {format_ids(arr[arr < 0])}")
    if unique:
        uniq, counts = np.unique(arr, return_counts=True)
        if uniq.size != arr.size:
            raise SchemaError(f"ids must be unique within one call, repeated: {format_ids(uniq[counts > 1])}")
    return arr


def _parse_field(name: Any, spec: Any) -> FieldSpec:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SchemaError(f"field name {name!r} must match {_NAME.pattern}")
    if isinstance(spec, FieldSpec):
        return spec
    try:
        shape, dtype = spec
    except (TypeError, ValueError):
        raise SchemaError(f"field {name!r}: expected (shape, dtype), got {spec!r}") from None
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise SchemaError(f"field {name!r}: shape must be a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise SchemaError(f"field {name!r}: shape {shape} must have at most 8 non-negative dims")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise SchemaError(f"field {name!r}: unknown dtype {dtype!r}; allowed: {sorted(ALLOWED_DTYPES)}") from None
    if dt.name not in ALLOWED_DTYPES:
        raise SchemaError(f"field {name!r}: dtype {dt} not allowed; allowed: {sorted(ALLOWED_DTYPES)}")
    return FieldSpec(shape, dt.newbyteorder("<") if dt.itemsize > 1 else dt)


def _cast(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if arr.dtype == dtype:
        return arr
    if arr.dtype.kind in "iu" and dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise SchemaError(f"field {name!r}: values in [{lo}, {hi}] do not fit dtype {dtype}")
        return arr.astype(dtype)
    if np.can_cast(arr.dtype, dtype, casting="safe"):
        return arr.astype(dtype)
    raise SchemaError(f"field {name!r}: expected dtype {dtype}, got {arr.dtype} (cast it explicitly)")
