"""The integrity mode: every batch ``sample()`` hands out is checked against what was added.

A learner that forgets the task it has just learned usually replays wrong pairs: an image with
another sample's label or logits, an image half old and half new (issue 20). In the integrity
mode (``[memory] verify = true``, or ``CAROUSEL_VERIFY=1`` in the environment of the process that
opens the memory) the memory keeps, for every sample, a CRC-32C of each field's bytes as ``add()``
received them -- in the catalog, beside the EM slot and independent of it and of storage -- and
every batch is recomputed and compared before anyone trains on it. A mismatch raises
:class:`IntegrityError` at once, naming the id, the EM slot and what differed.

What is checked, per sample: ``x``, ``y``, ``task`` and every extra field (DER++'s logits, ...)
against their add-time CRC-32C; a coreset memory's ``weight``, which ``retain()`` changes, against
the catalog's weight (the truth it is copied from); a saliency memory's ``x`` is not checked (the
EM holds a decoded, lossy image for a sample swapped in from storage, which no add-time CRC can
vouch for), everything else is.

A batch travels with its *references* (:attr:`Verifier.columns`): the EM slot of each row
(``@slot``), the catalog's label (``@label``, for messages), the reference CRCs (``@crc``, one
column per checked field) and, in a coreset memory, the reference weight (``@weight``), all taken
under the EM's lock together with the rows. The CRCs are stored XOR-ed with a hash of the row's
id, so a row whose id is not the one its references were looked up for fails too. Through the
daemon, rings and SAMPLE replies carry the same columns and the *client* checks, so the check
covers the transport as well.

>>> import numpy as np
>>> v = Verifier(("x", "y", "task"))
>>> batch = {"id": np.array([7, 8]), "x": np.array([[1, 2], [3, 4]], np.uint8),
...          "y": np.array([0, 1]), "task": np.zeros(2, np.int16)}
>>> refs = v.references(batch["id"], np.array([3, 5]), v.crcs(batch), batch["y"])
>>> v.check(batch, refs)  # rows checked
2
>>> batch["y"] = np.array([1, 0])  # two labels swapped: two wrong pairs
>>> v.check(batch, refs)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
carousel.integrity.IntegrityError: integrity check failed: 2 of 2 samples differ from their references: \
id 7 in EM slot 3: y (label expected 0, got 1; CRC-32C expected 0x...
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c  # hardware CRC-32C, as the stores use (storage_backends.records)
import numpy as np

from storage_backends.records import CRC_BYTES

from .config import WEIGHT_FIELD, ConfigError

__all__ = ["ENV_VAR", "IntegrityError", "Mismatch", "Verifier", "verify_requested"]

ENV_VAR = "CAROUSEL_VERIFY"
SLOT, LABEL, CRC, WEIGHT = "@slot", "@label", "@crc", "@weight"  # never a field name (those start with a letter)
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_LISTED = 8  # mismatches described one by one in a message; the rest are counted
_ID_HASH = np.uint32(0x9E3779B1)  # Fibonacci hashing: neighbouring ids get unrelated masks


def verify_requested(configured: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a memory runs in the integrity mode: ``configured`` (``memory.verify``), or
    ``CAROUSEL_VERIFY`` set to ``1``/``true``/``yes``/``on`` (which turns it on for every memory
    the process opens; ``0``, ``false``, empty or unset leave it to the configuration).

    >>> verify_requested(False, {}), verify_requested(False, {"CAROUSEL_VERIFY": "1"}), verify_requested(True, {})
    (False, True, True)
    >>> verify_requested(False, {"CAROUSEL_VERIFY": "maybe"})
    Traceback (most recent call last):
    ...
    carousel.config.ConfigError: CAROUSEL_VERIFY: expected 1, true, yes or on (or 0, false, no, off), got 'maybe'
    """
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if raw not in _ON + _OFF:
        raise ConfigError(None, ENV_VAR, f"expected 1, true, yes or on (or 0, false, no, off), got {raw[:32]!r}")
    return configured or raw in _ON


@dataclass(frozen=True)
class Mismatch:
    """One row of a batch that failed its check: the sample ``id``, the EM ``slot`` it was
    gathered from, the ``fields`` that differ and a ``detail`` per field (expected vs got)."""

    id: int
    slot: int
    fields: tuple[str, ...]
    detail: str


