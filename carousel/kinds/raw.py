"""The ``raw`` codec (kinds ``plain`` and ``coreset``): records are the samples, byte for byte.

>>> import numpy as np
>>> codec = RawCodec({"x": ((2,), "uint8"), "y": ((), "int64"), "task": ((), "int16")})
>>> codec.stored == codec.fields, codec.nbytes({"y": np.zeros(3, np.int64)}).tolist()
(True, [12, 12, 12])
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from storage_backends import Schema

from .base import Codec, Fields


class RawCodec(Codec):
    """Records are the samples themselves."""

    name = "raw"

    @property
    def stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return dict(self.fields)

    def encode(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: batch[k] for k in self.fields}

    def decode(self, records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(records)

    def __init__(self, fields: Fields) -> None:
        super().__init__(fields)
        self._record_nbytes = Schema(self.fields).record_nbytes

    def nbytes(self, records: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.full(len(records["y"]), self._record_nbytes, dtype=np.int64)
