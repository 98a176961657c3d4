"""``benchmarks.scale`` runs end to end on small stores: a row per stored size, swaps happening,
and each of carousel's threads' CPU read per memory (not summed over every memory of the process)."""

from __future__ import annotations

import json

from benchmarks import scale


def test_quick_run_reports_every_size_with_swaps_and_thread_cpu(tmp_path):
    results = scale.main(["--quick", "--out", str(tmp_path)])
    assert set(results["median"]) == {"2000", "8000"}
    for row in results["median"].values():
        assert row["swapped"] > 0, "CarM swapping from the first task on: every step swaps"
        assert row["background"] > 0 and row["trainer"] > 0
        assert row["swap-worker"] > 0 and row["write-behind"] > 0  # the memory's own threads, found
        assert row["background"] < 0.05, "a thread counted that is not this memory's (or seconds, not per step)"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["median"] == json.loads(json.dumps(results["median"]))
    assert "| 8,000 |" in (tmp_path / "results.md").read_text()
