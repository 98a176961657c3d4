"""Real Mammoth runs with its own ``Buffer`` and with ``CarouselBuffer`` swapped in for it.

``python -m benchmarks.mammoth_real --mammoth PATH [--python PY] [--models er,derpp,xder,icarl]
[--datasets seq-mnist,seq-cifar10] [--buffers mammoth,carousel-ram,carousel-lmdb] [--mnist DIR]
[--cifar10 DIR | --synthetic-cifar10] [--tasks N] [--timeout S] [--out DIR] [-- MAMMOTH FLAGS]``

Runs a Mammoth checkout's own entry point (``PATH/main.py``: argument parsing, dataset, backbone,
model, ``utils/training.py``'s train loop and evaluation) as a subprocess of ``--python`` (an
interpreter with Mammoth's requirements; this repository goes on its ``PYTHONPATH``), once per
model x dataset x buffer, one run at a time, CPU only, with short settings: ``--n_epochs 1
--batch_size 32 --buffer_size 200 --debug_mode 1`` (Mammoth's own debug mode: 6 training and 6
evaluation batches per task, W&B off), ``--stop_after N`` (``--tasks``, default 2 of the 5 tasks:
task 2 replays task 1's buffer and every model's end-of-task buffer code runs twice),
``--num_workers 0 --seed 0 --non_verbose 1``; CPU by ``CUDA_VISIBLE_DEVICES=""`` (Mammoth's
``--device`` takes GPU ids). seq-cifar10 runs on Mammoth's ``reduced-resnet18`` backbone (its
default ResNet-18 is ~10x the FLOPs); anything after ``--`` is added to every run's flags.

Buffers:

- ``mammoth``: Mammoth untouched (its ``utils/buffer.py`` ``Buffer``): the reference, must work.
- ``carousel-ram`` / ``carousel-lmdb``: before Mammoth's ``main.py`` runs (``runpy``, as
  ``__main__``, in the same process), the child imports Mammoth's ``utils.buffer`` and sets its
  ``Buffer`` to a subclass of :class:`carousel.integrations.mammoth.CarouselBuffer` that only adds
  ``tiers=`` (none, or one LMDB tier) to whatever arguments Mammoth passes. Mammoth's models do
  ``from utils.buffer import Buffer`` when they are imported (after the swap), so every rehearsal
  model builds its buffers from it; Mammoth's helpers that live beside ``Buffer`` in
  ``utils/buffer.py`` (``fill_buffer``, ``icarl_replay``, ...) stay Mammoth's own and meet
  ``CarouselBuffer`` as they find it. Nothing else of Mammoth is changed. Each such run records
  the CarouselBuffers it built (arguments, final length, samples seen): proof the swap took.

What the child does to every run (all buffers alike), because this machine has no network:
``datasets/__init__.py`` imports every dataset module and ``datasets/seq_8vision.py`` downloads
CLIP ViT-B-16 weights when it is imported, so the child puts an empty module in its place (the
runs never use that dataset); ``HF_HUB_OFFLINE=1``, ``MAMMOTH_TEST=1`` (Mammoth's switch to ignore a
``.env`` file), ``WANDB_MODE=disabled``.

Data: ``--mnist DIR`` is torchvision's MNIST layout (``DIR/raw/*-ubyte[.gz]``): the real files are
placed (linked, or un-gzipped) under ``<out>/data/MNIST/{MNIST,MyMNIST}/raw``, where torchvision
finds them without downloading. CIFAR-10: the real files when ``--cifar10 DIR``
(``cifar-10-batches-py/`` inside) is given; otherwise, with ``--synthetic-cifar10``, the script
writes a small CIFAR-10 in the original pickle format (``data_batch_1..5``, ``test_batch``,
``batches.meta``; random uint8 32x32x3 images, 160 train and 20 test per class, so 320 per task,
a multiple of the batch size) and their md5 sums (``SYNTHETIC``), and the child gives
torchvision's ``CIFAR10`` those sums in place of the real archive's (its integrity check still
runs, against these files; Mammoth's ``MyCIFAR10`` downloads when it fails). Such runs are
labelled ``seq-cifar10 (synthetic)``: they exercise the code paths on CIFAR-10-shaped data, their
accuracies mean nothing. Without either, seq-cifar10 is reported as skipped.

Reported per run: exit status, wall time, the last ``Accuracy for N task(s): [Class-IL] ..
[Task-IL]`` line's figures if it finished, and if it crashed the first error: exception type and
message, the deepest frame in the Mammoth checkout (file:line) and the deepest frame overall. Logs
of every run are kept in ``<out>/logs``; the table and figures go to ``<out>/results.md`` and
``<out>/results.json``. It asserts nothing.

Venv recipe (no GPU, only package registries): a Python 3.11 venv with ``torch==2.13.0
torchvision==0.28.0`` (the index's build; it loads torchvision, the local CPU wheel does not), then
``kornia "timm==0.9.8" onedrivedownloader ftfy regex pyyaml open_clip_torch networkx requests six
pandas`` (Mammoth's requirements.txt plus what its dataset modules import at start-up), and
carousel's own dependencies (``lmdb zarr numcodecs google-crc32c aiofiles prometheus-client tqdm
matplotlib``, or ``pip install -e .``). docs/results/mammoth-real.md has the commands.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

MODELS: dict[str, list[str]] = {
    "er": ["--model", "er", "--lr", "0.1"],
    "derpp": ["--model", "derpp", "--lr", "0.1", "--alpha", "0.1", "--beta", "0.5"],
    "xder": ["--model", "xder", "--lr", "0.1", "--alpha", "0.3", "--beta", "0.8"],
    "icarl": ["--model", "icarl", "--lr", "0.1"],
}
# Other rehearsal models, opt-in (``--models``): not in the default matrix.
EXTRA_MODELS: dict[str, list[str]] = {
    "der": ["--model", "der", "--lr", "0.1", "--alpha", "0.3"],
    "er-ace": ["--model", "er-ace", "--lr", "0.1"],
    "gdumb": ["--model", "gdumb", "--lr", "0.1"],
    "xder-ce": ["--model", "xder-ce", "--lr", "0.1", "--alpha", "0.3", "--beta", "0.8"],
    "xder-rpc": ["--model", "xder-rpc", "--lr", "0.1", "--alpha", "0.3", "--beta", "0.8"],
    "lucir": ["--model", "lucir", "--lr", "0.1"],
    "bic": ["--model", "bic", "--lr", "0.1"],
    "agem": ["--model", "agem", "--lr", "0.1"],
    "fdr": ["--model", "fdr", "--lr", "0.1", "--alpha", "0.3"],
    "mer": ["--model", "mer", "--lr", "0.1", "--beta", "1", "--gamma", "1"],
    "rpc": ["--model", "rpc", "--lr", "0.1"],
    "gss": ["--model", "gss", "--lr", "0.1"],
    "er-tricks": ["--model", "er-tricks", "--lr", "0.1"],
    "twf": ["--model", "twf", "--lr", "0.1", "--der_alpha", "0.3", "--der_beta", "0.8", "--lambda_fp", "0.1"],
}
DATASETS = ("seq-mnist", "seq-cifar10")
# Mammoth's own reduced ResNet-18 (nf=20) instead of seq-cifar10's default ResNet-18: ~10x fewer FLOPs on 2 CPUs.
DATASET_FLAGS: dict[str, list[str]] = {"seq-mnist": [], "seq-cifar10": ["--backbone", "reduced-resnet18"]}
BUFFERS = ("mammoth", "carousel-ram", "carousel-lmdb")
COMMON = ["--buffer_size", "200", "--n_epochs", "1", "--batch_size", "32", "--debug_mode", "1",
          "--num_workers", "0", "--seed", "0", "--non_verbose", "1"]
# Dataset modules that reach the network when imported (datasets/__init__.py imports them all).
BLOCKED_MODULES = ("datasets.seq_8vision",)
ACCURACY = re.compile(r"Accuracy for (\d+) task\(s\):\s*\[Class-IL\]:\s*([0-9.]+) %\s*\[Task-IL\]:\s*([0-9.]+) %")
FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (.+)$')
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---- the child: one Mammoth run in this process ---------------------------------------------------
def _frame_dict(frame: Any) -> dict:
    return {"file": frame.filename, "line": frame.lineno, "function": frame.name, "code": frame.line}


def first_error(exc: BaseException, mammoth: Path) -> dict:
    """The exception's type and message, its deepest frame in ``mammoth`` and its deepest frame."""
    import traceback
    frames = traceback.extract_tb(exc.__traceback__)
    root = str(mammoth.resolve()) + os.sep
    inside = [f for f in frames if f.filename.startswith(root)]
    return {"type": type(exc).__name__, "message": str(exc).strip(),
            "mammoth_frame": _frame_dict(inside[-1]) if inside else None,
            "frame": _frame_dict(frames[-1]) if frames else None}


