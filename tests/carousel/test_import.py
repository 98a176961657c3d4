"""``carousel import``: every source format from files the tests write, the errors that stop an import
before it adds anything, a real SIGKILL mid-import and its resume, ``--verify``, and real Fashion-MNIST.

Most cases call the command line in-process (``carousel.cli.main``, the same code as the ``carousel``
script); the kill needs a real ``python -m carousel import`` process.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from carousel.cli import main
from carousel.daemon.lock import FileLock
from storage_backends import open_store

ROOT = Path(__file__).resolve().parents[2]
FASHION = ROOT.parent / "shared" / "datasets" / "FashionMNIST" / "raw"


# ---- writing data sets in their original formats ---------------------------------------------------------

def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_cifar10(folder: Path, per_batch: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A ``cifar-10-batches-py`` folder of small batches, pickled as the official files are (dicts of arrays)."""
    top = folder / "cifar-10-batches-py"
    top.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        (top / name).write_bytes(pickle.dumps({"batch_label": name, "data": data, "labels": labels}, protocol=2))
        out[name] = (data.reshape(-1, 3, 32, 32), np.array(labels))
    return out


def profile(tmp: Path, shape, capacity=100_000, dtype="uint8", name="p.toml") -> Path:
    p = tmp / name
    p.write_text(f'[memory]\nem_size = 16\nsample_shape = {list(shape)}\ndtype = "{dtype}"\n'
                 f'[[tiers]]\nkind = "lmdb"\npath = "flash"\ncapacity = {capacity}\nsync = false\n')
    return p


def stored(tmp: Path, tier: str = "flash") -> dict[str, np.ndarray]:
    """Every record of a tier, in id order (ids under "id")."""
    with open_store(f"lmdb://{tmp}/{tier}?mode=ro") as store:
        ids = np.sort(store.ids())
        out = store.get_many(ids)
    return {"id": ids, **out}


def record(tmp: Path) -> dict:
    (path,) = (tmp / "flash-state" / "imports").glob("*.json")
    return json.loads(path.read_text())


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["import", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- formats -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz,shape,by_file", [(True, (1, 28, 28), False), (False, (28, 28), True)],
                         ids=["gz-folder-1x28x28", "raw-file-28x28"])
def test_idx(tmp_path, capsys, gz, shape, by_file):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    y = (np.arange(300) % 10).astype(np.uint8)
    images = write_idx(tmp_path / "train-images-idx3-ubyte", x, gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y, gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x[:7], gz)  # the test split: not imported
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[:7], gz)
    rc, out, err = cli(capsys, images if by_file else tmp_path, "--profile", profile(tmp_path, shape),
                       "--classes-per-task", 2, "--batch", 64, "--checkpoint-rows", 100)
    assert rc == 0, err
    assert "imported 300 rows" in out and "records sha256: " in out and err == ""  # no TTY: no bar
    got = stored(tmp_path)
    order = np.argsort(got["id"])
    assert got["x"].shape == (300, *shape)
    np.testing.assert_array_equal(got["x"][order].reshape(300, 28, 28), x)
    np.testing.assert_array_equal(got["y"][order], y)
    np.testing.assert_array_equal(got["task"][order], y // 2)
    rec = record(tmp_path)
    assert rec["complete"] and rec["rows"] == 300 and rec["source"]["format"] == "idx"
    assert len(rec["source"]["files"]) == 2 and all(len(f["sha256"]) == 64 for f in rec["source"]["files"])


def test_cifar_folder_and_tar_gz(tmp_path, capsys):
    rng = np.random.default_rng(1)
    batches = write_cifar10(tmp_path / "data", 6, rng)
    # The folder (its parent also finds it), the train split: data_batch_1..5 in order.
    rc, out, err = cli(capsys, tmp_path / "data", "--profile", profile(tmp_path, (3, 32, 32)))
    assert rc == 0, err
    got = stored(tmp_path)
    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(got["x"], train_x)
    np.testing.assert_array_equal(got["y"], train_y)
    # The official archive, read in place: the test split into a second memory.
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "data" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    other = tmp_path / "m2"
    other.mkdir()
    rc, out, err = cli(capsys, archive, "--profile", profile(other, (3, 32, 32)), "--split", "test")
    assert rc == 0, err
    got = stored(other)
    np.testing.assert_array_equal(got["x"], batches["test_batch"][0])
    np.testing.assert_array_equal(got["y"], batches["test_batch"][1])
    # CIFAR-100: one "train" file, the fine labels.
    top = tmp_path / "c100" / "cifar-100-python"
    top.mkdir(parents=True)
    data, fine = rng.integers(0, 256, (5, 3072), dtype=np.uint8), [99, 0, 42, 7, 7]
    (top / "train").write_bytes(pickle.dumps({"data": data, "fine_labels": fine, "coarse_labels": [1] * 5}))
    third = tmp_path / "m3"
    third.mkdir()
    rc, out, err = cli(capsys, top, "--profile", profile(third, (3, 32, 32)))
    assert rc == 0, err
    got = stored(third)
    assert got["y"].tolist() == fine and np.array_equal(got["x"], data.reshape(5, 3, 32, 32))


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path, capsys):
    top = tmp_path / "cifar-10-batches-py"
    top.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (top / name).write_bytes(pickle.dumps(os.system))  # what a tampered file would hold
    rc, out, err = cli(capsys, top, "--profile", profile(tmp_path, (3, 32, 32)))
    assert rc == 2 and "refusing to load posix.system" in err and not (tmp_path / "flash").exists()


