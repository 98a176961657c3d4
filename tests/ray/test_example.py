"""examples/ray_ddp.py joins a running Ray cluster (--address) and trains two DDP ranks, each with its shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'carousel[ray]')")

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_example_joins_the_cluster_and_trains_two_ranks_on_two_shards(ray_cluster, tmp_path):
    address = ray.get_runtime_context().gcs_address  # the same code would name a multi-node head here
    proc = subprocess.run([sys.executable, "examples/ray_ddp.py", "--address", address, "--quick",
                           "--data", "generated", "--root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["workers"] == 2 and out["stream"] == "split-generated"
    # 2 ranks x 5 tasks x 5 steps x 32 samples each, every one stored on the shard its index routes to
    assert out["added"] == out["stored"] == 1600
    assert sorted(out["metrics_endpoints"]) == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0", "shard-1"]
    for shard in ("shard-0", "shard-1"):
        assert json.loads((tmp_path / shard / "shard.json").read_text())["n_shards"] == 2
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2
    # DDP keeps the replicas identical: both ranks report the same accuracies
    assert lines[0].split("accuracy after each task ")[1].split("]")[0] == \
        lines[1].split("accuracy after each task ")[1].split("]")[0]
    assert "degraded replay batches 0" in lines[0]
