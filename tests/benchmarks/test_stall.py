"""``python -m benchmarks.stall --quick --quiet --model --device cpu`` end to end: every variant takes its
steps (the daemon rows on real processes: a served ``carousel serve`` and ``carousel.spawn``'s child),
the carousel variants swap, the daemons' CPU is counted as carousel's, not left out, and the
real-model variant (the one a GPU machine runs) trains through each memory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks import stall

VARIANTS = {"RAM-only", "carousel in-process", "carousel.spawn", "carousel daemon"}


def test_quick_run_measures_every_variant_and_the_daemons_cpu():
    with tempfile.TemporaryDirectory(prefix="stall-") as short:  # the daemon's socket path ends at 108 bytes
        out = Path(short)
        stall.main(["--quick", "--quiet", "--model", "--device", "cpu", "--out", str(out)])
        results = json.loads((out / "results.json").read_text())
        text = (out / "results.md").read_text()
    (cell,) = results["emulated"].values()
    assert set(cell) - {"swapped_in"} == VARIANTS
    for name in VARIANTS:
        s = cell[name]
        assert s["step"]["median_ms"] >= 2.0, "a step includes the emulated 2 ms"
        assert all(s[call]["median_ms"] > 0 for call in ("add", "sample", "observe"))
        assert s["threads"]["cpu_ms"] > 0
    assert cell["swapped_in"]["RAM-only"] == 0
    for name in ("carousel in-process", "carousel.spawn", "carousel daemon"):
        assert cell["swapped_in"][name] > 0, f"{name} swapped nothing: the benchmark would measure no swapping"
        assert cell[name]["threads"]["background_cpu_ms"] > 0, f"{name}: carousel's own CPU not counted"
    assert all(f"| {name} |" in text for name in VARIANTS)
    model = results["model"]
    assert model["device"] == "cpu"
    for name in ("RAM-only", "carousel.spawn", "carousel daemon"):
        assert model[name]["step"]["median_ms"] > 0 and model[name]["carousel"]["median_ms"] > 0
    assert model["carousel.spawn"]["ratio"] > 0 and model["carousel daemon"]["ratio"] > 0
