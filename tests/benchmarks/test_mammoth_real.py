"""``benchmarks.mammoth_real`` without a Mammoth checkout: how it reads a run's outcome (a real
traceback from a real crashed interpreter, the accuracy line Mammoth's ``utils/loggers.py`` prints),
and the data it lays out (MNIST from gzipped IDX files, the synthetic CIFAR-10 pickles and their md5
sums). The Mammoth runs themselves are in docs/results/mammoth-real.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import mammoth_real as mr


@pytest.fixture
def crashed(tmp_path: Path) -> tuple[str, Path]:
    """A fake-free crash: a script under a 'mammoth' folder calls into a module outside it that raises."""
    checkout = tmp_path / "mammoth"
    (checkout / "models").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "thebuffer.py").write_text("def get(n):\n    raise KeyError(f'no slot {n}')\n")
    (checkout / "models" / "er.py").write_text("import thebuffer\n\ndef observe():\n    return thebuffer.get(3)\n")
    (checkout / "main.py").write_text("from models import er\ner.observe()\n")
    proc = subprocess.run([sys.executable, str(checkout / "main.py")], capture_output=True, text=True,
                          env={"PYTHONPATH": str(outside)}, cwd=checkout, check=False)
    assert proc.returncode == 1
    return "some log line\n" + proc.stderr, checkout


def test_traceback_from_log_names_the_deepest_mammoth_frame(crashed: tuple[str, Path]) -> None:
    text, checkout = crashed
    err = mr.traceback_from_log(text, checkout)
    assert err["type"] == "KeyError" and err["message"] == "'no slot 3'"
    assert mr._where(err["mammoth_frame"], checkout) == "models/er.py:4"
    assert err["frame"]["file"].endswith("thebuffer.py") and err["frame"]["line"] == 2


def test_first_error_from_a_live_exception(tmp_path: Path) -> None:
    checkout = tmp_path / "mammoth"
    checkout.mkdir()
    (checkout / "mod.py").write_text("def f(x):\n    return x.examples\n")
    sys.path.insert(0, str(checkout))
    try:
        import mod
        with pytest.raises(AttributeError) as info:
            mod.f(object())
    finally:
        sys.path.remove(str(checkout))
        sys.modules.pop("mod", None)
    err = mr.first_error(info.value, checkout)
    assert err["type"] == "AttributeError" and "examples" in err["message"]
    assert mr._where(err["mammoth_frame"], checkout) == "mod.py:2"


def test_final_accuracy_takes_the_last_line() -> None:
    # utils/loggers.py: '{} for {} task(s): \t [Class-IL]: {} % \t [Task-IL]: {} %'
    text = ("Accuracy for 1 task(s): \t [Class-IL]: 98.96 % \t [Task-IL]: 98.96 %\n"
            "[INFO] 06-Dec-26 17:49:36 - Accuracy for 3 task(s): \t [Class-IL]: 63.54 % \t [Task-IL]: 89.24 %\n")
    assert mr.final_accuracy(text) == {"tasks": 3, "class_il": 63.54, "task_il": 89.24}
    assert mr.final_accuracy("Traceback (most recent call last):\n") is None


def test_place_mnist_ungzips_where_torchvision_looks(tmp_path: Path) -> None:
    src = tmp_path / "MNIST" / "raw"
    src.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(src / f"{name}.gz", "wb") as f:
            f.write(name.encode())
    base = tmp_path / "data"
    mr.place_mnist(tmp_path / "MNIST", base)
    for cls in ("MNIST", "MyMNIST"):  # torchvision: <root>/<class name>/raw, root = base/MNIST
        assert (base / "MNIST" / cls / "raw" / "t10k-labels-idx1-ubyte").read_bytes() == b"t10k-labels-idx1-ubyte"


def test_synthetic_cifar10_is_in_the_pickle_layout_with_its_md5s(tmp_path: Path) -> None:
    folder = mr.write_synthetic_cifar10(tmp_path, per_class_train=10, per_class_test=2)
    assert folder == tmp_path / "CIFAR10" / "cifar-10-batches-py"
    sums = json.loads((folder / "SYNTHETIC").read_text())["md5"]
    labels = []
    for i in range(1, 6):
        path = folder / f"data_batch_{i}"
        assert hashlib.md5(path.read_bytes()).hexdigest() == sums[path.name]
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # as torchvision reads it
        assert entry["data"].dtype == np.uint8 and entry["data"].shape == (20, 3072)
        labels += entry["labels"]
    assert sorted(set(labels)) == list(range(10)) and len(labels) == 100
    with open(folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"][0] == "airplane"
    assert set(sums) == {"data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                         "test_batch", "batches.meta"}
