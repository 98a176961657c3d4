"""A deterministic memory served by a daemon gives the same run as in-process, call for call: the
client's ``end_step()`` travels with its next request, batches are drawn when asked (no ring), and
two daemons on the same calls and seed replay the same samples in the same order."""

from __future__ import annotations

import carousel
from carousel import CarouselMemory
from tests.carousel.test_deterministic import config, run, state
from tests.daemon.harness import start_daemon


def _served(tmp_path, name: str):
    cfg = config(tmp_path, name)
    return start_daemon(tmp_path, name=name, memory=cfg["memory"], swap=cfg["swap"], tiers=cfg["tiers"],
                        write_behind=cfg["write_behind"], metrics=False)


def test_through_the_daemon_as_in_process(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, "local")) as mem:
        local = run(mem)
        mem.flush()
        local_state = state(mem)
    for name in ("d1", "d2"):
        d = _served(tmp_path, name)
        try:
            with carousel.connect(d.socket) as c:
                assert c.deterministic
                assert run(c) == local, f"{name}: the daemon replayed other samples than the memory in-process"
                c.flush()  # as the memory in-process was (a flush keeps the tiers within capacity)
                st = c.stats()
                assert (st["swapped_in"], st["swapped_out"], st["evicted"]) == \
                    (local_state["in"], local_state["out"], local_state["evicted"])
                assert len(d.shm_segments()) == 1, "a ring was made for a deterministic memory (the doorbell only)"
        finally:
            d.close()
