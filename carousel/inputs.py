"""What the memory takes, checked at the door: every front that accepts samples or ids (the
in-process :class:`~carousel.CarouselMemory`, the daemon's client before it sends, the daemon
itself, the sharded Ray client) runs these same checks, so the same bad input raises the same
:class:`MemoryInputError` with the same text wherever it is given.

>>> import numpy as np
>>> check_sample_fields(np.zeros((2, 3), np.uint8), [0, 1], 0, (3,), "uint8")["task"].tolist()
[0, 0]
>>> check_sample_fields(np.zeros((2, 3), np.float32), [0, 1], 0, (3,), "uint8")
Traceback (most recent call last):
...
carousel.inputs.MemoryInputError: x must be uint8, got float32 (store raw samples; convert explicitly)
>>> check_sample_fields(np.zeros((2, 3), np.uint8), [7, 2**40], 0, (3,), "uint8", max_label=2**32 - 1)
Traceback (most recent call last):
...
carousel.inputs.MemoryInputError: label 1099511627776 exceeds memory.max_label = 4294967295
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .config import SALIENCY_FIELD, WEIGHT_FIELD

__all__ = ["MemoryInputError", "as_array", "check_add", "check_count", "check_extra", "check_ids", "check_observe",
           "check_retain", "check_sample_fields", "check_values", "check_weights"]

FieldSpecs = Mapping[str, tuple[tuple[int, ...], str]]


class MemoryInputError(ValueError):
    """Bad input to the memory: wrong shapes, dtypes, unknown ids."""


def as_array(v: Any) -> np.ndarray:
    """A tensor or array-like as a numpy array (a CPU copy of a device tensor).

    A CPU tensor without grad is viewed with ``.numpy()`` alone: ``detach()`` and ``cpu()`` are
    torch ops, and torch's bindings release the GIL around every op, which on the trainer's
    thread hands the GIL to a waiting background thread for the rest of its stretch.
    """
    if isinstance(v, torch.Tensor):
        return v.numpy() if v.is_cpu and not v.requires_grad else v.detach().cpu().numpy()
    return np.asarray(v)


def check_count(n: Any, what: str = "n") -> int:
    """A count such as ``sample(n)``'s: a non-negative int (a numpy or 0-d tensor integer too)."""
    if isinstance(n, torch.Tensor) and n.ndim == 0 and not n.dtype.is_floating_point and n.dtype != torch.bool:
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise MemoryInputError(f"{what} must be an int, got {type(n).__name__}")
    if n < 0:
        raise MemoryInputError(f"{what} must be >= 0, got {n}")
    return int(n)


def check_values(values: Any, what: str) -> np.ndarray:
    """A filter such as ``sample(classes=...)``: integers (one, or any array-like of them) as int64."""
    a = as_array(values).ravel()
    if a.size and a.dtype.kind not in "iu":
        raise MemoryInputError(f"{what} must be integers, got {a.dtype}")
    return a.astype(np.int64)


