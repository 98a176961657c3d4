"""``benchmarks.starvation`` and its hogs: the hogs run and are gone afterwards (also after an
exception, a SIGTERM of the script, or a SIGKILL of their parent), the table reads collapses off
synthetic results, and the script runs, traces and resumes end to end on generated data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.hogs import Hogs, alive
from benchmarks.starvation import (Thresholds, collapse_reasons, large_drops, parse_cells, plan, trace_summary,
                                   write_table)

ROOT = Path(__file__).resolve().parents[2]


def _gone_within(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_hogs_burn_cpu_write_and_are_gone_after_the_block(tmp_path):
    with Hogs(cpu=2, io=True, scratch_dir=tmp_path, io_block_bytes=1 << 16, io_file_bytes=1 << 20) as hogs:
        pids = hogs.pids
        assert len(pids) == 3 and all(alive(p) for p in pids)
        scratch = next(tmp_path.glob("carousel-iohog-*/scratch.bin"), None)
        deadline = time.monotonic() + 10
        while (scratch is None or scratch.stat().st_size == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
            scratch = next(tmp_path.glob("carousel-iohog-*/scratch.bin"), None)
        assert scratch is not None and 0 < scratch.stat().st_size <= 1 << 20  # wraps at io_file_bytes
        time.sleep(0.5)
        assert _cpu_seconds(pids[0]) > 0.1  # a CPU hog spins
    assert not any(alive(p) for p in pids)
    assert list(tmp_path.iterdir()) == []  # the scratch folder went with them


def test_hogs_are_stopped_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Hogs(cpu=1, io=True, scratch_dir=tmp_path) as hogs:
            pids = hogs.pids
            assert all(alive(p) for p in pids)
            raise RuntimeError("boom")
    assert not any(alive(p) for p in pids)
    assert list(tmp_path.iterdir()) == []


def test_hogs_die_with_a_parent_killed_by_sigkill(tmp_path):
    code = (f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nfrom benchmarks.hogs import Hogs\n"
            f"h = Hogs(cpu=1, io=True, scratch_dir={str(tmp_path)!r}).start()\n"
            "print(*h.pids, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        parent.kill()  # no cleanup runs: the hogs must notice on their own
        parent.wait()
    assert _gone_within(pids)


# ---- the table ------------------------------------------------------------------------------------------
ISSUE_DERPP = [[97.0, None, None, None, None], [97.5, 87.0, None, None, None], [97.2, 87.1, 91.8, None, None],
               [96.2, 74.7, 35.8, 82.2, None], [50.2, 89.8, 68.9, 51.1, 50.2]]
RAM = [[97.0, None, None, None, None], [95.0, 91.0, None, None, None], [90.0, 85.0, 92.0, None, None],
       [85.0, 80.0, 75.0, 90.0, None], [80.0, 75.0, 70.0, 72.0, 89.0]]


def test_collapses_and_drops_follow_the_thresholds():
    assert collapse_reasons(ISSUE_DERPP) == ["T5 just trained: 50.2"]
    assert large_drops(ISSUE_DERPP) == ["T3 -56.0 in T4", "T1 -46.0 in T5", "T4 -31.1 in T5"]
    assert collapse_reasons(RAM) == [] and large_drops(RAM) == []
    strict = Thresholds(just_trained_below=40, drop_above=50)
    assert collapse_reasons(ISSUE_DERPP, strict) == [] and large_drops(ISSUE_DERPP, strict) == ["T3 -56.0 in T4"]


def test_trace_summary_finds_the_dip_and_the_starved_class():
    records = [
        {"step": 5, "task": 0, "phase": "train", "em": {"0": 3, "1": 2}, "swapped_in": 0, "swap_lag": 0,
         "pending_writes": 4, "step_s": 0.2},
        {"step": 10, "task": 1, "phase": "train", "em": {"0": 1, "1": 2, "2": 2}, "acc": [90.0, 40.0],
         "swapped_in": 20, "swap_lag": 3, "pending_writes": 0, "step_s": 0.4},
        {"step": 15, "task": 1, "phase": "train", "em": {"1": 2, "2": 3}, "acc": [35.0, 80.0],
         "swapped_in": 30, "swap_lag": 1, "pending_writes": 0, "step_s": 0.3},
        {"step": 15, "task": 1, "phase": "end_task", "em": {"0": 2, "1": 1, "2": 2}, "acc": [60.0, 80.0],
         "class_acc": {"0": 60.0, "1": 80.0}, "confusion": {"0": {"1": 8}, "1": {"0": 3, "2": 1}},
         "swapped_in": 30, "swap_lag": 0, "pending_writes": 0},
    ]
    s = trace_summary(records, classes_per_task=1)
    assert s["min_old"] == (35.0, 15, 1)          # task 1, while task 2 trained
    assert s["max_dip"] == (55.0, 15, 1)          # 90 -> 35 between steps 10 and 15
    assert s["em_min_old_class"] == (0, 15, 0)    # class 0 had left the EM at step 15
    assert s["worst_class"] == (60.0, 15, 0, 1)   # at a task's end, class 0 mostly taken for class 1
    assert s["new_into_old"] == 75.0              # task 2 (class 1): 3 of its 4 errors went to class 0
    assert s["swaps_per_step"] == 2.0 and s["max_lag"] == 3 and s["max_pending"] == 4
    assert s["step_s"] == 0.3
    # Task 1 has no end record (nothing to say); task 2 ended at step 15 and, with no end of task 1
    # before it, its second half is steps 8-15: its own accuracy 40 and 80 there.
    assert s["late_current"] == [None, pytest.approx((60.0, 20.0))]
    assert s["replay_loss"] is None  # no record carried one


def test_trace_summary_late_accuracy_is_the_task_own_over_its_second_half():
    records = [{"step": 2, "task": 0, "phase": "train", "acc": [10.0], "replay_loss": None},
               {"step": 4, "task": 0, "phase": "train", "acc": [70.0], "replay_loss": 0.5},
               {"step": 4, "task": 0, "phase": "end_task", "acc": [72.0]},
               {"step": 6, "task": 1, "phase": "train", "acc": [50.0, 0.0], "replay_loss": 1.0},
               {"step": 7, "task": 1, "phase": "train", "acc": [40.0, 90.0], "replay_loss": 2.0},
               {"step": 8, "task": 1, "phase": "train", "acc": [30.0, 50.0], "replay_loss": 3.0},
               {"step": 8, "task": 1, "phase": "end_task", "acc": [30.0, 50.0]}]
    s = trace_summary(records, classes_per_task=2)
    # Task 1: steps 3-4 (its second half: step 4 only); task 2: steps 7-8 (after 4 + 2).
    assert s["late_current"] == [(70.0, 0.0), pytest.approx((70.0, 20.0))]
    assert s["replay_loss"] == [0.5, 2.0]


def _fake_run(out: Path, name: str, meta: dict, acc=None, trace=None, log: str = "") -> None:
    d = out / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(meta))
    (d / "log.txt").write_text(log)
    if acc is not None:
        final = sum(acc[-1]) / len(acc[-1])
        (d / "result.json").write_text(json.dumps({"acc_matrix": acc, "final_avg_accuracy": final,
                                                   "task_il_accuracy": 95.0, "final_loss": 0.5,
                                                   "stream": {"num_classes": 10, "tasks": 5}}))
    if trace is not None:
        (d / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trace) + '{"step": 9')  # torn tail


def test_table_from_synthetic_runs(tmp_path):
    def meta(cell, seed, cond, rep, **kw):
        return {"cell": cell, "seed": seed, "condition": cond, "repeat": rep, "status": "ok", "load_start": 1.5,
                "load_mean": 3.9, "wall_s": 100.0, "cpu_s": 90.0, "error": None, "integrity_errors": {}, **kw}

    trace = [{"step": 5, "task": 1, "phase": "train", "em": {"0": 100, "1": 0, "2": 50}, "acc": [90.0, 50.0]},
             {"step": 10, "task": 1, "phase": "train", "em": {"0": 100, "1": 20, "2": 50}, "acc": [40.0, 60.0]}]
    _fake_run(tmp_path, "derpp-carousel-s12-loaded-r0", meta("derpp-carousel", 12, "loaded", 0), ISSUE_DERPP, trace)
    _fake_run(tmp_path, "derpp-carousel-s12-loaded-r1", meta("derpp-carousel", 12, "loaded", 1), RAM)
    _fake_run(tmp_path, "derpp-ram-s12-quiet-r0", meta("derpp-ram", 12, "quiet", 0), RAM)
    _fake_run(tmp_path, "er-daemon-s0-loaded-r0",
              meta("er-daemon", 0, "loaded", 0, status="failed", error="carousel.memory.IntegrityError: slot 3",
                   integrity_errors={"log.txt": 1, "daemon.log": 2}))
    rows = {r["dir"]: r for r in write_table(tmp_path)}
    bad = rows["derpp-carousel-s12-loaded-r0"]
    assert bad["final"] == pytest.approx(62.04)
    assert bad["just_trained"] == [97.0, 87.0, 91.8, 82.2, 50.2]
    assert bad["collapse"] == ["T5 just trained: 50.2"] and "T3 -56.0 in T4" in bad["drops"]
    assert bad["trace"]["min_old"] == (40.0, 10, 1) and bad["trace"]["max_dip"] == (50.0, 10, 1)
    assert bad["trace"]["em_min_old_class"] == (0, 5, 1)
    assert rows["derpp-ram-s12-quiet-r0"]["collapse"] == [] and rows["derpp-ram-s12-quiet-r0"]["drops"] == []
    failed = rows["er-daemon-s0-loaded-r0"]
    assert failed["final"] is None and failed["integrity_errors"] == 3
    table = (tmp_path / "table.md").read_text()
    assert "| **yes**: T5 just trained: 50.2 | T3 -56.0 in T4; T1 -46.0 in T5; T4 -31.1 in T5 |" in table
    assert "| er-daemon s0 r0 | loaded |" in table and "failed: carousel.memory.IntegrityError: slot 3" in table
    saved = json.loads((tmp_path / "starvation.json").read_text())
    # Both carousel runs against the one RAM-only run of seed 12 (the reference is deterministic).
    pairs = {p["run"]: p for p in saved["pairs"]}
    assert set(pairs) == {"derpp-carousel-s12-loaded-r0", "derpp-carousel-s12-loaded-r1"}
    assert pairs["derpp-carousel-s12-loaded-r0"]["reference"] == "derpp-ram-s12-quiet-r0"
    assert pairs["derpp-carousel-s12-loaded-r0"]["carousel_mean"] == pytest.approx(81.64)
    assert pairs["derpp-carousel-s12-loaded-r0"]["ram_mean"] == pytest.approx(91.8)
    cells = {c["cell"]: c for c in saved["cells"]}
    assert cells["derpp-carousel"]["runs"] == 2 and cells["derpp-carousel"]["collapsed"] == 1
    assert cells["derpp-carousel"]["final"] == pytest.approx((62.04 + 77.2) / 2)
    assert cells["derpp-carousel"]["late_current"] is None  # the trace ended no task
    assert "er-daemon" not in cells                          # a failed run has no accuracy to average
    assert "| derpp-ram | 1 | 0 | 77.20 (0.00) |" in table
    (group,) = saved["repeats"]
    assert group["cell"] == "derpp-carousel" and group["spread"] == pytest.approx(77.2 - 62.04)


def test_cells_and_plan():
    assert parse_cells("derpp-carousel:12,er-ram:10+11") == {"derpp-carousel": [12], "er-ram": [10, 11]}
    assert parse_cells("gcr-carousel") == {"gcr-carousel": [1]}
    with pytest.raises(ValueError, match="unknown cell"):
        parse_cells("nope")
    with pytest.raises(ValueError, match="unknown condition"):
        plan({"er-ram": [1]}, ["sunny"], 1)
    runs = plan({"er-carousel": [10], "er-ram": [10, 11]}, ["quiet", "loaded"], 2)
    assert len(runs) == 2 * (2 + 4)
    assert runs[0].name == "er-carousel-s10-quiet-r0" and runs[1].name == "er-carousel-s10-loaded-r0"
    assert len({r.name for r in runs}) == len(runs)


# ---- the script, end to end --------------------------------------------------------------------------------
TINY = "--benchmark generated --tasks 2 --em-size 20 --batch-size 16 --replay-size 16"


def _script(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.starvation", "--out", str(out), "--trace-every", "4",
            "--trace-eval-every", "8", "--trace-eval-size", "50", "--run-args", TINY, *args]


@pytest.mark.slow
def test_script_runs_loaded_traces_stops_its_hogs_and_resumes(tmp_path):
    out = tmp_path / "sv"
    cmd = _script(out, "--cells", "er-carousel:1", "--conditions", "loaded")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    d = out / "er-carousel-s1-loaded-r0"
    meta = json.loads((d / "run.json").read_text())
    assert meta["status"] == "ok" and meta["hogs"]["io"] and meta["hogs"]["cpu"] == os.cpu_count()
    assert len(meta["hogs"]["pids"]) == os.cpu_count() + 1 and not any(alive(p) for p in meta["hogs"]["pids"])
    assert meta["verify"] and "--memory carousel" in meta["command"] and "--trace-every 4" in meta["command"]
    assert meta["cpu_s"] > 0 and meta["load_start"] >= 0
    assert (d / "trace.png").is_file()
    records = [json.loads(line) for line in (d / "trace.jsonl").read_text().splitlines()]
    assert records[-1]["swapped_in"] > 0 and all("em" in r for r in records)
    rows = json.loads((out / "starvation.json").read_text())["runs"]
    assert [(r["dir"], r["status"]) for r in rows] == [("er-carousel-s1-loaded-r0", "ok")]
    assert rows[0]["just_trained"] and rows[0]["trace"]["swaps_per_step"] > 0
    assert "| er-carousel s1 r0 | loaded |" in (out / "table.md").read_text()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "done before, skipped" in again.stdout


def test_script_keeps_a_failed_run_and_stops_its_hogs(tmp_path):
    out = tmp_path / "sv"
    done = subprocess.run(_script(out, "--cells", "er-ram:1", "--conditions", "loaded",
                                  "--run-args", TINY + " --hparam bad"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((out / "er-ram-s1-loaded-r0" / "run.json").read_text())
    assert meta["status"] == "failed" and meta["returncode"] != 0 and "NAME=VALUE" in meta["error"]
    assert len(meta["hogs"]["pids"]) == os.cpu_count() + 1 and not any(alive(p) for p in meta["hogs"]["pids"])
    assert "| er-ram s1 r0 | loaded |" in (out / "table.md").read_text()
    again = subprocess.run(_script(out, "--cells", "er-ram:1", "--conditions", "loaded"), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert "done before, skipped" in again.stdout  # a failed run is kept, not rerun (without --retry-failed)


def test_script_stops_the_run_and_the_hogs_on_sigterm(tmp_path):
    out = tmp_path / "sv"
    proc = subprocess.Popen(_script(out, "--cells", "er-ram:1", "--conditions", "loaded",
                                    "--run-args", TINY + " --tasks 40"),
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        start = proc.stdout.readline()
        run_pid = int(re.search(r"run pid (\d+)", start).group(1))
        hog_pids = [int(p) for p in re.search(r"hog pids \[([\d, ]+)\]", start).group(1).split(",")]
        trace = out / "er-ram-s1-loaded-r0" / "trace.jsonl"
        deadline = time.monotonic() + 60
        while not (trace.is_file() and trace.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)  # the run is training
        assert alive(run_pid) and all(alive(p) for p in hog_pids)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 143
    assert _gone_within([run_pid, *hog_pids], 5)
    assert not (out / "er-ram-s1-loaded-r0" / "run.json").exists()  # interrupted: run again next time
