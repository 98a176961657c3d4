"""Where a store's reads run as coroutines (the files store, an adopted image folder).

On the loop the store's user offered (:meth:`SampleStore.bind_loop`: the swap engine's, whose I/O
thread then waits here while the loop runs many reads at once), when it runs and the caller is not
on it; else on a loop thread the store owns, started on first use (recovery, the writer thread,
tests, the CLI). A bound loop that stops with reads of ours queued does not strand the caller: it
looks every ``wait_s`` and, the loop gone, closes that coroutine (it never runs: no "never
awaited" warning) and reads again on its own loop -- reads only, so running them again is safe.

``pool()`` is the thread pool the reads' blocking calls run on, ``threads`` of them: the loop's
default executor is sized for the cores and would cap the reads in flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class LoopRunner:
    """A store's loop for its reads: the bound one, or its own; see the module docstring."""

    def __init__(self, name: str, threads: int, wait_s: float = 0.5) -> None:
        self._name, self._threads, self._wait_s = name, threads, wait_s
        self._lock = threading.Lock()
        self.bound: asyncio.AbstractEventLoop | None = None
        self.own: asyncio.AbstractEventLoop | None = None  # started on first use
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run on ``loop`` from now on (None: on our own)."""
        self.bound = loop

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=f"{self._name}-io")
            return self._pool

    def _own(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self.own is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name=f"{self._name}-loop", daemon=True)
                thread.start()
                started.wait()
                self.own, self._thread = loop, thread
            return self.own

    def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """``make()`` run to its result on the bound loop (from another thread), else on our own.
        Raises ``RuntimeError`` when called on our own loop (it would wait on itself)."""
        loop = self.bound
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is not None and loop is not here and loop.is_running():
            coro = make()
            try:
                fut = asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # closed meanwhile: our own loop serves
                coro.close()
                fut = None
            while fut is not None:
                try:
                    return fut.result(self._wait_s)
                except TimeoutError:
                    if not loop.is_running():  # stopped with our reads queued: read again (reads only)
                        fut.cancel()
                        coro.close()
                        break
        own = self._own()
        if here is own:
            raise RuntimeError(f"{self._name}: a blocking read called on the store's own reader loop")
        return asyncio.run_coroutine_threadsafe(make(), own).result()

    def close(self) -> None:
        """Stop our loop and pool (waiting for what runs on them) and forget the bound loop."""
        with self._lock:
            loop, thread, pool = self.own, self._thread, self._pool
            self.own = self._thread = self._pool = None
            self.bound = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        if pool is not None:
            pool.shutdown(wait=True)
