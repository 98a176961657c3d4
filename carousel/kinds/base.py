"""The ``Codec`` ABC: how a memory kind looks to the storage path.

A codec turns a batch of samples into the records a tier stores (in write-behind, off the
trainer's thread) and stored records back into samples for the EM (in the swap engine's
prefetch, in ``retain`` and in recovery), and says how many bytes each record really carries:
the measure of a tier's byte budget (``capacity = "64MiB"``), so compressed samples let more of
them fit. One codec per memory, chosen by its ``kind`` (:func:`carousel.kinds.make_codec`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

Fields = Mapping[str, tuple[tuple[int, ...], str]]


class Codec(ABC):
    """Encodes a memory's samples for its storage tiers and decodes them back (one per memory).

    ``fields`` are the EM's fields (what ``sample()`` returns); :attr:`inputs` are extra fields
    ``add()`` takes that only the encoder uses; :attr:`stored` is the tiers' record schema.
    """

    name: ClassVar[str]

    def __init__(self, fields: Fields) -> None:
        self.fields = dict(fields)

    @property
    def inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Fields ``add()`` takes beyond the EM's, consumed by :meth:`encode` (none by default)."""
        return {}

    @property
    @abstractmethod
    def stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The schema of a stored record."""

    @abstractmethod
    def encode(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Records (fields of :attr:`stored`) for a batch of EM fields plus :attr:`inputs`."""

    @abstractmethod
    def decode(self, records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """EM fields for stored records (may be a subset: ``y`` and ``task`` only need no decoding)."""

    @abstractmethod
    def nbytes(self, records: Mapping[str, np.ndarray]) -> np.ndarray:
        """Bytes each record really carries (the measure of byte budgets), ``(n,)`` int64."""
