"""Fault injection by wrapping a store: slow reads, failures at the Nth call, a full store."""

from __future__ import annotations

import threading
import time

from storage_backends import SampleStore, StoreError, StoreFullError


class FaultyStore:
    """Delegates to ``inner``; ``read_delay_s`` slows every read, ``fail_puts`` makes the next N
    ``put_many`` calls raise ``StoreFullError``, ``fail_reads`` the next N reads raise ``StoreError``."""

    def __init__(self, inner: SampleStore, read_delay_s: float = 0.0) -> None:
        self.inner = inner
        self.read_delay_s = read_delay_s
        self.fail_puts = 0
        self.fail_reads = 0
        self.reads = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def _read(self) -> None:
        with self._lock:
            self.reads += 1
            fail = self.fail_reads > 0
            self.fail_reads -= fail
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        if fail:
            raise StoreError("injected read failure")

    def get_many(self, ids):
        self._read()
        return self.inner.get_many(ids)

    def get_chunk(self, index):
        self._read()
        return self.inner.get_chunk(index)

    def put_many(self, ids, fields):
        with self._lock:
            fail = self.fail_puts > 0
            self.fail_puts -= fail
        if fail:
            raise StoreFullError("injected: no space left on device")
        return self.inner.put_many(ids, fields)
