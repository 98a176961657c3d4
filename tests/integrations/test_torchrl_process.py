"""CarouselStorage's files, locks and processes (issue 23, items 7 and 8): a storage lets go of its
store when collected, a failed load leaves it as it was, a lock error names the right holder, a
buffer travels to other processes (pickled as its folder), and a writer killed mid-extend loses no
acknowledged transition -- real stores on disk, real processes."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pytest
import torch

torchrl = pytest.importorskip("torchrl", reason="torchrl is not installed (pip install 'carousel[torchrl]')")
from tensordict import TensorDict  # noqa: E402
from torchrl.data import LazyTensorStorage, ReplayBuffer  # noqa: E402

from carousel.integrations.torchrl import CarouselStorage  # noqa: E402
from storage_backends import StoreLockedError, open_store  # noqa: E402


def steps(start: int, n: int) -> TensorDict:
    i = torch.arange(start, start + n)
    return TensorDict({"obs": i[:, None].float().repeat(1, 3), "action": i % 4}, batch_size=[n])


def store_url(storage: CarouselStorage) -> str:
    return f"lmdb://{storage.path / storage._gen / 'store'}"


# ---- item 7: locks and failures -------------------------------------------------------------------

def test_a_collected_storage_lets_go_of_its_store(tmp_path):
    storage = CarouselStorage(10, tmp_path / "rb")
    rb = ReplayBuffer(storage=storage, batch_size=2)
    rb.extend(steps(0, 4))
    url = store_url(storage)
    with pytest.raises(StoreLockedError):
        open_store(url)  # held while the storage lives
    del rb, storage
    gc.collect()
    open_store(url).close()  # the writer lock went with the storage: no close() needed
    again = CarouselStorage(10, tmp_path / "rb")
    assert len(again) == 4 and again.get(3)["obs"][0].item() == 3
    again.close()


def test_the_lock_error_names_this_process_as_this_process(tmp_path):
    storage = CarouselStorage(10, tmp_path / "rb")
    storage.set(torch.arange(2), steps(0, 2))
    with pytest.raises(StoreLockedError) as err:
        open_store(store_url(storage))
    message = str(err.value)
    assert "another process" not in message and f"this process (pid {os.getpid()}" in message
    storage.close()


@pytest.mark.parametrize("bad", ["too many positions", "missing snapshot", "missing folder", "broken snapshot"])
def test_a_failed_load_changes_nothing(tmp_path, bad):
    storage = CarouselStorage(10, tmp_path / "rb")
    rb = ReplayBuffer(storage=storage, batch_size=2)
    rb.extend(steps(0, 6))
    before = storage.get(torch.arange(6))
    if bad == "too many positions":
        big = LazyTensorStorage(50)
        big.set(torch.arange(20), steps(0, 20))
        with pytest.raises(ValueError, match="positions"):
            storage.load_state_dict(big.state_dict())
    elif bad == "missing snapshot":
        with pytest.raises(FileNotFoundError):
            storage.loads(tmp_path / "nothing-here")
    elif bad == "missing folder":
        state = {**storage.state_dict(), "carousel": {**storage.state_dict()["carousel"],
                                                      "path": str(tmp_path / "gone")}}
        del state["_storage"]
        with pytest.raises(FileNotFoundError):
            storage.load_state_dict(state)
    else:  # a snapshot whose store was removed after the dump
        rb.dumps(tmp_path / "ckpt")
        for path in sorted((tmp_path / "ckpt" / "storage").glob("gen-*/store/*.mdb")):
            path.unlink()
        with pytest.raises(Exception):
            rb.loads(tmp_path / "ckpt")
    assert len(storage) == 6 and (storage.get(torch.arange(6)) == before).all()
    rb.extend(steps(100, 1))  # still its own store, still writable
    assert storage.get(6)["obs"][0].item() == 100
    storage.close()
    reopened = CarouselStorage(10, tmp_path / "rb")  # and what is on disk says the same
    assert len(reopened) == 7 and reopened.get(6)["obs"][0].item() == 100
    reopened.close()


def test_a_generation_a_crash_left_behind_is_removed_on_reopen(tmp_path):
    storage = CarouselStorage(10, tmp_path / "rb")
    storage.set(torch.arange(3), steps(0, 3))
    storage.close()
    orphan = tmp_path / "rb" / "gen-7" / "store"  # as if a crash hit a load before its meta rename
    orphan.mkdir(parents=True)
    (orphan / "data.mdb").write_bytes(b"partial")
    reopened = CarouselStorage(10, tmp_path / "rb")
    assert reopened.get(2)["obs"][0].item() == 2 and not (tmp_path / "rb" / "gen-7").exists()
    reopened.close()


# ---- item 8: buffers in other processes ---------------------------------------------------------

def test_torch_save_reopens_in_a_fresh_process(tmp_path):
    storage = CarouselStorage(10, tmp_path / "rb")
    rb = ReplayBuffer(storage=storage, batch_size=3)
    rb.extend(steps(0, 5))
    torch.save(rb, tmp_path / "rb.pt")
    storage.close()  # the writer lets go; the process that loads the pickle becomes the writer
    child = textwrap.dedent(f"""
        import torch
        import carousel.integrations.torchrl
        rb = torch.load({str(tmp_path / 'rb.pt')!r}, weights_only=False)
        assert len(rb) == 5 and rb.sample()["obs"].shape == (3, 3)
        rb.extend(rb[:2])  # positions 5 and 6
        print(len(rb))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "7"
    again = CarouselStorage(10, tmp_path / "rb")
    assert len(again) == 7 and again.get(torch.arange(7))["obs"][:, 0].tolist() == [0, 1, 2, 3, 4, 0, 1]
    again.close()