def test_npz_keys_tasks_and_limit(tmp_path, capsys):
    x = np.arange(40 * 6, dtype=np.uint8).reshape(40, 6)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", images=x, targets=y, task=np.arange(40) // 10)
    p = profile(tmp_path, (6,))
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p)
    assert rc == 2 and "needs arrays 'x' (samples) and 'y' (labels)" in err and "--x-key" in err
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p, "--x-key", "images", "--y-key", "targets",
                       "--limit", 25)
    assert rc == 0, err
    got = stored(tmp_path)
    np.testing.assert_array_equal(got["x"], x[:25])
    np.testing.assert_array_equal(got["task"], np.arange(25) // 10)  # the file's own task array
    # A larger limit goes on from row 25; nothing imported twice.
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p, "--x-key", "images", "--y-key", "targets")
    assert rc == 0 and "imported 40 rows (15 added now" in out, err
    got = stored(tmp_path)
    np.testing.assert_array_equal(got["x"], x)
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p, "--x-key", "images", "--y-key", "targets")
    assert rc == 0 and "(0 added now)" in out
    # The same rows with other task ids would store them twice: refused.
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p, "--x-key", "images", "--y-key", "targets",
                       "--classes-per-task", 2)
    assert rc == 2 and "imported before with other task ids" in err


def test_a_memory_of_a_nested_profile(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.arange(24, dtype=np.uint8).reshape(6, 4), y=np.arange(6))
    p = tmp_path / "daemon.toml"
    p.write_text("".join(f'[memories.{m}.memory]\nem_size = 4\nsample_shape = [4]\n'
                         f'[[memories.{m}.tiers]]\nkind = "lmdb"\npath = "{m}"\ncapacity = 100\n' for m in ("a", "b")))
    rc, _, err = cli(capsys, tmp_path / "d.npz", "--profile", p)
    assert rc == 2 and "has no memory 'default'; it has a, b" in err
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p, "--memory", "b")
    assert rc == 0 and "--memory b --verify" in out, err
    assert stored(tmp_path, "b")["y"].tolist() == list(range(6)) and not (tmp_path / "a").exists()


def test_image_folder(tmp_path, capsys):
    from storage_backends import png  # part of the base install: a failing import must fail the test
    rng = np.random.default_rng(2)
    images = {}
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(png.encode_png(img))
            images[(cls, i)] = img
    rc, out, err = cli(capsys, tmp_path / "imgs", "--profile", profile(tmp_path, (3, 8, 8)),
                       "--task-of-class", "cat:0,dog:1")
    assert rc == 0, err
    got = stored(tmp_path)
    expected = np.stack([images[(c, i)].transpose(2, 0, 1) for c in ("cat", "dog") for i in range(3)])
    np.testing.assert_array_equal(got["x"], expected)  # HWC decoded -> the memory's CHW
    assert got["y"].tolist() == [0, 0, 0, 1, 1, 1] and got["task"].tolist() == [0, 0, 0, 1, 1, 1]


# ---- refusals: nothing added ------------------------------------------------------------------------------