def check_ids(ids: Any, what: str = "ids") -> np.ndarray:
    """Sample ids as given to ``observe`` or ``retain``: a 1-D array of integers, as int64."""
    a = as_array(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise MemoryInputError(f"{what} must be a 1-D array of integers, got {a.dtype} {tuple(a.shape)}")
    return a.astype(np.int64)


def check_observe(ids: Any, logits: Any = None, loss: Any = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``observe``'s arguments, checked: ids (int64), logits ``(n, C)`` float32, loss ``(n,)`` float32."""
    ids = check_ids(ids)
    lg = ls = None
    if logits is not None:
        lg = as_array(logits)
        if lg.ndim != 2 or lg.shape[0] != ids.size or lg.dtype.kind not in "fiu":
            raise MemoryInputError(f"logits must be ({ids.size}, C) numbers, got {lg.dtype} {tuple(lg.shape)}")
        lg = lg.astype(np.float32, copy=False)
    if loss is not None:
        ls = as_array(loss)
        if ls.size != ids.size or ls.dtype.kind not in "fiu":
            raise MemoryInputError(f"loss must be {ids.size} numbers, got {ls.dtype} {tuple(ls.shape)}")
        ls = ls.astype(np.float32, copy=False).reshape(-1)
    return ids, lg, ls


def check_retain(ids: Any, weights: Any, classes: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``retain``'s arguments, checked: distinct ids (int64), their weights (float32, finite, >= 0)
    and the slice's classes (int64, or None for the ids' own labels)."""
    ids = check_ids(ids)
    w = as_array(weights)
    if w.dtype.kind not in "fiu":
        raise MemoryInputError(f"weights must be numbers, got {w.dtype}")
    w = w.astype(np.float32)
    check_weights(w, ids.size)
    if np.unique(ids).size != ids.size:
        raise MemoryInputError("ids must be distinct")
    return ids, w, None if classes is None else check_values(classes, "classes")


def check_weights(w: np.ndarray, n: int) -> None:
    """A coreset's per-sample weights: ``n`` finite values >= 0."""
    if w.shape != (n,):
        raise MemoryInputError(f"weights must be {n} values, got shape {tuple(w.shape)}")
    if n and not (np.isfinite(w).all() and (w >= 0).all()):
        raise MemoryInputError("coreset weights must be finite and >= 0")


def check_sample_fields(x: Any, y: Any, task: Any, shape: tuple[int, ...], dtype: str,
                        max_label: int | None = None) -> dict[str, np.ndarray]:
    """``x``, ``y`` and ``task`` of one ``add`` checked and normalized (``x`` contiguous, ``y``
    int64, ``task`` int16 per sample); raises :class:`MemoryInputError` naming what is wrong.
    Labels must lie in ``[0, max_label]`` when ``max_label`` is given (a memory's
    ``config.memory.max_label``)."""
    x = as_array(x)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise MemoryInputError(f"x must have shape (n, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if x.dtype != np.dtype(dtype):
        raise MemoryInputError(f"x must be {dtype}, got {x.dtype} (store raw samples; convert explicitly)")
    n = x.shape[0]
    y = as_array(y)
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise MemoryInputError(f"y must be {n} integer labels, got {y.dtype} {tuple(y.shape)}")
    if n and y.min() < 0:
        raise MemoryInputError("labels must be non-negative")
    if n and max_label is not None and y.max() > max_label:
        raise MemoryInputError(f"label {int(y.max())} exceeds memory.max_label = {max_label}")
    t = as_array(task)
    t = np.full(n, int(t), dtype=np.int64) if t.ndim == 0 and t.dtype.kind in "iu" else t
    if t.shape != (n,) or t.dtype.kind not in "iu":
        raise MemoryInputError(f"task must be an int or {n} ints in [0, 32767], got {t.dtype} {tuple(t.shape)}")
    if n and (t.min() < 0 or t.max() > np.iinfo(np.int16).max):
        raise MemoryInputError(f"task must be an int or {n} ints in [0, 32767], got values from {int(t.min())} "
                               f"to {int(t.max())}")
    return {"x": np.ascontiguousarray(x), "y": y.astype(np.int64), "task": t.astype(np.int16)}


def check_extra(name: str, value: Any, n: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """One extra field of ``n`` samples, checked against its ``(shape, dtype)`` and cast to it (a
    saliency map may come as floats in [0, 1] and is stored as 0..255)."""
    e = as_array(value)
    if name == SALIENCY_FIELD:
        e = _saliency_u8(e)
    if tuple(e.shape) != (n, *shape):
        raise MemoryInputError(f"extra {name!r} must have shape {(n, *shape)}, got {tuple(e.shape)}")
    if not np.can_cast(e.dtype, dtype, casting="same_kind"):
        raise MemoryInputError(f"extra {name!r} must be {dtype}, got {e.dtype}")
    return np.ascontiguousarray(e.astype(dtype, copy=False))


def check_add(input_fields: FieldSpecs, coreset: bool, x: Any, y: Any, task: Any, extras: Mapping[str, Any],
              max_label: int | None = None) -> dict[str, np.ndarray]:
    """Everything one ``add`` takes, checked and normalized: ``x``, ``y``, ``task`` and exactly the
    extra fields of ``input_fields`` (a coreset memory's ``weight`` defaults to 1 per sample)."""
    shape, dtype = input_fields["x"]
    out = check_sample_fields(x, y, task, shape, dtype, max_label)
    n = out["x"].shape[0]
    if coreset and WEIGHT_FIELD not in extras:
        extras = {**extras, WEIGHT_FIELD: np.ones(n, np.float32)}  # weight 1 unless given
    names = [k for k in input_fields if k not in ("x", "y", "task")]
    unknown = sorted(set(extras) - set(names))
    missing = sorted(set(names) - set(extras))
    if unknown or missing:
        raise MemoryInputError(f"extras must be exactly {names}: unknown {unknown}, missing {missing}")
    for name in names:
        out[name] = check_extra(name, extras[name], n, *input_fields[name])
    if coreset:
        check_weights(out[WEIGHT_FIELD], n)
    return out


def _saliency_u8(s: np.ndarray) -> np.ndarray:
    """A saliency map as 0..255: float maps must lie in [0, 1]; integer maps pass as they are."""
    if s.dtype.kind == "f":
        if s.size and not (np.isfinite(s).all() and s.min() >= 0.0 and s.max() <= 1.0):
            raise MemoryInputError("a float saliency map must hold values in [0, 1]")
        return np.rint(s * 255.0).astype(np.uint8)
    if s.dtype.kind in "iu" and s.size and (s.min() < 0 or s.max() > 255):
        raise MemoryInputError("an integer saliency map must hold values in 0..255")
    return s
