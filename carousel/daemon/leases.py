"""Ids leased to one connection: what lets a client's ``add`` return without waiting for a reply.

A client asks for a block of ids ahead of need (``LEASE``); its ``add`` then takes the next ids of
its blocks itself, sends the samples with the first of them (``ADD {first}``) and returns. Both
sides consume the blocks the same way -- in order, an add's ids running on into the next block
when one is used up -- so the daemon checks that ``first`` is the id it expects and refuses an add
that names any other (a confused or hostile client cannot claim ids it was not given).

When the connection goes, its unused ids go back to the memory (:meth:`CarouselMemory.release_ids`),
which leases them again: no sample ever had them, so no id is used twice.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from .errors import RequestError

if TYPE_CHECKING:
    from ..memory import CarouselMemory


def consume(blocks: deque[list[int]], n: int) -> np.ndarray:
    """The next ``n`` ids of ``[next, end)`` blocks (which must hold them), running on from one block
    into the next; used-up blocks are dropped. The client and the daemon both consume a connection's
    leases with this, so they agree on every add's ids."""
    parts, left = [], n
    while left:
        block = blocks[0]
        k = min(left, block[1] - block[0])
        parts.append(np.arange(block[0], block[0] + k, dtype=np.int64))
        block[0] += k
        left -= k
        if block[0] == block[1]:
            blocks.popleft()
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Leases:
    """One connection's unused leased ids, as ``[next, end)`` blocks in the order they were granted."""

    def __init__(self) -> None:
        self._blocks: deque[list[int]] = deque()
        self._memory: CarouselMemory | None = None

    def held(self) -> int:
        """Leased ids not used yet."""
        return sum(end - nxt for nxt, end in self._blocks)

    def grant(self, first: int, n: int, memory: CarouselMemory) -> None:
        """The memory handed out ``[first, first + n)`` to this connection."""
        self._memory = memory
        self._blocks.append([first, first + n])

    def take(self, first: object, n: int) -> np.ndarray:
        """The ids of an add of ``n`` samples that says its first id is ``first``: the next ``n``
        leased ids, which must begin at ``first``. Refused (nothing taken) otherwise."""
        if not isinstance(first, int) or isinstance(first, bool):
            raise RequestError("input", f"first must be an int, got {type(first).__name__}")
        if not self._blocks or self._blocks[0][0] != first:
            expected = self._blocks[0][0] if self._blocks else None
            raise RequestError("input", f"an add naming first id {first} on a connection whose next leased id is "
                                        f"{expected}: ids come from LEASE, in order")
        if n > self.held():
            raise RequestError("input", f"an add of {n} samples on a connection holding {self.held()} leased ids")
        return consume(self._blocks, n)

    def release(self) -> None:
        """Give the unused ids back to the memory: the latest block first, so consecutive blocks at
        the top of the id range all go back."""
        memory, self._memory = self._memory, None
        blocks, self._blocks = self._blocks, deque()
        if memory is None or memory._closed:
            return
        for nxt, end in reversed(blocks):
            memory.release_ids(nxt, end)