def test_mismatches_are_refused_before_anything_is_added(tmp_path, capsys):
    x = np.zeros((20, 28, 28), np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", x, True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(20, np.uint8), True)
    rc, _, err = cli(capsys, tmp_path, "--profile", profile(tmp_path, (3, 32, 32)))
    assert rc == 2 and "shape [28, 28] do not fit the memory's sample_shape [3, 32, 32]" in err
    np.savez(tmp_path / "f.npz", x=np.zeros((5, 4), np.float32), y=np.zeros(5, np.int64))
    rc, _, err = cli(capsys, tmp_path / "f.npz", "--profile", profile(tmp_path, (4,)))
    assert rc == 2 and "samples are float32, the memory stores uint8" in err
    assert not (tmp_path / "flash").exists()  # the memory was never opened
    rc, _, err = cli(capsys, tmp_path, "--profile", profile(tmp_path, (28, 28), capacity=10))
    assert rc == 2 and "20 rows do not fit" in err and "--limit 10" in err
    assert stored(tmp_path)["id"].size == 0


def test_refused_while_a_daemon_holds_the_data_lock(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4), np.uint8), y=np.zeros(5, np.int64))
    lock = FileLock(str(tmp_path / "daemon.lock"), "data directory")  # what `carousel serve` holds
    try:
        rc, _, err = cli(capsys, tmp_path / "d.npz", "--profile", profile(tmp_path, (4,)))
    finally:
        lock.release()
    assert rc == 1 and "a carousel daemon (or another import) is using" in err and "daemon.lock" in err
    assert not (tmp_path / "flash").exists()


def test_the_lock_file_is_the_daemons():
    from carousel.daemon.service import LOCK_NAME
    assert LOCK_NAME == "daemon.lock"  # carousel.cli names it without importing the service (torch)


# ---- crash and resume --------------------------------------------------------------------------------------

