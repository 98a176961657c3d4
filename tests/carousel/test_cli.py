"""The command line and the demo, as real processes."""

import subprocess
import sys

import numpy as np

from storage_backends import open_store


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kw)


def test_demo_writes_reads_and_verifies(tmp_path):
    out = run("-m", "trainers", "demo", "--samples", "1500", "--out", str(tmp_path), "--train-per-class", "40",
              "--train-out", str(tmp_path / "train"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "demo: ok" in out.stdout
    with open_store(f"lmdb://{tmp_path}/flash") as s:
        assert len(s) == 1500
    # The daemon leg: every sample added through `carousel serve`, replayed and checked, clean exit.
    assert "daemon: 1500 samples added" in out.stdout and "SIGTERM -> exit 0" in out.stdout
    with open_store(f"lmdb://{tmp_path}/daemon/flash") as s:
        assert len(s) == 1500
    # The training leg: ER RAM-only and through a daemon of its own, a table and a figure.
    assert "| ram | 1 |" in out.stdout and "| carousel-daemon | 1 |" in out.stdout
    assert (tmp_path / "train" / "accuracy.png").is_file()
    assert (tmp_path / "train" / "carousel-daemon-s0" / "result.json").is_file()


def test_demo_without_data_uses_generated_images(tmp_path):
    out = run("-m", "trainers", "demo", "--samples", "300", "--out", str(tmp_path), "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "demo: ok" in out.stdout
    assert "training on generated data" in out.stdout and (tmp_path / "runs" / "demo" / "table.md").is_file()


def test_store_info_and_verify(tmp_path):
    url = f"zarr://{tmp_path}/z?chunk=8"
    with open_store(url, {"x": ((4,), "uint8")}) as s:
        s.put_many(np.arange(20), {"x": np.arange(80, dtype=np.uint8).reshape(20, 4)})
        row = int(s._manifest.lookup(np.array([5]))[1][0])
    info = run("-m", "carousel", "store", "info", url)
    assert info.returncode == 0 and "records:    20" in info.stdout
    assert run("-m", "carousel", "store", "verify", url).returncode == 0
    # flip one byte of record 5 in its chunk file: verify must find it and quarantine it
    chunk = tmp_path / "z" / "x" / "c" / str(row // 16384) / "0"
    data = bytearray(chunk.read_bytes())
    data[(row % 16384) * 4] ^= 0xFF
    chunk.write_bytes(bytes(data))
    bad = run("-m", "carousel", "store", "verify", url)
    assert bad.returncode == 1 and "1 corrupt" in bad.stdout
    with open_store(url) as s:
        assert s.quarantined_ids().tolist() == [5] and len(s) == 19


def test_store_commands_on_a_missing_store_exit_2(tmp_path):
    out = run("-m", "carousel", "store", "info", f"lmdb://{tmp_path}/none")
    assert out.returncode == 2 and "no LMDB store" in out.stderr