class IntegrityError(RuntimeError):
    """A batch held a sample that differs from its reference: a wrong pair that must not be
    trained on. ``mismatches`` lists each failing row (:class:`Mismatch`: id, EM slot, fields);
    ``str()`` says the same. Raised by ``sample()`` in-process and by the daemon's client."""

    def __init__(self, message: str, mismatches: Sequence[Mismatch] = ()) -> None:
        super().__init__(message)
        self.mismatches = tuple(mismatches)

    @property
    def ids(self) -> list[int]:
        """The ids of the failing rows."""
        return [m.id for m in self.mismatches]

    @property
    def slots(self) -> list[int]:
        """The EM slots the failing rows were gathered from."""
        return [m.slot for m in self.mismatches]

    def __reduce__(self):  # so it crosses process boundaries (a DataLoader worker, a Ray actor) intact
        return type(self), (str(self), self.mismatches)


def _np(a: Any) -> np.ndarray:
    """A numpy view of a CPU tensor or an array (no copy)."""
    if type(a) is np.ndarray:
        return a
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def _rows(a: np.ndarray, n: int) -> np.ndarray:
    """``(n, row bytes)`` uint8 view of a field's ``n`` rows (the bytes the stores CRC too)."""
    return np.ascontiguousarray(a).reshape(n, -1).view(np.uint8)


@functools.lru_cache(maxsize=256)
def _intact_crc(widths: tuple[int, ...], n: int) -> int:
    """CRC-32C of ``n`` intact rows laid out as :meth:`Verifier.check` lays them out: each field's
    bytes (``widths``) followed by their CRC-32C. A value followed by its own CRC-32C moves the CRC
    register from one state to the next whatever its content (the residue ``records.batch_crc``
    uses), so this depends only on the layout: computed once from zero rows."""
    row = b"".join(bytes(w) + google_crc32c.value(bytes(w)).to_bytes(CRC_BYTES, "little") for w in widths)
    return google_crc32c.value(row * n)


def _row_crcs(rows: np.ndarray) -> np.ndarray:
    """CRC-32C of each row of a ``(n, bytes)`` uint8 matrix."""
    crc = google_crc32c.value
    return np.fromiter((crc(row) for row in rows), np.uint32, rows.shape[0])


def _mask(ids: np.ndarray) -> np.ndarray:
    """A 32-bit hash per id that the references are XOR-ed with (binds them to their row's id):
    ``uint32(id ^ (id >> 32)) * 0x9E3779B1`` modulo 2**32 (2.6 us for 32 ids, against 6.3 us in uint64)."""
    return (ids ^ (ids >> 32)).astype(np.uint32) * _ID_HASH