def test_resume_after_sigkill_never_loses_or_doubles_a_row(tmp_path, capsys):
    n = 100_000
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    x[:, :4] = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 4)  # each row says which it is
    y = rng.integers(0, 10, n)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    p = profile(tmp_path, (16,))
    args = ["-m", "carousel", "import", str(tmp_path / "d.npz"), "--profile", str(p), "--batch", "16",
            "--checkpoint-rows", "4000", "--classes-per-task", "5"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state_dir = tmp_path / "flash-state" / "imports"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # killed once a few checkpoints are in
            files = list(state_dir.glob("*.json")) if state_dir.exists() else []
            try:
                if files and json.loads(files[0].read_text())["rows"] >= 4000:
                    time.sleep(0.03)  # more rows added (and stored by write-behind) than recorded
                    break
            except (ValueError, OSError):
                pass  # (only a half-read: the file is replaced by rename)
            time.sleep(0.005)
        assert proc.poll() is None, f"the import ended before it could be killed: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    before = record(tmp_path)
    assert 4000 <= before["rows"] < n and before["run"] is not None and not before["complete"]
    unrecorded = stored(tmp_path)["id"].size - before["rows"]  # added and stored after the last checkpoint
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p, "--classes-per-task", 5)
    assert rc == 0, err
    assert f"imported {n} rows" in out
    # Rows the killed run stored but had not recorded were found by id, checked, and kept (not added again).
    assert unrecorded >= 0 and (f"{unrecorded} recovered from an interrupted run" in out if unrecorded else
                                "recovered" not in out), (unrecorded, out)
    got = stored(tmp_path)
    rows = got["x"][:, :4].copy().view("<u4").ravel()
    assert got["id"].size == n and np.array_equal(np.sort(rows), np.arange(n))  # each row once, none lost
    np.testing.assert_array_equal(got["x"], x[rows])
    np.testing.assert_array_equal(got["y"], y[rows])
    np.testing.assert_array_equal(got["task"], y[rows] // 5)
    after = record(tmp_path)
    assert after["complete"] and after["run"] is None and after["rows"] == n
    # The record's ids are the stored ones, row for row.
    mapped = {}
    for lo, hi, first in after["done"]:
        mapped.update(zip(range(first, first + hi - lo), range(lo, hi)))
    assert [mapped[i] for i in got["id"].tolist()] == rows.tolist()


def test_sigterm_records_what_was_added_and_a_rerun_finishes(tmp_path, capsys):
    """SIGTERM is Ctrl-C: the rows added so far are flushed, then recorded; exit 130; nothing left to reconcile."""
    n = 100_000
    x = np.zeros((n, 8), np.uint8)
    x[:, :4] = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 7)
    p = profile(tmp_path, (8,))
    proc = subprocess.Popen([sys.executable, "-m", "carousel", "import", str(tmp_path / "d.npz"), "--profile", str(p),
                             "--batch", "16", "--checkpoint-rows", "50000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state_dir = tmp_path / "flash-state" / "imports"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(state_dir.glob("*.json")):
        time.sleep(0.005)
    time.sleep(0.15)  # adding (~1 s for all rows here), well before the first checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; rerun the same command to resume" in err, err
    before = record(tmp_path)
    assert 0 < before["rows"] < n and before["rows"] == stored(tmp_path)["id"].size  # flushed, then recorded
    rc, out, err = cli(capsys, tmp_path / "d.npz", "--profile", p)
    assert rc == 0 and f"imported {n} rows ({n - before['rows']} added now" in out and "recovered" not in out, err
    rows = stored(tmp_path)["x"][:, :4].copy().view("<u4").ravel()
    assert np.array_equal(np.sort(rows), np.arange(n))


# ---- verify ------------------------------------------------------------------------------------------------

def test_verify_catches_a_changed_source_and_a_changed_record(tmp_path, capsys):
    x = np.arange(30 * 4, dtype=np.uint8).reshape(30, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    p = profile(tmp_path, (4,))
    assert cli(capsys, tmp_path / "d.npz", "--profile", p)[0] == 0
    rc, out, _ = cli(capsys, tmp_path / "d.npz", "--profile", p, "--verify")
    assert rc == 0 and "verify: ok" in out and "30 rows" in out
    x2 = x.copy()
    x2[7, 1] ^= 1
    np.savez(tmp_path / "d.npz", x=x2, y=np.arange(30) % 3)
    rc, out, _ = cli(capsys, tmp_path / "d.npz", "--profile", p, "--verify")
    assert rc == 1 and "changed since the import" in out and "verify: FAILED" in out
    # Importing the changed file is refused too: it would add its rows beside the old ones.
    rc, _, err = cli(capsys, tmp_path / "d.npz", "--profile", p)
    assert rc == 2 and "changed since it was imported" in err
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)  # restored: verifies again
    assert cli(capsys, tmp_path / "d.npz", "--profile", p, "--verify")[0] == 0
    # A stored record rewritten behind the memory's back (same schema, other bytes): the records digest differs.
    with open_store(f"lmdb://{tmp_path}/flash") as store:
        rec = {k: v.copy() for k, v in store.get_many([5]).items()}
        rec["x"][0, 0] ^= 0xFF
        store.put_many([5], rec)
    rc, out, _ = cli(capsys, tmp_path / "d.npz", "--profile", p, "--verify")
    assert rc == 1 and "1 stored records differ from their source rows" in out


def test_verify_of_an_idx_folder_whose_file_changed(tmp_path, capsys):
    x = np.arange(10 * 9, dtype=np.uint8).reshape(10, 3, 3)
    write_idx(tmp_path / "train-images-idx3-ubyte", x, False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(10, dtype=np.uint8), False)
    p = profile(tmp_path, (3, 3))
    assert cli(capsys, tmp_path, "--profile", p)[0] == 0
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(10, np.uint8), False)  # relabelled
    rc, out, _ = cli(capsys, tmp_path, "--profile", p, "--verify")
    assert rc == 1 and "train-labels-idx1-ubyte changed since the import" in out


# ---- real data and the command line ----------------------------------------------------------------------

@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"real Fashion-MNIST not found in {FASHION} (see shared/datasets/README.md)")
def test_real_fashion_mnist(tmp_path, capsys):
    from carousel.formats import read_idx

    rc, out, err = cli(capsys, FASHION, "--profile", profile(tmp_path, (1, 28, 28)), "--limit", 3000,
                       "--classes-per-task", 2)
    assert rc == 0, err
    assert "imported 3000 rows" in out
    got = stored(tmp_path)
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:3000]
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:3000]
    np.testing.assert_array_equal(got["x"][:, 0], x)
    np.testing.assert_array_equal(got["y"], y)
    assert set(got["task"].tolist()) == {0, 1, 2, 3, 4}


def test_import_help_and_verify_need_no_torch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4), np.uint8), y=np.zeros(3, np.int64))
    code = ("import sys; sys.modules['torch'] = None; from carousel.cli import main; "
            "rc = main(sys.argv[1:]); print('torch-free', rc)")
    out = subprocess.run([sys.executable, "-c", code, "import", str(tmp_path / "d.npz"), "--profile",
                          str(profile(tmp_path, (4,))), "--verify"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert "no import of" in out.stderr and "torch-free 2" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-c", code.replace("main(sys.argv[1:])", "main(['import', '--help'])")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "usage: carousel import" in out.stdout and "--classes-per-task" in out.stdout
