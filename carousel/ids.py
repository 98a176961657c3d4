"""Sample ids that are never reused, not even after a crash.

An id names one sample forever: a trainer logs it, a DER++ logit table is keyed by it. Ids are
handed out in order from a counter, and what makes them durable is a *reservation*: the file
``<state_dir>/ids-reserved`` holds a bound below which every id handed out so far lies. Before the
counter passes the bound, a new bound one ``block`` further is written (temp file, fsync, rename,
fsync of the folder: a crash leaves the old bound or the new one, never neither). On open the
counter starts at the reserved bound, or above it where the tiers or the checkpoint know of a
larger id. So a crash skips the unused rest of a block -- ids a restarted memory never hands
out -- and never repeats an id that an ``add`` returned but write-behind had not yet stored.

Writing a bound costs an fsync (0.5-12 ms on the test machine's disk, more on an SD card), once
per block and ahead of need: when fewer than half a block are left, a background thread reserves
the next block while ``add`` goes on. That thread lives as long as the allocator is open and is
woken for each block: ``add`` never starts a thread (``Thread.start`` waits until the new
thread runs: on busy cores a scheduler slice, 2-5 ms, once every 64 adds of 32). A block is
4,096 ids, or half a second of ids at the rate they were handed out lately (at most 2**18), so
the half block left when the next reservation starts lasts far longer than its fsync, however
fast samples come. ``add`` waits for the disk only
for the first block after an open and for an ``add`` of more than half a block. A checkpoint (and
so a clean close) writes the bound back down to the counter, so only a crash after the last
checkpoint leaves a gap in the ids: at most a block plus one ``add``'s worth -- half a second of
ingest at most -- which the catalog holds as empty rows (~50 bytes an id).

>>> import tempfile
>>> from pathlib import Path
>>> state = Path(tempfile.mkdtemp())
>>> ids = IdAllocator.open(state, floor=0, block=100, max_block=100)
>>> ids.reserve(10); ids.take(10), ids.take(5), read_bound(state)   # bound written ahead of use
(0, 10, 110)
>>> again = IdAllocator.open(state, floor=3)   # after a crash: the 15 ids given out are skipped
>>> again.next_id
110
>>> again.take(3), again.settle(), IdAllocator.open(state, floor=0).next_id  # settled: nothing skipped
(110, None, 113)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .sched import Yielding

__all__ = ["DEFAULT_BLOCK", "IDS_FILE", "MAX_BLOCK", "IdAllocator", "read_bound"]

log = logging.getLogger("carousel.ids")

IDS_FILE = "ids-reserved"
# Ids reserved per fsync, at least. A crash skips up to a block, and the catalog keeps a row per
# skipped id: 4096 ids are ~200 KB, so a memory that crashes a thousand times holds ~200 MB of gaps.
DEFAULT_BLOCK = 4096
# At most: 2**18 ids (~12 MB of rows) is half a second at 500 k samples/s.
MAX_BLOCK = 2**18
LEAD_S = 0.5  # a block lasts this long at the recent rate: half of it hides the next fsync


def read_bound(state_dir: Path) -> int:
    """The reserved bound in ``state_dir`` (0 without one). An unreadable file is logged and read as 0:
    the tiers and the checkpoint still bound the ids, as they did before reservations existed."""
    path = state_dir / IDS_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring an unreadable id reservation %s: %s", path, exc)
        return 0
    if not text.endswith("\n") or not text[:-1].isdigit():
        log.warning("ignoring a malformed id reservation %s: %r", path, text[:64])
        return 0
    return int(text)


def _write_bound(state_dir: Path, bound: int) -> None:
    """Replace the reserved bound durably: temp file, fsync, rename, fsync of the folder."""
    if not state_dir.is_dir():
        state_dir.mkdir(parents=True, exist_ok=True)
        _fsync_dir(state_dir.parent)  # the new folder's own entry
    tmp = state_dir / (IDS_FILE + ".tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(f"{bound}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, state_dir / IDS_FILE)
    _fsync_dir(state_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IdAllocator:
    """Hands out consecutive sample ids, never one twice; ``state_dir=None`` (a RAM-only memory,
    which keeps nothing across a restart) reserves nothing.

    Thread-safe. :meth:`reserve` makes sure ``n`` ids are durably reserved (the only call that may
    wait for the disk); :meth:`take` hands them out and reserves synchronously only if another
    caller used the room meanwhile. The memory calls :meth:`reserve` before it takes the catalog's
    lock and :meth:`take` under it, so the swap engine never waits for an fsync.
    """

    def __init__(self, state_dir: Path | None, start: int, block: int = DEFAULT_BLOCK,
                 max_block: int = MAX_BLOCK) -> None:
        if not 1 <= block <= max_block:
            raise ValueError(f"need 1 <= block <= max_block, got {block} and {max_block}")
        self._dir = state_dir
        self._min_block, self._max_block = block, max_block
        self._block = block  # the current block: follows the rate ids are taken at
        self._mark: tuple[int, float] | None = None  # (next id, time) at the last reservation
        self._cond = threading.Condition()
        self._next = start
        self._bound = start  # nothing reserved beyond the start until the first reserve()
        self._writing = False  # a background reservation is in flight
        self._want: int | None = None  # the bound the reserver thread is asked to write next
        self._stopping = False  # close(): the reserver thread ends
        self._thread: threading.Thread | None = None  # the reserver, started with the first block
        self.last_error: BaseException | None = None  # of the last background reservation

    @classmethod
    def open(cls, state_dir: Path | None, floor: int, block: int = DEFAULT_BLOCK,
             max_block: int = MAX_BLOCK) -> IdAllocator:
        """An allocator starting at ``floor`` (the smallest id the tiers and checkpoint leave free)
        or at the bound reserved in ``state_dir``, whichever is larger."""
        start = floor if state_dir is None else max(floor, read_bound(state_dir))
        return cls(state_dir, start, block, max_block)

    @property
    def next_id(self) -> int:
        """The next id :meth:`take` hands out: every id below it was handed out or skipped."""
        return self._next

    def reserve(self, n: int) -> None:
        """Make sure the next ``n`` ids are durably reserved; raises ``OSError`` if the bound
        cannot be written (nothing is handed out then)."""
        with self._cond:
            self._make_room_locked(n)

    def take(self, n: int) -> int:
        """Hand out ``n`` consecutive ids; returns the first. Reserves the next block in the
        background when less than half a block is left."""
        with self._cond:
            self._make_room_locked(n)
            first = self._next
            self._next += n
            if (self._dir is not None and not self._writing
                    and self._bound - self._next < self._block // 2):
                self._writing = True
                self._resize_locked()
                self._want = self._next + self._block
                self._start_reserver_locked()  # started already, unless closed since
                self._cond.notify_all()
            return first

    def give_back(self, lo: int, hi: int) -> bool:
        """Ids ``[lo, hi)`` were handed out but never used (a daemon client's lease, left unused):
        if they are the last ones handed out, :meth:`take` hands them out again; otherwise the
        counter cannot take them (the memory keeps them to lease again). Returns whether it did."""
        with self._cond:
            if lo < hi == self._next:
                self._next = lo
                return True
            return False

    def settle(self) -> None:
        """Write the bound back down to :attr:`next_id`, so a crash from here on, before the next
        :meth:`take`, skips no ids (safe at any time: every id handed out lies below it). Costs
        an fsync now and one at the next :meth:`reserve`; the memory settles when it checkpoints.
        A failure is logged: the old bound stands, which skips ids but reuses none."""
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            if self._dir is None or self._bound == self._next:
                return
            try:
                _write_bound(self._dir, self._next)
            except OSError as exc:
                log.warning("could not give back reserved sample ids: %r", exc)
                return
            self._bound = self._next

    def close(self) -> None:
        """Wait for a background reservation to finish, and end the reserver thread (a later
        :meth:`take` starts it again)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            thread = self._thread
            if thread is not None:
                self._stopping = True
                self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _start_reserver_locked(self) -> None:
        """Start the reserver thread unless it runs (caller holds the lock): from a call that
        waits for the disk anyway (the first reservation) where it can."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._reserver, name="carousel-ids", daemon=True)
            self._thread.start()

    def _reserver(self) -> None:
        """The reserver thread: write each bound :meth:`take` asks for, until :meth:`close`."""
        policy = Yielding()
        while True:
            policy.keep_up()  # SCHED_BATCH while the trainer's steps are short: woken by its add, it
            with self._cond:  # must not take the trainer's core
                self._cond.wait_for(lambda: self._want is not None or self._stopping)
                if self._want is None:
                    # Under the lock: a take() from here on starts a new reserver.
                    self._thread, self._stopping = None, False
                    return
                bound, self._want = self._want, None
            self._extend(bound)

    def _make_room_locked(self, n: int) -> None:
        if self._dir is None:
            return
        if self._next + n > self._bound:
            self._start_reserver_locked()  # this call waits for an fsync below anyway
        while self._next + n > self._bound:
            if self._writing:  # the background reservation may suffice: wait for it
                self._cond.wait()
                continue
            self._resize_locked()
            bound = self._next + n + self._block
            _write_bound(self._dir, bound)  # under the lock: the other takers need this bound too
            self._bound = bound

    def _resize_locked(self) -> None:
        """Set the block to ``LEAD_S`` seconds of ids at the rate since the last reservation."""
        now = time.monotonic()
        if self._mark is not None:
            used, elapsed = self._next - self._mark[0], now - self._mark[1]
            want = int(used * LEAD_S / max(elapsed, 1e-6))
            self._block = min(self._max_block, max(self._min_block, want))
        self._mark = (self._next, now)

    def _extend(self, bound: int) -> None:
        """Background: reserve up to ``bound``. A failure is kept; the next take() that needs the
        room writes synchronously and raises it to its caller."""
        try:
            _write_bound(self._dir, bound)
        except BaseException as exc:  # noqa: BLE001 - handed on through last_error and the next take()
            with self._cond:
                self.last_error = exc
                self._writing = False
                self._cond.notify_all()
            log.warning("reserving sample ids up to %d failed: %r", bound, exc)
            return
        with self._cond:
            self._bound = max(self._bound, bound)
            self.last_error = None
            self._writing = False
            self._cond.notify_all()
