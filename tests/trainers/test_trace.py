"""The per-step trace (``--trace-every``): its records, its figure, that it only observes, and the
EM class histogram it reads from ``stats()`` (in-process and through a real daemon)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from carousel import CarouselMemory
from trainers.run import RunConfig, run
from trainers.trace import read_trace


def small(**kw) -> RunConfig:
    base = dict(benchmark="generated", method="er", memory="ram", em_size=40, tasks=2, progress=False,
                batch_size=16, replay_size=16)
    return RunConfig(**{**base, **kw})


def test_trace_records_the_em_the_replays_the_swaps_and_the_accuracy(tmp_path):
    out = tmp_path / "run"
    result = run(small(memory="carousel", trace_every=3, trace_eval_every=6, trace_eval_size=50, out=str(out)))
    records = read_trace(out / "trace.jsonl")
    assert (out / "trace.png").stat().st_size > 20_000  # four panels drawn, not an empty canvas
    steps_per_task = result["steps"] // 2
    train = [r for r in records if r["phase"] == "train"]
    ends = [r for r in records if r["phase"] == "end_task"]
    assert [r["step"] for r in train] == list(range(3, result["steps"] + 1, 3))
    assert [(r["step"], r["task"]) for r in ends] == [(steps_per_task, 0), (2 * steps_per_task, 1)]
    assert result["trace"]["records"] == len(records) == len(train) + 2
    for r in records:
        seen = {str(c) for c in range(2 * (r["task"] + 1))}
        # The EM holds and replays only classes seen so far, and it is full once 40 samples came by.
        assert set(r["em"]) <= seen and set(r["replayed"]) <= seen
        assert sum(r["em"].values()) == min(40, 16 * r["step"])
        assert r["loss"] > 0 and r["step_s"] > 0
        # The replayed batches' cross-entropy: none before the first replay, a positive mean after.
        assert (r["replay_loss"] is None) == (not r["replayed"])
        assert r["replay_loss"] is None or r["replay_loss"] > 0
        # ER draws one batch of min(16, EM) per step: every replayed sample since the last record is counted.
        assert sum(r["replayed"].values()) <= 16 * 3
        if r["step"] % 6 == 0 or r["phase"] == "end_task":
            assert len(r["acc"]) == r["task"] + 1 and all(0 <= a <= 100 for a in r["acc"])
            assert set(r["class_acc"]) == seen
            # A task's accuracy is its classes' (equal-sized subsets: generated data is balanced).
            for t, a in enumerate(r["acc"]):
                assert a == pytest.approx((r["class_acc"][str(2 * t)] + r["class_acc"][str(2 * t + 1)]) / 2, abs=0.01)
            for true, went in r["confusion"].items():  # errors only, to seen classes
                assert true not in went and set(went) <= seen and r["class_acc"][true] < 100
        else:
            assert "acc" not in r and "confusion" not in r
    assert sum(sum(r["replayed"].values()) for r in records) == 16 * (result["steps"] - 1)  # none at step 1
    # Cumulative counters only grow; carousel swaps once the second task's replays begin.
    for key in ("added", "swapped_in", "swapped_out"):
        assert all(a[key] <= b[key] for a, b in zip(records, records[1:])), key
    assert records[-1]["added"] == 400 and records[-1]["swapped_in"] > 0
    # The last record saw the EM the run ended with.
    assert records[-1]["em"] == result["memory"]["stats"]["em_classes"]
    assert records[-1]["acc"][0] > 90  # generated classes are easy: the trace's subset agrees
    assert 0 < result["wall_time_s"]["trace"] < result["wall_time_s"]["total"]


def test_trace_only_observes_a_ram_run_gives_the_same_result(tmp_path):
    plain = run(small(seed=3))
    traced = run(small(seed=3, trace_every=2, trace_eval_every=4, out=str(tmp_path / "traced")))
    assert traced["acc_matrix"] == plain["acc_matrix"]
    assert traced["final_loss"] == plain["final_loss"]
    assert plain["trace"] is None and traced["trace"]["records"] > 10


def test_trace_through_a_daemon_reads_the_em_histogram_over_stats(tmp_path):
    out = tmp_path / "daemon"
    result = run(small(memory="carousel", daemon=True, trace_every=5, out=str(out)))
    records = read_trace(out / "trace.jsonl")
    assert len(records) == result["steps"] // 5 + 2  # every 5th step, and after each task
    for r in records:
        assert sum(r["em"].values()) == min(40, 16 * r["step"])  # string keys, counts: it survived JSON
    assert records[-1]["em"] == result["memory"]["stats"]["em_classes"]
    assert records[-1]["swapped_in"] > 0
    assert "serving" in (out / "daemon.log").read_text()  # the daemon's log is kept beside the result


def test_stats_em_classes_counts_the_em_by_label():
    mem = CarouselMemory.from_dict({"memory": {"em_size": 12, "sample_shape": [2], "seed": 0}})
    try:
        assert mem.stats()["em_classes"] == {}
        y = torch.tensor([0, 0, 0, 1, 1, 7, 7, 7, 7, 7, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
        mem.add(torch.zeros(20, 2, dtype=torch.uint8), y, 0)
        em = mem.sample(12)  # the whole EM: every filled slot once
        assert mem.stats()["em_classes"] == {str(k): v for k, v in Counter(em.y.tolist()).items()}
        assert sum(mem.stats()["em_classes"].values()) == 12
        json.dumps(mem.stats()["em_classes"])
    finally:
        mem.close()


def test_trace_settings_are_checked():
    with pytest.raises(ValueError, match="eval_size"):
        run(small(trace_every=2, trace_eval_size=0))