BUILT: list[Any] = []  # the child's CarouselBuffers, for child.json (proof that the swap took)


def _swap_buffer(kind: str, work: Path) -> None:
    """Mammoth's ``utils.buffer.Buffer`` becomes ``CarouselBuffer`` (with an LMDB tier for ``carousel-lmdb``)."""
    import utils.buffer  # Mammoth's

    from carousel.integrations.mammoth import CarouselBuffer

    tiers = [{"kind": "lmdb", "capacity": 100_000}] if kind == "carousel-lmdb" else None
    roots = work / "carousel-buffers"
    roots.mkdir(parents=True, exist_ok=True)

    class MammothCarouselBuffer(CarouselBuffer):
        """``CarouselBuffer`` given exactly Mammoth's arguments, plus ``tiers``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            import tempfile
            kwargs.setdefault("tiers", tiers)
            if tiers:
                kwargs.setdefault("root", tempfile.mkdtemp(prefix="buf-", dir=roots))
            BUILT.append((self, [repr(x) for x in args], {k: repr(v) for k, v in kwargs.items()}))
            super().__init__(*args, **kwargs)

    MammothCarouselBuffer.__name__ = MammothCarouselBuffer.__qualname__ = "Buffer"
    utils.buffer.Buffer = MammothCarouselBuffer


def _allow_synthetic_cifar10(folder: Path) -> None:
    """torchvision's CIFAR10 checks its files against the md5 sums of the synthetic set in ``folder``
    (written with it, in ``SYNTHETIC``) instead of the real archive's: the check still runs."""
    from torchvision.datasets import CIFAR10
    sums = json.loads((folder / "SYNTHETIC").read_text())["md5"]
    CIFAR10.train_list = [[name, sums[name]] for name, _ in CIFAR10.train_list]
    CIFAR10.test_list = [[name, sums[name]] for name, _ in CIFAR10.test_list]
    CIFAR10.meta = {**CIFAR10.meta, "md5": sums[CIFAR10.meta["filename"]]}


