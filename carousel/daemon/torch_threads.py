"""Where torch runs in the daemon: off the main thread, with a fixed number of intra-op threads.

With GNU OpenMP (torch's CPU build), a main thread that has run a parallel op halves the speed of
parallel ops from every other thread, so the daemon opens its memories in a helper thread and its
request pool and ring filler set their own thread counts.
"""

from __future__ import annotations

import threading


def set_torch_threads(n: int) -> None:
    """Intra-op threads for torch ops run by the calling thread (OpenMP keeps this per thread)."""
    import torch
    torch.set_num_threads(n)


def off_main_thread(fn, *args):
    """Run ``fn`` in a short-lived thread. With GNU OpenMP (torch's CPU build), once the main
    thread has run a parallel op, parallel ops from any other thread run at half speed here (the
    ring filler's batch copy: 24 us instead of 15). So the daemon keeps torch off its main thread."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box.append((False, exc))
    t = threading.Thread(target=run, name="carousel-open")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value

