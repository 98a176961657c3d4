"""The end-to-end demo: real samples into every storage tier and back, then ER trained side by side
with a RAM-only buffer and with carousel running as a daemon.

``python -m trainers demo [--data-root DIR] [--samples N] [--out DIR] [--train-per-class N] [--skip-training]``

Reads a real data set (CIFAR-10, Fashion-MNIST or MNIST, whichever ``--data-root`` holds; with
none it says so and uses generated images), writes the samples with their labels and task ids
into an LMDB store (flash tier) and a Zarr store (disk tier), closes them, reopens them from the
URL alone, reads random batches back, checks every byte against the source, and prints what each
tier holds and how fast it went. It exercises the storage tiers on their own, so it talks to
``storage_backends`` directly -- the one place in ``trainers`` that does. Then it starts the daemon
(``carousel serve``, a real subprocess) on a profile with a 500-sample EM and an LMDB tier, adds the
same samples through ``carousel.connect``, replays batches from the shared-memory ring while
observing them (so CarM swaps samples in from storage), checks every replayed sample byte for byte
against the source, and stops the daemon with SIGTERM. Last, it trains ER (reduced ResNet-18, EM of
200 samples) on Split-FashionMNIST (Split-MNIST, or generated data, when that is what there is) twice:
with the classic RAM-only buffer, and through a ``carousel serve`` daemon started in the background
(the same 200-sample EM plus an LMDB tier holding every past sample, CarM swapping). It prints the
accuracy table and writes the figure (``runs/demo``), then stops the daemon cleanly.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import carousel

from storage_backends import open_store

from .datasets import DatasetError, Split, load_any

DEFAULT_ROOTS = ("../shared/datasets", "data", "/usr/share/datasets")


def _source(data_root: str | None, samples: int, seed: int) -> tuple[str, Split]:
    roots = [data_root] if data_root else [r for r in DEFAULT_ROOTS if Path(r).is_dir()]
    for root in roots:
        try:
            name, split = load_any(root)
            break
        except DatasetError as exc:
            if data_root:
                raise SystemExit(f"demo: {exc}") from None
    else:
        print("demo: no data set found under", roots or DEFAULT_ROOTS, "- using generated 28x28 images")
        rng = np.random.default_rng(seed)
        split = Split(rng.integers(0, 256, (samples, 1, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, samples), "generated")
        name = "generated"
    take = np.random.default_rng(seed).permutation(len(split.labels))[:samples]
    return name, Split(split.images[take], split.labels[take], split.source)


def run(data_root: str | None, samples: int, out: str | None, seed: int = 0) -> list[dict]:
    name, split = _source(data_root, samples, seed)
    n = len(split.labels)
    # Class-incremental tasks of two classes each, as in Split-MNIST.
    fields = {"x": split.images, "y": split.labels, "task": (split.labels // 2).astype(np.int16)}
    schema = {"x": (split.images.shape[1:], "uint8"), "y": ((), "int64"), "task": ((), "int16")}
    workdir = Path(out) if out else Path(tempfile.mkdtemp(prefix="carousel-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"demo: {n} samples of {name} ({split.source}), shape {split.images.shape[1:]}, into {workdir}")
    urls = {"flash (LMDB)": f"lmdb://{workdir}/flash", "disk (Zarr, zstd)": f"zarr://{workdir}/disk?codec=zstd&chunk=64"}
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    results = []
    try:
        for tier, url in urls.items():
            shutil.rmtree(url.split("://", 1)[1].split("?")[0], ignore_errors=True)
            t0 = time.perf_counter()
            with open_store(url, schema) as store:
                for lo in range(0, n, 256):
                    store.put_many(ids[lo:lo + 256], {k: v[lo:lo + 256] for k, v in fields.items()})
                store.flush()
            ingest = n / (time.perf_counter() - t0)
            with open_store(url) as store:  # reopened from the URL alone
                assert len(store) == n, f"{tier}: {len(store)} records after reopen, wrote {n}"
                picks = [rng.choice(ids, min(256, n), replace=False) for _ in range(20)]
                t0 = time.perf_counter()
                batches = [store.get_many(p) for p in picks]
                read = sum(p.size for p in picks) / (time.perf_counter() - t0)
                for p, b in zip(picks, batches):
                    for k in fields:
                        if not np.array_equal(b[k], fields[k][p]):
                            raise SystemExit(f"demo: {tier} returned different {k!r} bytes")
                seen = sum(c.ids.size for c in store.iter_chunks())
                results.append({"tier": tier, "url": url, "records": len(store), "bytes": store.nbytes,
                                "ingest_per_s": ingest, "get_per_s": read, "chunk_walk": seen})
        daemon = _through_daemon(fields, workdir / "daemon", seed)
    finally:
        if not out:
            shutil.rmtree(workdir, ignore_errors=True)
    raw = n * (split.images[0].nbytes + 8 + 2)
    print(f"\n{'tier':<20}{'records':>9}{'on disk':>12}{'vs raw':>8}{'put/s':>10}{'get/s':>10}  checked")
    for r in results:
        print(f"{r['tier']:<20}{r['records']:>9}{r['bytes'] / 2**20:>10.1f}Mi{r['bytes'] / raw:>7.2f}x"
              f"{r['ingest_per_s']:>10.0f}{r['get_per_s']:>10.0f}  every byte of 20x256 random reads, "
              f"{r['chunk_walk']} records walked by chunk")
    print(f"\ndaemon: {daemon['added']} samples added through `carousel serve` (EM 500 + LMDB tier), "
          f"{daemon['batches']} replay batches of 256 from its shared-memory ring, every sample checked; "
          f"{daemon['swapped_in']} swapped in from flash meanwhile; sample(256) p50 {daemon['p50_us']:.0f} us, "
          f"p99 {daemon['p99_us']:.0f} us; SIGTERM -> exit {daemon['exit']}")
    print("\ndemo: ok - every tier returned exactly what was written, after a reopen from its URL, "
          "and the daemon replayed exactly what was added")
    return results


def _through_daemon(fields: dict[str, np.ndarray], workdir: Path, seed: int, batches: int = 60) -> dict:
    """Add every sample through a real daemon, replay and observe batches, check them byte for byte."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    shape = list(fields["x"].shape[1:])
    profile = workdir / "profile.toml"
    profile.write_text(f"""[daemon]
socket_dir = "{workdir / 'sock'}"
data_dir = "{workdir}"
metrics = ""
[memory]
em_size = 500
sample_shape = {shape}
seed = {seed}
[swap]
ratio = 0.5
[[tiers]]
kind = "lmdb"
path = "{workdir / 'flash'}"
capacity = {len(fields['y'])}
""")
    with open(workdir / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carousel", "serve", "--config", str(profile)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        mem = carousel.connect(str(workdir / "sock" / "carousel.sock"), wait_s=60, reconnect_s=60)  # it is starting
        n = len(fields["y"])
        order = np.argsort(fields["task"], kind="stable")  # class-incremental: task by task
        ids = np.empty(n, dtype=np.int64)
        for lo in range(0, n, 256):
            pick = order[lo:lo + 256]
            ids[lo:lo + len(pick)] = mem.add(fields["x"][pick], fields["y"][pick], fields["task"][pick]).numpy()
        source = np.empty(n, dtype=np.int64)
        source[ids] = order  # id -> row of the source arrays
        mem.flush()
        rng = np.random.default_rng(seed)
        lat = []
        for _ in range(batches):
            t0 = time.perf_counter()
            batch = mem.sample(256)
            lat.append(time.perf_counter() - t0)
            rows = source[batch.ids.numpy()]
            if not (np.array_equal(batch.x.numpy(), fields["x"][rows])
                    and np.array_equal(batch.y.numpy(), fields["y"][rows])):
                raise SystemExit("demo: the daemon replayed samples that differ from what was added")
            mem.observe(batch.ids, logits=torch.from_numpy(rng.normal(size=(len(batch), 10)).astype(np.float32)))
        stats = mem.stats()
        mem.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    if code != 0:
        raise SystemExit(f"demo: the daemon exited with {code}; see {workdir / 'daemon.log'}")
    return {"added": stats["added"], "batches": batches, "swapped_in": stats["swapped_in"],
            "p50_us": float(np.percentile(lat, 50) * 1e6), "p99_us": float(np.percentile(lat, 99) * 1e6),
            "exit": code}


def training_benchmark(data_root: str | None) -> tuple[str, str | None]:
    """The benchmark the training leg runs and its data root: Split-FashionMNIST, else Split-MNIST,
    from the same roots as the storage check (so both legs use the same data), else generated data."""
    from .streams import make_stream

    for candidate in ([data_root] if data_root else [r for r in DEFAULT_ROOTS if Path(r).is_dir()]):
        for name in ("split-fashion-mnist", "split-mnist"):
            try:
                make_stream(name, candidate, limit_per_class=1)
                return name, candidate
            except DatasetError:
                continue
    print("demo: neither Fashion-MNIST nor MNIST found - training on generated data")
    return "generated", data_root


def train_side_by_side(data_root: str | None, out: Path, per_class: int, seed: int = 0,
                       progress: bool = True, eval_limit: int = 1000) -> dict:
    """ER with a RAM-only buffer and through a carousel daemon, same EM, same seed: the table and figure."""
    from .compare import compare
    from .run import RunConfig

    benchmark, root = training_benchmark(data_root)
    base = RunConfig(benchmark=benchmark, method="er", em_size=200, arch="reduced-resnet18", seed=seed,
                     data_root=root, limit_per_class=per_class, eval_limit=eval_limit, progress=progress)
    print(f"\ndemo: ER on {benchmark} ({per_class} training samples per class, reduced ResNet-18, EM 200), "
          f"RAM-only and through a carousel daemon")
    return compare(base, ["ram", "carousel-daemon"], [seed], out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainers demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help=f"data sets folder (default: the first of {DEFAULT_ROOTS} that exists)")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--out", help="keep the stores in this folder (default: a temp folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=1000,
                        help="training samples per class for the ER comparison (default 1000)")
    parser.add_argument("--train-out", default="runs/demo", help="where the comparison's table and figure go")
    parser.add_argument("--eval-limit", type=int, default=1000, help="test samples per task in the comparison "
                        "(default 1000)")
    parser.add_argument("--skip-training", action="store_true", help="only the storage and daemon checks")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run(args.data_root, args.samples, args.out, args.seed)
    if not args.skip_training:
        train_side_by_side(args.data_root, Path(args.train_out), args.train_per_class, args.seed,
                           progress=not args.no_progress, eval_limit=args.eval_limit)
