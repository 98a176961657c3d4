"""``carousel.spawn``: a memory served by a private daemon, a child process; real processes only.

What it promises (carousel/daemon/spawn.py): the same calls as the in-process memory; ``close()``
stops the daemon cleanly (every add durable) and removes its private folder; however the trainer
ends (SIGKILL included) the daemon shuts down cleanly by itself; a daemon that died makes the next
call fail at once, naming why; a forked or pickled copy never stops it; wrong config before any
process starts, a daemon that cannot start with its reason.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import carousel
from carousel import (
    CarouselMemory,
    ConfigError,
    MemoryClient,
    SpawnedDaemonExited,
    SpawnedMemory,
)
from storage_backends import open_store

ROOT = Path(__file__).resolve().parents[2]


def _config(tier: Path, em: int = 32) -> dict:
    return {"memory": {"em_size": em, "sample_shape": [3, 4, 4], "seed": 0},
            "swap": {"ratio": 0.5, "workers": 1},
            "tiers": [{"kind": "lmdb", "path": str(tier), "capacity": 100_000, "sync": False}]}


def _batch(n: int, task: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g), torch.full((n,), 2 * task) + \
        torch.randint(0, 2, (n,), generator=g)


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` (not our child) is gone, or a zombie, within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _recovered(tier: Path) -> torch.Tensor:
    """What survived, in id order: the tier as a fresh in-process open recovers it (which must
    succeed), then every stored sample read back."""
    CarouselMemory.from_dict(_config(tier)).close()
    with open_store(f"lmdb://{tier}") as store:
        ids = np.sort(np.asarray(store.ids()))
        return torch.from_numpy(store.get_many(ids)["x"])


def test_spawned_memory_serves_swaps_and_close_makes_every_add_durable(tmp_path):
    tier = tmp_path / "flash"
    mem = carousel.spawn(_config(tier))
    assert isinstance(mem, SpawnedMemory) and isinstance(mem, MemoryClient)
    workdir, pid = mem.workdir, mem.process.pid
    assert workdir.stat().st_mode & 0o777 == 0o700
    xs = []
    for task in range(3):
        x, y = _batch(64, task, task)
        ids = mem.add(x, y, task=task)
        assert ids.tolist() == list(range(64 * task, 64 * (task + 1)))
        xs.append(x)
    for _ in range(30):
        b = mem.sample(8)
        assert b.x.shape == (8, 3, 4, 4) and b.x.dtype == torch.uint8
        assert torch.equal(b.x, torch.cat(xs)[b.ids])  # each replayed sample is the one added under its id
        mem.observe(b.ids, logits=torch.randn(8, 6))
    stats = mem.stats()
    assert stats["added"] == 192
    mem.close()  # no flush: close stops the daemon cleanly, which flushes
    assert mem.process.returncode == 0
    assert not workdir.exists()
    assert _gone(pid, 1.0)
    mem.close()  # idempotent
    assert torch.equal(_recovered(tier), torch.cat(xs))


def test_a_toml_path_works_like_the_dict_and_the_daemon_table_reaches_the_daemon(tmp_path):
    toml = tmp_path / "memory.toml"
    toml.write_text('[memory]\nem_size = 16\nsample_shape = [3, 4, 4]\n'
                    '[[tiers]]\nkind = "lmdb"\npath = "flash"\ncapacity = 1000\n')  # relative: to the file
    with carousel.spawn(toml, daemon={"ring_slots": 3, "log_level": "debug"}) as mem:
        x, y = _batch(16, 0, 0)
        mem.add(x, y, task=0)
        mem.flush()
        profile = (mem.workdir / "profile.toml").read_text()
        assert "ring_slots = 3" in profile and str(tmp_path / "flash") in profile
        assert '"debug"' in profile and "DEBUG" in mem.log_path.read_text().upper()
    assert (tmp_path / "flash").is_dir()


def test_wrong_config_fails_before_any_process_and_a_daemon_that_cannot_start_says_why(tmp_path):
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    with pytest.raises(ConfigError, match="ring_slot"):
        carousel.spawn(_config(tmp_path / "flash"), daemon={"ring_slot": 3})
    with pytest.raises(ConfigError, match="em_size"):
        carousel.spawn({"memory": {"em_size": -1, "sample_shape": [2]}})
    assert set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before == set()  # no folder left behind
    with pytest.raises(ValueError, match="too deep"):
        carousel.spawn(_config(tmp_path / "flash"), workdir=tmp_path / ("d" * 120))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SpawnedDaemonExited, match="could not start.*a-file"):
        carousel.spawn(_config(blocker / "flash"), workdir=tmp_path / "w")
    assert (tmp_path / "w" / "daemon.log").exists()  # kept: it says why


def test_a_daemon_killed_under_the_trainer_fails_the_next_call_at_once(tmp_path):
    mem = carousel.spawn(_config(tmp_path / "flash"))
    x, y = _batch(32, 0, 0)
    mem.add(x, y, task=0)
    mem.flush()
    os.kill(mem.process.pid, signal.SIGKILL)
    mem.process.wait(10)
    t0 = time.monotonic()
    with pytest.raises(SpawnedDaemonExited, match="SIGKILL"):
        for _ in range(3):  # the first call may still find the broken connection; the next reconnects
            mem.stats()
    assert time.monotonic() - t0 < 5  # not reconnect_s (30 s)
    with pytest.raises(SpawnedDaemonExited, match="status -9"):
        mem.close()
    assert mem.log_path.exists()  # kept: the folder of a daemon that did not stop cleanly
    shutil.rmtree(mem.workdir)  # (a test leaves nothing in the temporary folder)
    assert torch.equal(_recovered(tmp_path / "flash"), x)  # flushed before the kill: recovered


_TRAINER = textwrap.dedent("""
    import os, pickle, sys, time, torch, carousel
    cfg = {"memory": {"em_size": 32, "sample_shape": [3, 4, 4], "seed": 0}, "swap": {"ratio": 0.5},
           "tiers": [{"kind": "lmdb", "path": sys.argv[1], "capacity": 100000, "sync": False}]}
    mem = carousel.spawn(cfg)
    g = torch.Generator().manual_seed(0)
    mem.add(torch.randint(0, 256, (48, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(48) % 2, task=0)
    if sys.argv[2] == "flush":
        mem.flush()
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:  # a forked worker: its own connection; ending it (atexit runs) stops nothing
            assert mem.stats()["added"] == 48
            mem.close()
            del mem
            sys.exit(0)
        assert os.waitpid(child, 0)[1] == 0
        assert mem.process.poll() is None, "the forked child stopped the daemon"
        assert mem.sample(8).x.shape[0] == 8
        plain = pickle.loads(pickle.dumps(mem))
        assert type(plain) is carousel.MemoryClient and plain.stats()["added"] == 48
        plain.close()
        assert mem.process.poll() is None, "closing a pickled copy stopped the daemon"
    print(mem.process.pid, mem.workdir, flush=True)
    if sys.argv[2] == "flush":
        time.sleep(600)  # the test kills us here
    # "exit", "fork": return from the script without close(): the memory is closed at exit
""")


_STREAM = torch.randint(0, 256, (48, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _trainer(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "flash"), mode], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)


def test_a_sigkilled_trainer_leaves_no_daemon_behind(tmp_path):
    trainer = _trainer(tmp_path, "flush")
    try:
        pid, workdir = trainer.stdout.readline().split()
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(10)
        assert _gone(int(pid), 30), "the spawned daemon outlived its SIGKILLed trainer"
    finally:
        trainer.kill()
    log = (Path(workdir) / "daemon.log").read_text()
    assert "the parent process is gone" in log and "stopped cleanly" in log
    shutil.rmtree(workdir)  # a killed trainer's folder stays (nobody is left to remove it): the test does
    assert torch.equal(_recovered(tmp_path / "flash"), _STREAM)


@pytest.mark.parametrize("mode", ["exit", "fork"])
def test_a_trainer_that_ends_without_close_stops_its_daemon_cleanly(tmp_path, mode):
    """``exit``: the memory is closed at interpreter exit (its unflushed adds stored); ``fork``: a
    forked child using and closing it, and a pickled copy, leave the daemon serving."""
    trainer = _trainer(tmp_path, mode)
    out, _ = trainer.communicate(timeout=120)
    assert trainer.returncode == 0
    pid, workdir = out.split()
    assert _gone(int(pid), 30)
    assert not Path(workdir).exists()  # a clean stop removes the private folder
    assert torch.equal(_recovered(tmp_path / "flash"), _STREAM)  # never flushed by the trainer: the clean stop did


def test_pickled_spawned_memory_is_a_plain_client_of_the_same_daemon(tmp_path):
    with carousel.spawn(_config(tmp_path / "flash")) as mem:
        copy = pickle.loads(pickle.dumps(mem))
        try:
            assert type(copy) is MemoryClient and copy.address == mem.address
        finally:
            copy.close()
        assert mem.process.poll() is None


def test_serve_refuses_a_parent_fd_that_is_not_open(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text(f'[daemon]\nsocket_dir = "{tmp_path}/s"\nmetrics = ""\n[memory]\nem_size = 4\nsample_shape = [2]\n')
    done = subprocess.run([sys.executable, "-m", "carousel", "serve", "--config", str(toml), "--parent-fd", "987"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert "--parent-fd 987" in done.stderr and "Traceback" not in done.stderr


def test_a_second_spawn_on_the_same_tiers_is_refused_naming_the_writer(tmp_path):
    with carousel.spawn(_config(tmp_path / "flash")) as first:
        with pytest.raises(SpawnedDaemonExited, match=f"another process \\(pid {first.process.pid}\\)"):
            carousel.spawn(_config(tmp_path / "flash"), workdir=tmp_path / "second")
        assert first.stats()["added"] == 0  # the first one serves on


def test_the_child_runs_this_carousel_without_putting_site_packages_before_the_stdlib(monkeypatch):
    from carousel.daemon import spawn as spawn_module

    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert spawn_module._child_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT)]  # a checkout: first
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert spawn_module._child_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    monkeypatch.setattr(spawn_module.site, "getsitepackages", lambda: [str(ROOT)])  # as if installed there
    assert spawn_module._child_env()["PYTHONPATH"] == "/elsewhere"
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in spawn_module._child_env()
