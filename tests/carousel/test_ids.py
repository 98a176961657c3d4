"""Sample ids are never reused, not even after a SIGKILL between an ``add`` and its flush
(RELIABILITY.md item 24: ``test_ids_are_never_reused_across_sigkill_rounds``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from carousel import CarouselMemory
from carousel.ids import DEFAULT_BLOCK, IDS_FILE, MAX_BLOCK, IdAllocator, read_bound
from tests.carousel import crash_adder

ROUNDS = 50


def config(tmp_path, **memory) -> dict:
    return {"memory": {"em_size": 16, "sample_shape": [8], **memory},
            "write_behind": {"queue_samples": 4096, "batch": 64},
            "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 1_000_000}]}


# ---- the allocator -------------------------------------------------------------------------------
def test_the_next_block_is_reserved_in_the_background_before_it_is_needed(tmp_path):
    ids = IdAllocator.open(tmp_path, floor=0, block=100, max_block=100)
    ids.reserve(10)
    assert read_bound(tmp_path) == 110  # written before a single id is handed out
    firsts = [ids.take(10) for _ in range(5)]
    assert firsts == [0, 10, 20, 30, 40]
    ids.take(10)
    ids.close()
    assert read_bound(tmp_path) == 110  # 50 left: half a block, nothing to do yet
    ids.take(10)  # 70 handed out, 40 left: under half a block, so the next block is reserved
    ids.close()  # waits for the background reservation
    assert read_bound(tmp_path) == 170
    for _ in range(20):  # in steady state the bound keeps ahead: take() never waits for the disk
        first = ids.take(10)
        ids.close()
        assert read_bound(tmp_path) >= first + 10 + 50
    assert ids.next_id == 270 and not list(tmp_path.glob("*.tmp"))


def _reservers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "carousel-ids"]


def test_take_wakes_one_long_lived_reserver_and_never_starts_a_thread(tmp_path):
    """``Thread.start`` waits until the new thread runs: on busy cores a scheduler slice in the
    trainer's ``add``. One reserver per open allocator, started by the first (synchronous)
    reservation, writes every later block; ``close`` ends it and a later take starts it again."""
    before = set(_reservers())
    ids = IdAllocator.open(tmp_path, floor=0, block=100, max_block=100)
    ids.reserve(10)  # the first block: written on the caller's thread, which also starts the reserver
    (reserver,) = set(_reservers()) - before
    for k in range(1, 11):  # ten more blocks, each reserved in the background by the same thread
        ids.take(100)
        deadline = time.monotonic() + 10
        while read_bound(tmp_path) < ids.next_id + 50 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert read_bound(tmp_path) >= ids.next_id + 50, k
        assert set(_reservers()) - before == {reserver}
    ids.close()
    assert not reserver.is_alive() and not set(_reservers()) - before
    ids.take(100)  # reopened use after close: a new reserver, and the bound still keeps ahead
    ids.close()
    assert read_bound(tmp_path) >= ids.next_id + 50 and not set(_reservers()) - before


def test_the_block_follows_the_rate_within_its_bounds(tmp_path):
    """Fast takes reserve bigger blocks (the next fsync stays hidden), never more than max_block."""
    ids = IdAllocator.open(tmp_path, floor=0, block=100, max_block=5000)
    for _ in range(3000):
        ids.take(10)
    ids.close()
    ahead = read_bound(tmp_path) - ids.next_id
    assert 100 < ahead <= 5000 + 10  # 30,000 ids in a few ms: blocks of far more than 100
    slow = IdAllocator.open(tmp_path / "slow", floor=0, block=100, max_block=5000)
    for _ in range(80):
        slow.take(1)
        time.sleep(0.01)  # < 100 ids/s: half a second of them is less than the minimum block
    slow.close()
    assert slow.next_id == 80 and read_bound(tmp_path / "slow") == 152  # reserved at id 52: 100 again


def test_a_restart_starts_at_the_reserved_bound_and_settle_gives_the_rest_back(tmp_path):
    ids = IdAllocator.open(tmp_path, floor=0, block=1000, max_block=1000)
    assert ids.take(7) == 0  # reserves up to 1007 on the way
    ids.close()
    assert IdAllocator.open(tmp_path, floor=3).next_id == 1007  # "crashed": the whole reservation is skipped
    assert IdAllocator.open(tmp_path, floor=5000).next_id == 5000  # the tiers know of larger ids
    again = IdAllocator.open(tmp_path, floor=0, block=1000, max_block=1000)
    assert again.take(3) == 1007
    again.settle()
    assert read_bound(tmp_path) == 1010 and IdAllocator.open(tmp_path, floor=0).next_id == 1010


@pytest.mark.parametrize("content", [b"", b"12", b"-5\n", b"x\n", b"\xff\xfe\n", b"1e9\n"])
def test_an_unreadable_reservation_is_ignored_with_a_warning(tmp_path, caplog, content):
    (tmp_path / IDS_FILE).write_bytes(content)
    assert IdAllocator.open(tmp_path, floor=42).next_id == 42
    assert "id reservation" in caplog.text


def test_a_ram_only_allocator_writes_nothing(tmp_path):
    ids = IdAllocator.open(None, floor=0, block=2, max_block=2)
    assert [ids.take(5) for _ in range(3)] == [0, 5, 10]
    ids.settle()
    ids.close()
    with CarouselMemory.from_dict({"memory": {"em_size": 4, "sample_shape": [8], "state_dir": str(tmp_path / "s")}}) \
            as mem:
        assert mem.add(np.zeros((3, 8), np.uint8), [0, 1, 2], 0).tolist() == [0, 1, 2]
    assert not (tmp_path / "s").exists()


# ---- through the memory --------------------------------------------------------------------------
def test_a_clean_close_or_a_checkpoint_skips_no_ids(tmp_path):
    cfg = config(tmp_path)
    with CarouselMemory.from_dict(cfg) as mem:
        assert mem.add(np.zeros((5, 8), np.uint8), np.arange(5), 0).tolist() == list(range(5))
        assert read_bound(tmp_path / "flash-state") == 5 + DEFAULT_BLOCK  # reserved ahead of use (the first block)
    assert read_bound(tmp_path / "flash-state") == 5  # given back at close
    with CarouselMemory.from_dict(cfg) as mem:
        assert mem.stats()["added"] == 5
        assert mem.add(np.zeros((2, 8), np.uint8), [0, 1], 0).tolist() == [5, 6]
        mem.checkpoint()
        assert read_bound(tmp_path / "flash-state") == 7


def test_a_failed_reservation_fails_the_add_and_changes_nothing(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state folder's parent should be")
    cfg = config(tmp_path, state_dir=str(blocker / "state"))
    mem = CarouselMemory.from_dict(cfg)
    try:
        with pytest.raises(OSError):
            mem.add(np.zeros((4, 8), np.uint8), np.arange(4), 0)
        st = mem.stats()
        assert st["added"] == 0 and st["pending_writes"] == 0 and mem.pool.filled() == 0 and mem.catalog.n == 0
        blocker.unlink()  # the disk problem goes away: the memory goes on
        assert mem.add(np.zeros((4, 8), np.uint8), np.arange(4), 0).tolist() == [0, 1, 2, 3]
    finally:
        mem.close()
    assert read_bound(blocker / "state") == 4


# ---- SIGKILL between add and flush, many rounds ----------------------------------------------------
def _logged(log_path) -> list[tuple[int, int, int]]:
    """``(seq, first id, n)`` per logged add of one round."""
    out = []
    for line in log_path.read_text().splitlines():
        assert line not in ("NONCONSECUTIVE", "DONE"), line
        seq, first, n = map(int, line.split())
        out.append((seq, first, n))
    return out


@pytest.mark.slow
def test_ids_are_never_reused_across_sigkill_rounds(tmp_path):
    """RELIABILITY.md item 24. 50 rounds: a real process opens the memory (recovering it from the
    last kill), adds batches and flushes now and then, and is SIGKILLed at a random moment. No id
    is ever handed out twice, and every id the memory holds afterwards names the sample that id
    was given for."""
    cfg = config(tmp_path)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.carousel.crash_adder"])  # carousel imported once, not per round
    rng = np.random.default_rng(24)
    logs = []
    for round_ in range(ROUNDS):
        log_path = tmp_path / f"round{round_}.log"
        log_path.touch()
        proc = ctx.Process(target=crash_adder.add_until_killed, args=(cfg, str(log_path), round_, round_))
        proc.start()
        deadline = time.monotonic() + 60
        while log_path.stat().st_size == 0:  # the kill timer starts at the first add: opening varies
            assert proc.is_alive() and time.monotonic() < deadline, f"round {round_}: the child never added"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL, f"round {round_}: exit code {proc.exitcode}"
        logs.append(_logged(log_path))

    given: dict[int, int] = {}  # id -> the token of the sample it was handed out for
    last_seq = []
    for round_, entries in enumerate(logs):
        assert entries, f"round {round_} logged no add"
        last_seq.append(entries[-1][0])
        for seq, first, n in entries:
            for i, id_ in enumerate(range(first, first + n)):
                assert id_ not in given, \
                    f"id {id_} handed out twice: for {crash_adder.split_token(given[id_])} and {(round_, seq, i)}"
                given[id_] = int(crash_adder.token_of(round_, seq, i))

    with CarouselMemory.from_dict(cfg) as mem:
        stored = np.sort(mem.tiers[0].store.ids())
        tokens = mem.tiers[0].store.get_many(stored)["x"].copy().view(np.int64).ravel()
        for id_, token in zip(stored.tolist(), tokens.tolist()):
            if id_ in given:
                assert token == given[id_], f"id {id_} holds {crash_adder.split_token(token)}, " \
                                            f"was given for {crash_adder.split_token(given[id_])}"
            else:  # an add that returned but was killed before its log line: the round's last add
                round_, seq, _ = crash_adder.split_token(token)
                assert seq == last_seq[round_] + 1, f"unlogged id {id_} holds {(round_, seq)}"
        lost = set(given) - set(stored.tolist())
        assert lost, "no round was killed with ids handed out but not yet stored: the test tested nothing"
        top = max(given)
        new = mem.add(np.zeros((3, 8), np.uint8), [0, 1, 2], 0).tolist()
        assert min(new) > top and len(mem.sample(16)) == 16
        # Each crash skips at most a block and an add: the catalog's rows stay bounded.
        assert mem.stats()["added"] <= top + 1 + 3 + ROUNDS * (MAX_BLOCK + 32)