def _worker(rb: ReplayBuffer, queue: mp.Queue, try_write: bool) -> None:
    try:
        batch = rb.sample()
        rows_agree = bool((batch["action"] == batch["obs"][:, 0].long() % 4).all())
        write = None
        if try_write:
            refused = []
            # (Not rb.empty(): TorchRL resets the writer's shared cursor before it asks the storage.)
            for attempt in (lambda: rb.extend(steps(500, 1)), rb.storage._empty,
                            lambda: rb.storage.load_state_dict(rb.storage.state_dict())):
                try:
                    attempt()
                except StoreLockedError as exc:
                    refused.append(str(exc))
            write = f"refused: {refused[0]}" if len(refused) == 3 else f"only {len(refused)} of 3 refused"
        queue.put((len(rb), rows_agree, rb[:]["obs"][:, 0].tolist(), write))
    except BaseException as exc:  # report, so the parent fails with the reason instead of a timeout
        queue.put(repr(exc))


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["reference", "carousel"])
def test_a_buffer_given_to_a_worker_process(tmp_path, method, kind):
    storage = LazyTensorStorage(10) if kind == "reference" else CarouselStorage(10, tmp_path / "rb")
    rb = ReplayBuffer(storage=storage, batch_size=4)
    rb.extend(steps(0, 6))
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    # TorchRL's own storage writes in a worker only after rb.share() (else the worker's write lands
    # in its copy while the writer's shared cursor moves in both); ours refuses, so only ours tries.
    proc = ctx.Process(target=_worker, args=(rb, queue, kind == "carousel"))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and not isinstance(result, str), result
    length, rows_agree, rows, write = result
    assert length >= 6 and rows_agree and rows[:6] == [0, 1, 2, 3, 4, 5]  # the worker reads the parent's data
    if kind == "carousel":
        # One writer per store (its flock keeps it crash-safe): a worker reads, and its writes
        # (extend, emptying, loading a state) are refused, saying why, before anything moved.
        assert write.startswith("refused") and "one writer per store" in write
    assert len(rb) == 6
    rb.extend(steps(100, 1))  # the parent still writes, at the next position
    assert rb[6]["obs"][0].item() == 100 and len(rb) == 7
    if kind == "carousel":
        storage.close()


def _sample_in_worker(rb: ReplayBuffer, queue: mp.Queue) -> None:
    try:
        queue.put(("sampled", tuple(rb.sample()["obs"].shape)))
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the parent checks
        queue.put((type(exc).__name__, str(exc)))


@pytest.mark.parametrize("kind", ["zarr", "flat"])
def test_a_zarr_or_flat_storage_is_not_read_by_another_process_while_its_writer_holds_it(tmp_path, kind):
    # Unlike LMDB, whose readers never block its writer, these stores lock readers out while a
    # writer holds them (the module docstring says so and points to kind="lmdb"): refused, naming why.
    storage = CarouselStorage(10, tmp_path / "rb", kind=kind)
    rb = ReplayBuffer(storage=storage, batch_size=4)
    rb.extend(steps(0, 6))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_sample_in_worker, args=(rb, queue))
    proc.start()
    outcome, detail = queue.get(timeout=120)
    proc.join(timeout=60)
    assert outcome == "StoreLockedError" and "one writer per store" in detail, detail
    storage.close()
    proc = ctx.Process(target=_sample_in_worker, args=(rb, queue))  # the writer gone: the worker reads
    proc.start()
    assert queue.get(timeout=120) == ("sampled", (4, 3))
    proc.join(timeout=60)


_EXTENDER = textwrap.dedent("""
    import sys
    import torch
    from tensordict import TensorDict
    from torchrl.data import ReplayBuffer
    from carousel.integrations.torchrl import CarouselStorage

    rb = ReplayBuffer(storage=CarouselStorage(int(sys.argv[3]), sys.argv[1], kind=sys.argv[2]), batch_size=4)
    done = 0
    while True:
        i = torch.arange(done, done + 16)
        rb.extend(TensorDict({"obs": i[:, None].float().repeat(1, 3), "action": i % 4}, batch_size=[16]))
        done += 16
        print(done, flush=True)  # acknowledged: extend() returned
""")


@pytest.mark.parametrize("size", [100_000, 400])
@pytest.mark.parametrize("kind", ["lmdb", "zarr", "flat"])
def test_sigkill_mid_extend_loses_no_acknowledged_transition(tmp_path, kind, size):
    # A writer killed at a random moment (no close, no flush): reopened, the storage holds every
    # transition whose extend() had returned, each with its own data, and no damaged record. At
    # size 400 the ring has gone round: every write replaces live positions (a row store writes
    # a new row, then frees the old one), and each position holds its newest transition.
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", _EXTENDER, str(tmp_path / "rb"), kind, str(size)],
                            stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    acked = 0
    deadline = time.monotonic() + 120
    while acked < 800 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    assert acked >= 800, f"the writer stopped early (exit {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()  # what it printed before the signal landed: acknowledged too
    proc.wait(30)
    acked = max([acked, *map(int, rest.split())])
    storage = CarouselStorage(size, tmp_path / "rb", kind=kind)
    held = min(acked, size)
    assert len(storage) >= held
    got = storage.get(torch.arange(held))  # a damaged record would raise here
    step = got["obs"][:, 0].long()
    assert (got["action"] == step % 4).all() and (got["obs"] == got["obs"][:, :1]).all()  # one transition a row
    if size >= acked:
        assert step.tolist() == list(range(acked))
    else:  # position p: the newest acknowledged step written there, or one of the extend cut short
        newest = torch.arange(size) + (acked - 1 - torch.arange(size)) // size * size
        assert ((step == newest) | ((step == newest + size) & (step < acked + 16))).all()
    storage.close()
