"""Where in a connection's upload segment the next posted ``add`` writes its samples.

A posted add (docs/protocol.md, "Posting") does not wait for its reply, so the segment holds
several adds at once: each takes the next free region after the one before, wrapping to the
segment's start, and its region is free again once its reply has been read -- the daemon copies an
add's tensors out of the segment when it reads the frame, before it answers. Replies come in the
order the adds were sent, so the regions free in the order they were taken: a ring.

Pure bookkeeping, no I/O: the client asks :meth:`UploadRing.place` for an offset, reads replies
(each answered add: :meth:`release`) until one fits, and :meth:`reset` when the connection (and the
segment with it) is gone.
"""

from __future__ import annotations

from collections import deque


class UploadRing:
    """Regions of a ``size``-byte segment taken by adds not answered yet, oldest first."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self._taken: deque[tuple[int, int]] = deque()  # (start, end) in the order taken
        self._head = 0  # where the next region starts, unless it must wrap

    def __len__(self) -> int:
        """Regions taken and not released."""
        return len(self._taken)

    def place(self, nbytes: int) -> int | None:
        """The offset of a free region of ``nbytes``, now taken; None when none is free until
        older adds are answered (then read a reply, :meth:`release`, and ask again).

        Raises:
            ValueError: ``nbytes`` outside ``[1, size]`` (it would never fit).
        """
        if not 0 < nbytes <= self.size:
            raise ValueError(f"an upload of {nbytes} bytes does not fit a {self.size}-byte segment")
        if not self._taken:
            start = 0  # nothing in use: start over, the whole segment is free
        else:
            tail = self._taken[0][0]  # the oldest region still in use
            if self._head > tail:  # in use: [tail, head); free: [head, size) and [0, tail)
                start = self._head if self._head + nbytes <= self.size else 0
                if start == 0 and nbytes > tail:
                    return None
            else:  # wrapped: in use [tail, size) and [0, head); free: [head, tail)
                if self._head + nbytes > tail:
                    return None
                start = self._head
        self._taken.append((start, start + nbytes))
        self._head = start + nbytes
        return start

    def unplace(self) -> None:
        """Give back the region :meth:`place` took last (its add was never sent). The next region
        starts where it started: if it had wrapped, the free bytes at the segment's end wait until
        the older regions are released (never handed out twice)."""
        start, _ = self._taken.pop()
        self._head = start

    def release(self) -> None:
        """The oldest taken region is free again (its add was answered)."""
        self._taken.popleft()

    def reset(self) -> None:
        """Every region free (the segment is gone, or every add was answered)."""
        self._taken.clear()
        self._head = 0
