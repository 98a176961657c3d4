"""``python -m benchmarks --quick``: the side-by-side run goes through every part and writes its
report. Timings are not asserted (a benchmark measures); that every figure is there and sane is.

The peers run where a peers' venv exists (CI builds one: ``CAROUSEL_AVALANCHE_PYTHON``, with
TorchRL and Avalanche); otherwise their rows must say why they are missing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("sidebyside")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def test_every_part_reports_positive_figures(quick_run) -> None:
    results, out = quick_run
    for em, part in results["ram"].items():
        names = set(part["carousel"])
        assert {"index_select limit (random index)", "carousel in-process",
                "carousel daemon (shared-memory ring)"} <= names
        assert all(_positive(v["samples_per_s"]) and _positive(v["vs_limit"]) for v in part["carousel"].values())
    stores = results["storage"]["stores"]
    for name in ("carousel LMDB tier", "carousel Zarr tier (chunk 64)", "os.pread per record (flat file)"):
        assert _positive(stores[name]["warm_samples_per_s"]) and _positive(stores[name]["cold_samples_per_s"])
    training = results["training"]["carousel"]
    assert all(_positive(v) for v in training["step_s"].values())
    assert training["swapped_in_async"] > 0, "the async variant must actually swap from the tier"
    scaling = results["scaling"]
    assert all(_positive(v["sample_256_us"]) and _positive(v["add_32_us"]) for v in scaling["em"].values())
    assert all(_positive(v["add_and_persist_samples_per_s"]) for v in scaling["stored"].values())
    assert [int(k) for k in scaling["clients"]] == [1, 2]
    assert all(len(v["per_client"]) == int(k) and all(map(_positive, v["per_client"]))
               for k, v in scaling["clients"].items())
    text = (out / "results.md").read_text()
    for heading in ("## 1. Replay sampling", "## 2. Storage tiers", "## 3. Training", "## 4. Scaling"):
        assert heading in text
    assert (out / "results.png").stat().st_size > 10_000


def test_peers_are_measured_or_say_why_not(quick_run) -> None:
    results, _ = quick_run
    peers = results["ram"]["500"]["peers"]
    memmap = results["storage"]["stores"]["TorchRL LazyMemmapStorage"]
    if results["peers_python"] is None:
        assert peers["error"] and memmap["error"] and results["training"]["torchrl_memmap"]["error"]
        pytest.skip(f"no peers' venv here: {results['peers_found_by']}")
    variants = peers["variants"]
    assert not peers["errors"], peers["errors"]
    for name in ("TorchRL ReplayBuffer, LazyTensorStorage", "TorchRL ReplayBuffer, LazyMemmapStorage",
                 "TorchRL ReplayBuffer, LazyMemmapStorage, prefetch=4",
                 "Avalanche ReservoirSamplingBuffer, DataLoader access"):
        assert _positive(variants[name]["samples_per_s"]), name
    assert _positive(memmap["warm_samples_per_s"]) and _positive(memmap["cold_samples_per_s"])
    assert _positive(results["training"]["torchrl_memmap"]["ratio"])


def test_a_missing_peers_python_is_reported_not_fatal(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CAROUSEL_PEERS_PYTHON", "CAROUSEL_AVALANCHE_PYTHON")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "ram", "--out", str(tmp_path),
                           "--peers-python", str(tmp_path / "no-such-python")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "does not exist" in results["ram"]["500"]["peers"]["error"]
    assert _positive(results["ram"]["500"]["carousel"]["carousel in-process"]["samples_per_s"])