def child(args: argparse.Namespace, mammoth_args: list[str]) -> int:
    import runpy
    import types

    mammoth = Path(args.mammoth).resolve()
    error_file = Path(args.error_file)
    sys.path.insert(0, str(mammoth))
    for name in BLOCKED_MODULES:
        sys.modules[name] = types.ModuleType(name, "blocked by benchmarks.mammoth_real: imports need the network")
    try:
        if args.synthetic_folder:
            _allow_synthetic_cifar10(Path(args.synthetic_folder))
        if args.buffer != "mammoth":
            _swap_buffer(args.buffer, Path(args.work))
        sys.argv = [str(mammoth / "main.py"), *mammoth_args]
        runpy.run_path(str(mammoth / "main.py"), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            error_file.write_text(json.dumps(first_error(e, mammoth)))
        raise
    except BaseException as e:
        error_file.write_text(json.dumps(first_error(e, mammoth)))
        raise
    finally:
        if args.buffer != "mammoth":
            info = [{"args": a_, "kwargs": k_, "len": _safe(lambda b=b: len(b)), "seen": getattr(b, "num_seen_examples", None)}
                    for b, a_, k_ in BUILT]
            (Path(args.work) / "child.json").write_text(json.dumps({"carousel_buffers": info}))
    return 0


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- a broken buffer is reported, not raised
        return repr(e)


# ---- the parent: data, the matrix, the report ------------------------------------------------------
def place_mnist(src: Path, base: Path) -> None:
    """torchvision's MNIST files (un-gzipped) from ``src`` (or ``src/raw``) where Mammoth's seq-mnist
    finds them: torchvision looks in ``<root>/<class name>/raw`` and Mammoth's root is
    ``base/MNIST`` with classes ``MyMNIST`` (train) and ``MNIST`` (test)."""
    raw_src = src / "raw" if (src / "raw").is_dir() else src
    raw = base / "MNIST" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        dst = raw / name
        if dst.exists():
            continue
        if (raw_src / name).exists():
            dst.symlink_to((raw_src / name).resolve())
        elif (raw_src / f"{name}.gz").exists():
            with gzip.open(raw_src / f"{name}.gz", "rb") as f_in, open(dst, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            raise FileNotFoundError(f"no {name}[.gz] in {raw_src}")
    mine = base / "MNIST" / "MyMNIST"
    mine.mkdir(parents=True, exist_ok=True)
    if not (mine / "raw").exists():
        (mine / "raw").symlink_to(raw.resolve())


def write_synthetic_cifar10(base: Path, per_class_train: int = 160, per_class_test: int = 20, seed: int = 0) -> Path:
    """A CIFAR-10 in the original python-pickle layout with random images; returns its folder."""
    import numpy as np
    folder = base / "CIFAR10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n_per_class: int, label: str) -> dict:
        labels = np.repeat(np.arange(10), n_per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {"batch_label": label, "labels": labels.tolist(), "data": data,
                "filenames": [f"synthetic_{label.replace(' ', '_')}_{i}.png" for i in range(len(labels))]}

    assert per_class_train % 5 == 0, "the train set is split into five batches"
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_class_train // 5, f"training batch {i} of 5"), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(per_class_test, "testing batch 1 of 1"), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_class_train * 2, "num_vis": 3072}, f)
    import hashlib
    sums = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.name != "SYNTHETIC"}
    (folder / "SYNTHETIC").write_text(json.dumps(
        {"note": "random images written by benchmarks.mammoth_real; not CIFAR-10", "md5": sums}, indent=1))
    return folder


def traceback_from_log(text: str, mammoth: Path) -> dict | None:
    """The last traceback in ``text``: its exception line, deepest Mammoth frame and deepest frame
    (for a child that died without writing its error file)."""
    start = text.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    frames: list[dict] = []
    last = None
    for line in text[start:].splitlines()[1:]:
        m = FRAME.match(line)
        if m:
            frames.append({"file": m.group(1), "line": int(m.group(2)), "function": m.group(3), "code": None})
        elif line and not line[0].isspace():
            last = line
            break
    if last is None:
        return None
    kind, _, message = last.partition(": ")
    root = str(mammoth.resolve()) + os.sep
    inside = [f for f in frames if f["file"].startswith(root)]
    return {"type": kind.rsplit(".", 1)[-1], "message": message.strip(),
            "mammoth_frame": inside[-1] if inside else None, "frame": frames[-1] if frames else None}


def final_accuracy(text: str) -> dict | None:
    found = ACCURACY.findall(text)
    if not found:
        return None
    tasks, class_il, task_il = found[-1]
    return {"tasks": int(tasks), "class_il": float(class_il), "task_il": float(task_il)}


def run_one(a: argparse.Namespace, model: str, dataset: str, buffer: str, base: Path, logs: Path,
            synthetic: Path | None) -> dict:
    name = f"{model}-{dataset}-{buffer}"
    work = (logs / name).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    error_file = work / "error.json"
    mammoth_args = [*{**MODELS, **EXTRA_MODELS}[model], "--dataset", dataset, *DATASET_FLAGS[dataset], *COMMON,
                    *(["--stop_after", str(a.tasks)] if a.tasks else []), "--base_path", f"{base}/", *a.extra]
    cmd = [a.python, "-m", "benchmarks.mammoth_real", "--child", "--mammoth", str(a.mammoth), "--buffer", buffer,
           "--error-file", str(error_file), "--work", str(work)]
    if synthetic:
        cmd += ["--synthetic-folder", str(synthetic)]
    cmd += ["--", *mammoth_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "MAMMOTH_TEST": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
           "WANDB_MODE": "disabled"}
    log = work / "log.txt"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc: int | None = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            timeout=a.timeout, check=False).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    error = json.loads(error_file.read_text()) if error_file.exists() else None
    if error is None and rc not in (0, None):
        error = traceback_from_log(text, Path(a.mammoth))
    if timed_out:
        error = {"type": "Timeout", "message": f"killed after {a.timeout} s", "mammoth_frame": None, "frame": None}
    child_info = json.loads((work / "child.json").read_text()) if (work / "child.json").exists() else None
    acc = final_accuracy(text)
    status = "ok" if rc == 0 and acc is not None else ("timeout" if timed_out else "crash")
    shutil.rmtree(work / "carousel-buffers", ignore_errors=True)
    return {"model": model, "dataset": dataset + (" (synthetic)" if synthetic else ""), "buffer": buffer,
            "status": status, "returncode": rc, "wall_s": round(wall, 1), "accuracy": acc, "error": error,
            "carousel_buffers": child_info and child_info["carousel_buffers"], "log": str(log.relative_to(logs.parent)), "command": cmd}


def _where(frame: dict | None, mammoth: Path) -> str:
    if not frame:
        return ""
    path = Path(frame["file"])
    try:
        shown = str(path.resolve().relative_to(mammoth.resolve()))
    except ValueError:
        try:
            shown = str(path.resolve().relative_to(ROOT))
        except ValueError:
            shown = path.name
    return f"{shown}:{frame['line']}"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(rows: list[dict], mammoth: Path) -> list[str]:
    lines = ["| model | dataset | buffer | status | CarouselBuffers built (len/seen at exit) | class-IL % | task-IL % | wall s | first error | Mammoth file:line | raised at |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        acc, err, built = r["accuracy"], r["error"], r.get("carousel_buffers")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["dataset"], r["buffer"], r["status"] if r["returncode"] is None else f"{r['status']} (rc {r['returncode']})",
            "" if built is None else f"{len(built)}" + "".join(f" ({b['len']}/{b['seen']})" for b in built),
            f"{acc['class_il']:.2f}" if acc else "", f"{acc['task_il']:.2f}" if acc else "", r["wall_s"],
            _cell(f"{err['type']}: {err['message']}") if err else "",
            _where(err and err["mammoth_frame"], mammoth), _where(err and err["frame"], mammoth)))
    return lines


