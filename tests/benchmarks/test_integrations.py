"""``python -m benchmarks.integrations --quick`` end to end: every Mammoth row runs (the daemon row on a
real ``carousel serve``), swaps where it says it swaps, and reports where carousel's CPU goes. TorchRL
and Avalanche rows run where those packages are installed (CI's extras step), else they are skipped."""

from __future__ import annotations

import json

from benchmarks import integrations


def test_quick_run_measures_every_mammoth_row_and_the_daemon_process(tmp_path):
    out = tmp_path / "out"
    integrations.main(["--quick", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    mammoth = {name: r for name, r in rows.items() if r["loop"] == "mammoth-er"}
    assert len(mammoth) == 4 and all(r["steps_per_s"] > 0 for r in mammoth.values())
    daemon = mammoth["CarouselBuffer on a daemon + LMDB tier (swapping)"]
    assert daemon["swapped_in"] > 0 and mammoth["CarouselBuffer + LMDB tier (swapping)"]["swapped_in"] > 0
    assert mammoth["CarouselBuffer, RAM only"]["swapped_in"] == 0
    assert daemon["thread_cpu_ms_per_step"]["daemon process"] > 0, "the daemon's CPU is part of what it costs"
    assert "CarouselBuffer on a daemon" in (out / "results.md").read_text()
