"""The runner end to end on generated data: every memory mode, the result file, compare, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from carousel import CarouselMemory
from carousel.config import ConfigError
from trainers import metrics
from trainers.compare import compare
from trainers.memories import MemorySpec, open_memory
from trainers.methods import Context, get_method
from trainers.models import MLP
from trainers.run import RunConfig, run
from trainers.streams import generated_stream

REPO = Path(__file__).resolve().parents[2]


def small(**kw) -> RunConfig:
    base = dict(benchmark="generated", method="er", memory="ram", em_size=40, tasks=3, progress=False,
                batch_size=16, replay_size=16)
    return RunConfig(**{**base, **kw})


def test_er_ram_run_learns_and_writes_result(tmp_path):
    result = run(small(out=str(tmp_path / "er")))
    saved = json.loads((tmp_path / "er" / "result.json").read_text())
    assert (tmp_path / "er" / "accuracy.png").stat().st_size > 1000
    for key in ("final_avg_accuracy", "task_il_accuracy", "forgetting", "bwt", "acc_matrix", "wall_time_s",
                "avg_incremental_accuracy"):
        assert key in saved
    a = np.array(result["acc_matrix"], dtype=float)
    assert a.shape == (3, 3) and np.isnan(a[0, 1]) and not np.isnan(a[2]).any()
    # generated classes are easy: the first task is learnt, and task-IL beats chance by far
    assert a[0, 0] > 90
    assert result["task_il_accuracy"] > 75
    # replay works: without it class-IL on old tasks would be ~0 after the last task
    assert np.mean(a[2, :2]) > 20
    assert set(result["wall_time_s"]) >= {"total", "train", "replay_sample", "eval"}
    assert result["memory"]["stats"]["added"] == sum(100 * 2 for _ in range(3))


def test_a_run_whose_memory_cannot_open_leaves_no_folder_behind(tmp_path, monkeypatch):
    system_tmp = tmp_path / "tmp"  # the run's working folder is made in the system's temporary folder
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    with pytest.raises(ConfigError, match="missing.toml"):
        run(small(memory="carousel", profile=str(tmp_path / "missing.toml")))
    assert list(system_tmp.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 0])
def test_carousel_mode_swaps_from_storage(tmp_path, workers):
    result = run(small(memory="carousel", swap_workers=workers))
    stats = result["memory"]["stats"]
    assert stats["swapped_in"] > 0, stats
    assert "lmdb" in result["memory"]["describe"]
    assert result["acc_matrix"][0][0] > 90


@pytest.mark.parametrize("daemon", [False, True])
def test_a_seed_gives_the_same_run_twice_in_deterministic_mode(daemon):
    """Deterministic swapping (the default): the same accuracy matrix for the same seed, also when
    the second run reads storage on the trainer's thread instead of the swap thread while another
    thread keeps the interpreter busy -- timing that changes what an async memory does."""
    import threading

    cfg = dict(memory="carousel", daemon=daemon, tasks=3, threads=1, swap_ratio=1.0)
    first = run(small(**cfg))
    stop = threading.Event()
    hog = threading.Thread(target=lambda: [sum(range(2000)) for _ in iter(stop.is_set, True)])
    hog.start()
    try:
        second = run(small(**cfg, swap_workers=0))
    finally:
        stop.set()
        hog.join()
    assert first["acc_matrix"] == second["acc_matrix"]
    assert first["final_loss"] == second["final_loss"]  # bit for bit: the same samples replayed at every step
    stats = [{k: r["memory"]["stats"][k] for k in ("swapped_in", "swapped_out", "evicted")} for r in (first, second)]
    assert stats[0] == stats[1] and stats[0]["swapped_in"] > 0


def test_cosine_schedule_lowers_the_learning_rate_within_each_task(monkeypatch):
    """--lr-schedule cosine (the default): each task starts at --lr and its last step runs near 0;
    constant keeps --lr."""
    from trainers.methods.er import ER

    seen: list[float] = []
    real = ER.train_step

    def spy(self, x, y, task):
        seen.append(self.opt.param_groups[0]["lr"])
        return real(self, x, y, task)

    monkeypatch.setattr(ER, "train_step", spy)
    cosine = run(small(tasks=2, lr=0.1))
    steps = cosine["steps"] // 2
    assert len(seen) == 2 * steps and steps > 4
    for task in range(2):
        lrs = seen[task * steps:(task + 1) * steps]
        assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs, lrs[1:]))
        assert 0 < lrs[-1] < 0.01
    seen.clear()
    constant = run(small(tasks=2, lr=0.1, lr_schedule="constant"))
    assert seen == [0.1] * (2 * steps)
    assert cosine["config"]["lr_schedule"] == "cosine" and constant["config"]["lr_schedule"] == "constant"
    assert cosine["final_loss"] != constant["final_loss"]


def test_storage_mode_replays_from_every_past_sample(tmp_path):
    stream = generated_stream(tasks=2, train_per_class=30, test_per_class=5)
    opened = open_memory(MemorySpec("storage", em_size=10), stream, tmp_path)
    try:
        mem = opened.memory
        x = torch.from_numpy(stream.tasks[0].train_x)
        mem.add(x, torch.from_numpy(stream.tasks[0].train_y), 0)
        seen = set()
        for _ in range(20):
            b = mem.sample(16)
            assert len(b) == 16
            assert torch.equal(b.x, x[b.ids])
            seen.update(b.ids.tolist())
        assert len(seen) > 40  # far more distinct samples than an EM of 10 could replay
    finally:
        assert opened.close()["added"] == 60


def test_derpp_stores_logits_at_insertion_and_replays_them(tmp_path):
    stream = generated_stream(tasks=2, train_per_class=20, test_per_class=5)
    model = MLP(stream.num_classes)
    mem = CarouselMemory.from_dict({"memory": {"em_size": 100, "sample_shape": list(stream.input_shape),
                                               "extras": {"logits": {"shape": [stream.num_classes], "dtype": "float32"}}}})
    try:
        method = get_method("derpp")(Context(stream, model, mem, batch_size=8, replay_size=8), alpha=1.0, beta=0.0)
        task = stream.tasks[0]
        method.begin_task(task)
        x, y = torch.from_numpy(task.train_x[:8]), torch.from_numpy(task.train_y[:8])
        before = method.model(method.prep(x)).detach()
        method.train_step(x, y, 0)
        b = mem.sample(8, seed=0)
        assert torch.allclose(b.extras["logits"], before[b.ids], atol=1e-5)  # the logits it had when stored
        # with only the dark-knowledge term, replaying pulls the model back to the stored logits
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        def gap():
            with torch.no_grad():
                return float(((model(method.prep(x, train=False)) - before) ** 2).mean())
        start = gap()
        method.begin_task(stream.tasks[1])
        t1 = stream.tasks[1]
        for lo in range(0, 40, 8):
            method.train_step(torch.from_numpy(t1.train_x[lo:lo + 8]), torch.from_numpy(t1.train_y[lo:lo + 8]), 1)
        assert gap() < start
    finally:
        mem.close()


def test_daemon_mode_trains_through_a_real_daemon():
    result = run(small(memory="carousel", daemon=True, tasks=2))
    assert "daemon" in result["memory"]["describe"]
    assert result["memory"]["stats"]["added"] == 400
    assert result["memory"]["stats"]["swapped_in"] > 0
    assert result["acc_matrix"][0][0] > 90


def test_compare_table_and_resume(tmp_path, capsys):
    base = small(tasks=2)
    out = tmp_path / "cmp"
    summary = compare(base, ["ram", "carousel"], [0, 1], out)
    assert set(summary["modes"]) == {"ram", "carousel"}
    assert summary["modes"]["ram"]["seeds"] == 2
    assert summary["modes"]["ram"]["train_ratio_to_ram"] == pytest.approx(1.0)
    table = (out / "table.md").read_text()
    assert "| carousel | 2 |" in table and "+-" in table
    assert (out / "accuracy.png").is_file()
    capsys.readouterr()
    again = compare(base, ["ram", "carousel"], [0, 1], out)  # everything reused, nothing retrained
    assert "reusing" in capsys.readouterr().out
    assert again["modes"] == summary["modes"]


def test_metrics_forgetting_and_bwt():
    a = [[100.0, np.nan, np.nan], [50.0, 90.0, np.nan], [40.0, 60.0, 80.0]]
    s = metrics.summary(a)
    assert s["final_avg_accuracy"] == pytest.approx(60.0)
    assert s["forgetting"] == pytest.approx(((100 - 40) + (90 - 60)) / 2)
    assert s["bwt"] == pytest.approx(((40 - 100) + (60 - 90)) / 2)
    with pytest.raises(ValueError):
        metrics.summary([[1.0, 2.0]])


def test_cli_run_and_clear_errors(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "trainers", "run", "--benchmark", "generated", "--tasks", "2", "--em-size", "20",
           "--no-progress", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final average accuracy" in done.stdout
    assert json.loads((out / "result.json").read_text())["stream"]["tasks"] == 2
    bad = subprocess.run([*cmd[:4], "--method", "nope", *cmd[4:]], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "unknown method 'nope'" in bad.stderr
    prof = tmp_path / "bad.toml"
    prof.write_text("[swap]\nratio = 2.0\n[[tiers]]\nkind = \"lmdb\"\npath = \"x\"\ncapacity = 10\n")
    bad = subprocess.run([*cmd, "--memory", "carousel", "--profile", str(prof)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "swap.ratio" in bad.stderr


def test_modes_may_carry_their_own_seeds():
    from trainers.compare import parse_modes
    assert parse_modes("ram, carousel,storage:0,carousel-sync:0+2", [0, 1, 2]) == {
        "ram": [0, 1, 2], "carousel": [0, 1, 2], "storage": [0], "carousel-sync": [0, 2]}
    with pytest.raises(ValueError, match="unknown mode 'rom'"):
        parse_modes("rom", [0])


@pytest.mark.parametrize("daemon", [False, True])
def test_gcr_with_a_coreset_memory_reselects_and_reweights_old_classes(tmp_path, daemon):
    result = run(small(method="gcr", memory="carousel", memory_kind="coreset", tasks=3, em_size=30,
                       daemon=daemon, out=str(tmp_path / "gcr")))
    assert result["acc_matrix"][0][0] > 90
    assert result["memory"]["stats"]["tiers"]["ram"]["samples"] <= 30


@pytest.mark.parametrize("tiered", [False, True])
def test_gcr_coreset_end_task_applies_retain_per_class(tmp_path, tiered):
    from trainers.memories import MemorySpec, open_memory
    from trainers.methods import Context, get_method
    stream = generated_stream(tasks=2, train_per_class=30, test_per_class=5)
    gcr = get_method("gcr")
    spec = MemorySpec("carousel", em_size=12, admission=gcr.admission, extras=gcr.extras(stream.num_classes),
                      kind="coreset")
    opened = open_memory(spec, stream, tmp_path)
    try:
        mem = opened.memory
        method = gcr(Context(stream, MLP(stream.num_classes), mem, batch_size=10, replay_size=10,
                             memory_kind="coreset", tiered=tiered), em_size=12)
        for task in stream.tasks:
            method.begin_task(task)
            for lo in range(0, len(task.train_y), 10):
                method.train_step(torch.from_numpy(task.train_x[lo:lo + 10]),
                                  torch.from_numpy(task.train_y[lo:lo + 10]), task.index)
            method.end_task(task)
            b = mem.sample(12, seed=0)
            counts = np.bincount(b.y.numpy(), minlength=stream.num_classes)
            m = 12 // method.seen_classes
            assert (counts[:method.seen_classes] == m).all(), counts  # every class exactly at its budget
            assert (b.extras["weight"] >= 0).all()
        # after the second task the old classes were re-weighted: not all weights are the add-time ones
        assert not torch.all(b.extras["weight"] == 1.0)
        # tiered: every stream sample was stored (swaps can bring any of them back); else only the coresets
        total = sum(len(t.train_y) for t in stream.tasks)
        assert (mem.stats()["added"] == total) == tiered
    finally:
        opened.close()


@pytest.mark.parametrize("daemon", [False, True])
def test_er_with_a_saliency_memory_stores_compressed_samples(tmp_path, daemon):
    result = run(small(method="er", memory="carousel", memory_kind="saliency", arch="reduced-resnet18", tasks=2,
                       em_size=20, tier_capacity="24KiB", theta=0.6, daemon=daemon, out=str(tmp_path / "sal")))
    tier = result["memory"]["stats"]["tiers"]["0-lmdb"]
    assert tier["capacity_bytes"] == 24 * 1024 and tier["record_bytes"] <= 24 * 1024
    raw_fit = 24 * 1024 // (28 * 28 + 10)
    assert tier["samples"] > 1.5 * raw_fit  # generated patterns: Grad-CAM keeps about half of each image
    assert result["wall_time_s"]["saliency"] > 0
    assert result["final_avg_accuracy"] > 60  # it learns (replaying completed samples)


def test_saliency_memory_kind_needs_carousel_mode(tmp_path):
    with pytest.raises(Exception, match="saliency"):
        run(small(method="er", memory="ram", memory_kind="saliency", arch="reduced-resnet18", tasks=2,
                  out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="use --memory carousel"):
        run(small(method="er", memory="storage", memory_kind="saliency", arch="reduced-resnet18", tasks=2,
                  out=str(tmp_path / "s")))
