"""The done-when test of the adopted image folder (issue 24): real Fashion-MNIST written as an
``ImageFolder`` tree of PNGs, ``python -m trainers run --memory carousel --profile P`` with that
folder as the only tier, against the same run on the default LMDB tier: both finish, the folder is
read where it is and left as it was, and the accuracies agree within the noise of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage_backends.png import encode_png
from tests.carousel.test_adopted_folder import digest
from trainers.streams import REPO_DATA_ROOT, make_stream

REPO = Path(__file__).resolve().parents[2]
RAW = REPO_DATA_ROOT / "FashionMNIST" / "raw"
LIMIT, SEED = 500, 0  # 500 per class, 5 tasks of 2 classes, 1 epoch, MLP: ~5 s a run here
# Noise: the LMDB run at these settings (commit of this test, 2-core machine) gave a final average
# class-IL accuracy of 73.20 % with seed 0 and 63.36 % with seed 1 (the seed also orders the classes):
# 9.8 points apart. Folder vs LMDB at seed 0: 72.48 vs 73.20 %. The margin is that seed-to-seed
# spread, rounded up: a folder run that loses its past (no swap-ins: ~30 %) is far outside it.
MARGIN = 10.0


def write_folder(root: Path) -> int:
    """The stream's training samples as ``root/{label:02d}/{task}-{i:05d}.png``: the classes sort in
    the stream's label order, so ImageFolder's class index is the stream's label."""
    stream = make_stream("split-fashion-mnist", seed=SEED, limit_per_class=LIMIT)
    n = 0
    for task in stream.tasks:
        for i, (x, y) in enumerate(zip(task.train_x, task.train_y)):
            folder = root / f"{int(y):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{task.index}-{i:05d}.png").write_bytes(encode_png(x[0]))
            n += 1
    return n


def run(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "trainers", "run", "--memory", "carousel", "--benchmark", "split-fashion-mnist",
           "--data-root", str(REPO_DATA_ROOT), "--arch", "mlp", "--limit-per-class", str(LIMIT),
           "--eval-limit", "500", "--epochs", "1", "--seed", str(SEED), "--threads", "1", "--no-progress",
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not (RAW / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"real Fashion-MNIST (IDX gz) not at {RAW}")
def test_a_run_on_an_adopted_fashion_mnist_folder_matches_the_lmdb_run(tmp_path):
    folder = tmp_path / "fashion-mnist-train"
    n = write_folder(folder)
    before = digest(folder)
    profile = tmp_path / "folder.toml"
    profile.write_text('[swap]\nratio = 0.5\npolicy = "carm"\n\n'  # the default LMDB run's swap settings
                       f'[[tiers]]\nkind = "files"\npath = "{folder}"\nlayout = "imagefolder"\n')
    adopted = run(tmp_path / "folder", "--profile", str(profile))
    lmdb = run(tmp_path / "lmdb")
    tiers = adopted["memory"]["stats"]["tiers"]
    assert tiers["0-files"]["samples"] == n == 10 * LIMIT  # read where it is, not moved under the run
    assert str(folder) in adopted["memory"]["describe"]
    assert adopted["memory"]["stats"]["swapped_in"] > 100  # the past came back from the folder
    assert digest(folder) == before  # nothing written into the data set
    gap = abs(adopted["final_avg_accuracy"] - lmdb["final_avg_accuracy"])
    assert gap <= MARGIN, (adopted["final_avg_accuracy"], lmdb["final_avg_accuracy"])