def _versions(python: str) -> dict:
    code = ("import json, platform, torch, torchvision; import kornia; "
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
            "'torchvision': torchvision.__version__, 'kornia': kornia.__version__}))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                                         check=False).stdout)
    except Exception as e:  # noqa: BLE001 -- recorded, not fatal
        return {"error": repr(e)}


def _git_head(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    mammoth_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, mammoth_args = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks.mammoth_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--mammoth", required=True, help="a Mammoth checkout (its main.py is run)")
    p.add_argument("--python", default=sys.executable, help="the interpreter with Mammoth's requirements")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, of {','.join(MODELS)} (default) and {','.join(EXTRA_MODELS)}")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--buffers", default=",".join(BUFFERS))
    p.add_argument("--mnist", default="/work/shared/datasets/MNIST", help="torchvision's MNIST folder (raw/ inside)")
    p.add_argument("--cifar10", default=None, help="a folder with the real cifar-10-batches-py/")
    p.add_argument("--synthetic-cifar10", action="store_true",
                   help="without --cifar10: write a small random CIFAR-10 (pickle format) and run on it")
    p.add_argument("--tasks", type=int, default=2, help="Mammoth's --stop_after: tasks run of 5 (0: all)")
    p.add_argument("--timeout", type=float, default=180, help="seconds per run")
    p.add_argument("--out", default="bench-out/mammoth_real")
    # the child's options (internal)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--buffer", default="mammoth", help=argparse.SUPPRESS)
    p.add_argument("--error-file", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--synthetic-folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.extra = mammoth_args  # parent: more Mammoth flags for every run (after --)
    if a.child:
        sys.exit(child(a, mammoth_args))

    from . import report

    mammoth = Path(a.mammoth).resolve()
    a.mammoth = str(mammoth)
    out = Path(a.out).resolve()
    logs = out / "logs"
    base = out / "data"
    logs.mkdir(parents=True, exist_ok=True)
    models = [m for m in a.models.split(",") if m]
    datasets = [d for d in a.datasets.split(",") if d]
    buffers = [b for b in a.buffers.split(",") if b]
    for name, chosen, known in (("model", models, {**MODELS, **EXTRA_MODELS}), ("dataset", datasets, DATASETS), ("buffer", buffers, BUFFERS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            p.error(f"unknown {name}(s) {unknown}; known: {list(known)}")

    skipped: dict[str, str] = {}
    synthetic: Path | None = None
    if "seq-mnist" in datasets:
        place_mnist(Path(a.mnist), base)
    if "seq-cifar10" in datasets:
        if a.cifar10:  # the real CIFAR-10
            dst = base / "CIFAR10"
            dst.mkdir(parents=True, exist_ok=True)
            link = dst / "cifar-10-batches-py"
            if not link.exists():
                link.symlink_to((Path(a.cifar10) / "cifar-10-batches-py").resolve())
        elif a.synthetic_cifar10:
            synthetic = write_synthetic_cifar10(base)
        else:
            skipped["seq-cifar10"] = "no CIFAR-10 files (--cifar10 DIR) and --synthetic-cifar10 not given"
            datasets.remove("seq-cifar10")

    rows = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for dataset in datasets:
        for model in models:
            for buffer in buffers:
                r = run_one(a, model, dataset, buffer, base, logs, synthetic if dataset == "seq-cifar10" else None)
                err = r["error"]
                print(f"{r['model']:6} {r['dataset']:24} {r['buffer']:14} {r['status']:7} {r['wall_s']:6.1f}s "
                      + (f"acc {r['accuracy']}" if r["accuracy"] else "")
                      + (f"{err['type']}: {_cell(err['message'], 100)} @ {_where(err['mammoth_frame'], mammoth)}" if err else ""),
                      flush=True)
                rows.append(r)

    carousel_head = _git_head(ROOT)
    results = {"started": started, "mammoth": {"path": str(mammoth), "commit": _git_head(mammoth)},
               "carousel_commit": carousel_head, "python": a.python, "versions": _versions(a.python),
               "mammoth_flags": COMMON, "model_flags": {m: {**MODELS, **EXTRA_MODELS}[m] for m in models}, "dataset_flags": DATASET_FLAGS, "tasks": a.tasks,
               "extra_flags": a.extra, "blocked_modules": list(BLOCKED_MODULES),
               "skipped": skipped, "rows": rows}
    lines = [f"Mammoth {(results['mammoth']['commit'] or '?')[:7]}, carousel {(carousel_head or '?')[:7]}, "
             f"started {started}; flags: `{' '.join(COMMON)}" + (f" --stop_after {a.tasks}" if a.tasks else "")
             + (f" {' '.join(a.extra)}" if a.extra else "") + "`"
             + "".join(f"; {d}: `{' '.join(f)}`" for d, f in DATASET_FLAGS.items() if f and d in datasets),
             "", *table(rows, mammoth)]
    for d, why in skipped.items():
        lines += ["", f"{d} skipped: {why}"]
    return report.write(out, results, lines)


if __name__ == "__main__":
    main()