@dataclass(frozen=True)
class Verifier:
    """What a memory checks, and the check itself (see the module docstring).

    ``checked``: the fields with a CRC-32C reference, in the order of the ``@crc`` columns;
    ``weight``: whether the coreset weight is checked against the catalog's.
    """

    checked: tuple[str, ...]
    weight: bool = False

    @classmethod
    def for_memory(cls, fields: Mapping[str, Any], kind: str) -> Verifier:
        """The checks of a memory with EM ``fields`` and ``kind`` (``plain``, ``coreset``, ``saliency``).

        >>> Verifier.for_memory({"x": 0, "y": 0, "task": 0, "weight": 0}, "coreset")
        Verifier(checked=('x', 'y', 'task'), weight=True)
        >>> Verifier.for_memory({"x": 0, "y": 0, "task": 0}, "saliency").checked  # x is decoded, lossy
        ('y', 'task')
        """
        coreset = kind == "coreset"
        skip = {WEIGHT_FIELD} if coreset else set()
        if kind == "saliency":
            skip.add("x")
        return cls(tuple(name for name in fields if name not in skip), coreset)

    @property
    def columns(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The reference columns a batch carries beside its fields (a ring's layout, a SAMPLE reply)."""
        cols = {SLOT: ((), "int64"), LABEL: ((), "int64"), CRC: ((len(self.checked),), "uint32")}
        if self.weight:
            cols[WEIGHT] = ((), "float32")
        return cols

    def to_json(self) -> dict[str, Any]:
        """What HELLO's reply says of it (``verify``)."""
        return {"fields": list(self.checked), "weight": self.weight}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verifier:
        fields = data.get("fields")
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise ValueError(f"verify.fields must be a list of field names, got {str(fields)[:80]}")
        return cls(tuple(fields), bool(data.get("weight", False)))

    def crcs(self, fields: Mapping[str, Any]) -> np.ndarray:
        """``(n, len(checked))`` uint32: the CRC-32C of each checked field of each sample (what
        ``add()`` keeps in the catalog; recovery computes them from stored records)."""
        n = len(_np(fields[self.checked[0]])) if self.checked else 0
        out = np.empty((n, len(self.checked)), np.uint32)
        for j, name in enumerate(self.checked):
            out[:, j] = _row_crcs(_rows(_np(fields[name]), n))
        return out

    def references(self, ids: np.ndarray, slots: np.ndarray, crcs: np.ndarray, labels: np.ndarray,
                   weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The reference columns of a batch of ``ids`` gathered from EM ``slots``: the catalog's
        ``crcs`` (``(n, len(checked))``), ``labels`` and, for a coreset memory, ``weights``."""
        ids = np.asarray(ids, np.int64)
        refs = {SLOT: np.asarray(slots, np.int64), LABEL: np.asarray(labels, np.int64),
                CRC: np.asarray(crcs, np.uint32) ^ _mask(ids)[:, None]}
        if self.weight:
            refs[WEIGHT] = np.asarray(weights, np.float32)
        return refs

    def check(self, batch: Mapping[str, Any], refs: Mapping[str, Any]) -> int:
        """Recompute every row of ``batch`` (``"id"`` and the fields, tensors or arrays) and compare
        it with ``refs`` (:meth:`references`, or the same columns read from a ring or a reply).
        Returns the number of rows checked; raises :class:`IntegrityError` on any difference."""
        ids = _np(batch["id"]).astype(np.int64, copy=False)
        n = ids.size
        missing = [k for k in self.columns if k not in refs]
        if missing:
            raise IntegrityError(f"integrity check impossible: the batch carries no references {missing}")
        if not n:
            return 0
        crcs = _np(refs[CRC]) ^ _mask(ids)[:, None]  # a fresh (n, fields) array
        rows = [_rows(_np(batch[name]), n) for name in self.checked]
        widths = tuple(r.shape[1] for r in rows)
        # Every row of every field followed by its reference, in one buffer: one CRC pass checks the
        # whole batch (see _intact_crc); only a failing batch is looked at field by field, row by row.
        buf = np.empty((n, sum(widths) + CRC_BYTES * len(widths)), np.uint8)
        ref_bytes = crcs.astype("<u4", copy=False).view(np.uint8)
        off = 0
        for j, r in enumerate(rows):
            buf[:, off:off + widths[j]] = r
            off += widths[j]
            buf[:, off:off + CRC_BYTES] = ref_bytes[:, j * CRC_BYTES:(j + 1) * CRC_BYTES]
            off += CRC_BYTES
        bad: dict[int, list[str]] = {}
        if google_crc32c.value(buf) != _intact_crc(widths, n):
            for j, name in enumerate(self.checked):
                for i in np.flatnonzero(_row_crcs(rows[j]) != crcs[:, j]).tolist():
                    bad.setdefault(i, []).append(name)
        if self.weight:
            got = _np(batch[WEIGHT_FIELD]).reshape(n).astype(np.float32, copy=False)
            want = _np(refs[WEIGHT]).astype(np.float32, copy=False)
            for i in np.flatnonzero(got.view(np.uint32) != want.view(np.uint32)).tolist():
                bad.setdefault(i, []).append(WEIGHT_FIELD)
        if bad:
            raise self._error(batch, refs, ids, crcs, bad)
        return n

    def _error(self, batch: Mapping[str, Any], refs: Mapping[str, Any], ids: np.ndarray, crcs: np.ndarray,
               bad: dict[int, list[str]]) -> IntegrityError:
        """The error for the failing rows ``bad`` (row -> fields): each one described."""
        slots, labels = _np(refs[SLOT]), _np(refs[LABEL])
        mismatches = []
        for i in sorted(bad):
            parts = []
            for name in bad[i]:
                if name == WEIGHT_FIELD:
                    parts.append(f"weight (expected {float(_np(refs[WEIGHT])[i])!r}, "
                                 f"got {float(_np(batch[WEIGHT_FIELD]).reshape(-1)[i])!r})")
                    continue
                got = google_crc32c.value(_rows(_np(batch[name])[i:i + 1], 1)[0])
                crc = f"CRC-32C expected 0x{int(crcs[i, self.checked.index(name)]):08x}, got 0x{got:08x}"
                if name == "y":
                    crc = f"label expected {int(labels[i])}, got {int(_np(batch['y'])[i])}; {crc}"
                parts.append(f"{name} ({crc})")
            mismatches.append(Mismatch(int(ids[i]), int(slots[i]), tuple(bad[i]), ", ".join(parts)))
        listed = " | ".join(f"id {m.id} in EM slot {m.slot}: {m.detail}" for m in mismatches[:_LISTED])
        more = mismatches[_LISTED:]
        if more:
            listed += f" | and {len(more)} more (ids {[m.id for m in more][:32]})"
        return IntegrityError(f"integrity check failed: {len(mismatches)} of {ids.size} samples differ from their "
                              f"references: {listed}", mismatches)
