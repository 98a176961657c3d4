"""``python -m benchmarks.gain_map``: where carousel helps -- its accuracy gain over a RAM-only
buffer of the same size, mapped over EM sizes and stream sizes.

    python -m benchmarks.gain_map --jobs 2                       # the whole map (hours on 2 cores)
    python -m benchmarks.gain_map --benchmarks split-mnist --jobs 2   # one data set
    python -m benchmarks.gain_map --report-only                  # rewrite the report from the rows

Every cell (data set, method, stream size per class, EM size) is trained with the RAM-only buffer
(``ram``) and with carousel at its default settings (``carousel``: one LMDB tier, CarM swap-out,
ratio 0.5, the trainers' deterministic swap mode) for every seed. Where the default's gain is
not clear or has faded (see :func:`wants_extras`) the cell is also trained with
``carousel-ratio1`` (swap ratio 1.0) and ``carousel-balanced`` (the ``carm_balanced`` swap-out
policy), so the map says whether another setting keeps the gain (``--extras all`` runs them
everywhere, ``none`` nowhere).

The gain is paired by seed: a seed fixes the class order, the data order and the model's
initialisation, so ``carousel - ram`` of one seed compares like with like, and the spread over
seeds is the spread of that difference. It is plotted against the EM's share of the stream
(``em / (stream per class x classes)``), the quantity a user choosing an EM size knows.

Runs go to ``--workdir`` (default ``runs/gain-map``), one ``result.json`` each; every finished run
is also one row of ``OUT/gain-map.json``, so the map resumes from either (an interrupted run is
started again; finished ones never are) and a clone of the repository can go on from the rows
committed with it. ``--stop-after SECONDS`` starts no run after that long, so a session can stop
the map cleanly and the next one goes on. ``OUT/gain-map.md`` is the table, with the cells that
still lack seeds and the cells where carousel is worse than RAM-only by more than one std;
``OUT/gain-map.png`` the figure.

Each run is a ``python -m trainers run`` subprocess with ``--threads cores // jobs``; ``--device
cuda`` passes through where a GPU is available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = ("ram", "carousel")
EXTRAS = ("carousel-ratio1", "carousel-balanced")
SETTINGS = BASE + EXTRAS
# What each setting adds to ``python -m trainers run`` (the balanced profile's path is filled in).
SETTING_ARGS: dict[str, list[str]] = {
    "ram": ["--memory", "ram"],
    "carousel": ["--memory", "carousel"],
    "carousel-ratio1": ["--memory", "carousel", "--swap-ratio", "1.0"],
    "carousel-balanced": ["--memory", "carousel", "--profile", "{balanced}"],
}
CLASSES = {"split-mnist": 10, "split-fashion-mnist": 10, "split-cifar10": 10, "split-cifar100": 100,
           "generated": 10}
METRICS = ("final_avg_accuracy", "forgetting", "task_il_accuracy")


@dataclass(frozen=True, order=True)
class RunKey:
    """One training run of the map."""

    benchmark: str
    stream: int          # training samples per class
    em: int
    method: str
    seed: int
    setting: str

    @property
    def cell(self) -> tuple[str, str, int, int]:
        return (self.benchmark, self.method, self.stream, self.em)

    def folder(self, workdir: Path) -> Path:
        return workdir / self.benchmark / self.method / f"n{self.stream}" / f"em{self.em}" / f"{self.setting}-s{self.seed}"


@dataclass(frozen=True)
class Common:
    """The settings every run of one map shares; a map never mixes two of them."""

    epochs: int = 1
    eval_limit: int = 1000
    arch: str = "auto"
    device: str = "cpu"

    def args(self) -> list[str]:
        return ["--epochs", str(self.epochs), "--eval-limit", str(self.eval_limit), "--arch", self.arch,
                "--device", self.device]


def share(benchmark: str, stream: int, em: int) -> float:
    """The EM's share of the stream, in percent."""
    return 100.0 * em / (stream * CLASSES[benchmark])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def clear_gain(gains: Sequence[float]) -> bool:
    """Whether paired gains (points) show carousel clearly ahead: a mean of at least one point that
    is also larger than the spread over seeds. Below that the map tries the other settings."""
    mean, std = _mean_std(gains)
    return len(gains) > 0 and mean >= 1.0 and (math.isnan(std) or mean > std)


FADED = 3.0  # points: a mean gain below this counts as faded, and the map tries the other settings


def wants_extras(gains: Sequence[float]) -> bool:
    """Whether a cell's default gains call for the other settings: no clear gain, or one under
    :data:`FADED` points -- where a user would ask whether another setting keeps it."""
    return not clear_gain(gains) or statistics.fmean(gains) < FADED


def _row(key: RunKey, result: dict[str, Any]) -> dict[str, Any]:
    stats = (result.get("memory") or {}).get("stats") or {}
    return {**asdict(key), **{m: result[m] for m in METRICS},
            "train_s": result["wall_time_s"]["train"], "steps": result["steps"],
            "swapped_in": stats.get("swapped_in", 0), "class_order": result["stream"]["class_order"]}


def _key(row: dict[str, Any]) -> RunKey:
    return RunKey(**{f: row[f] for f in RunKey.__dataclass_fields__})


def _matches(result: dict[str, Any], key: RunKey, common: Common) -> bool:
    """A result.json on disk is this run's only if it was made with the same settings."""
    c = result.get("config", {})
    want = {"benchmark": key.benchmark, "method": key.method, "em_size": key.em, "seed": key.seed,
            "limit_per_class": key.stream, "epochs": common.epochs, "eval_limit": common.eval_limit,
            "arch": common.arch, "memory": SETTING_ARGS[key.setting][1],
            "swap_ratio": 1.0 if key.setting == "carousel-ratio1" else None,
            "swap_mode": "deterministic"}
    if any(c.get(k) != v for k, v in want.items()):
        return False
    return (c.get("profile") is not None) == (key.setting == "carousel-balanced")


class Rows:
    """``gain-map.json``'s rows: one per finished run, written after each (atomically)."""

    def __init__(self, path: Path, common: Common) -> None:
        self.path = path
        self.common = common
        self._lock = threading.Lock()
        self.rows: dict[RunKey, dict[str, Any]] = {}
        if path.is_file():
            data = json.loads(path.read_text())
            saved = Common(**data["common"])
            if saved != common:
                raise SystemExit(f"{path} holds runs made with {saved}, not {common}: give another --out")
            self.rows = {_key(r): r for r in data["runs"]}

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.rows[_key(row)] = row
            self.save()

    def save(self, summary: dict[str, Any] | None = None) -> None:
        data = {"command": "python -m benchmarks.gain_map", "common": asdict(self.common),
                "runs": [self.rows[k] for k in sorted(self.rows)]}
        if summary is not None:
            data["cells"] = summary["cells"]
        else:
            data["cells"] = summarise(self.rows.values())["cells"]
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


def _finite(obj: Any) -> Any:
    """``obj`` with NaN (a std of one seed, a mean of none) as null: the file stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def summarise(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Cells: per setting the accuracy over seeds and, for carousel settings, the gain over ``ram``
    paired by seed (only seeds where both ran count)."""
    by_cell: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        by_cell.setdefault((r["benchmark"], r["method"], r["stream"], r["em"]), {}) \
            .setdefault(r["setting"], {})[r["seed"]] = r
    cells = []
    for (benchmark, method, stream, em), settings in sorted(by_cell.items()):
        ram = settings.get("ram", {})
        cell: dict[str, Any] = {"benchmark": benchmark, "method": method, "stream": stream, "em": em,
                                "share_pct": share(benchmark, stream, em), "settings": {}}
        for name in SETTINGS:
            runs = settings.get(name)
            if not runs:
                continue
            acc = [runs[s]["final_avg_accuracy"] for s in sorted(runs)]
            entry: dict[str, Any] = {"seeds": sorted(runs), "acc": _mean_std(acc),
                                     "forgetting": _mean_std([runs[s]["forgetting"] for s in sorted(runs)]),
                                     "train_s": _mean_std([runs[s]["train_s"] for s in sorted(runs)])}
            if name != "ram":
                paired = sorted(set(runs) & set(ram))
                gains = [runs[s]["final_avg_accuracy"] - ram[s]["final_avg_accuracy"] for s in paired]
                entry.update(paired=paired, gains=gains, gain=_mean_std(gains),
                             wins=sum(g > 0 for g in gains), clear=clear_gain(gains))
            cell["settings"][name] = entry
        cells.append(cell)
    return {"cells": cells}


def planned(benchmarks: Sequence[str], methods: Sequence[str], streams: Sequence[int], ems: Sequence[int],
            seeds: Sequence[int]) -> list[RunKey]:
    """The base runs, in the order they start: data set by data set, small streams first, and a
    seed's ``ram`` and ``carousel`` runs next to each other so pairs finish together."""
    return [RunKey(b, n, e, m, s, st) for b in benchmarks for n in streams for e in ems for m in methods
            for s in seeds for st in BASE]


def extras_for(cell: tuple[str, str, int, int], rows: dict[RunKey, dict[str, Any]], seeds: Sequence[int],
               mode: str) -> list[RunKey]:
    """The extra settings' runs a cell needs once its base runs are all in (``mode``: auto | all | none)."""
    benchmark, method, stream, em = cell
    if mode == "none":
        return []
    base = {s: {st: rows.get(RunKey(benchmark, stream, em, method, s, st)) for st in BASE} for s in seeds}
    if any(r is None for per in base.values() for r in per.values()):
        return []
    gains = [base[s]["carousel"]["final_avg_accuracy"] - base[s]["ram"]["final_avg_accuracy"] for s in seeds]
    if mode == "auto" and not wants_extras(gains):
        return []
    return [RunKey(benchmark, stream, em, method, s, st) for st in EXTRAS for s in seeds]


def _balanced_profile(workdir: Path, key: RunKey) -> Path:
    """The default carousel profile (one LMDB tier holding the stream, ratio 0.5) with ``carm_balanced``."""
    path = workdir / "profiles" / f"balanced-{key.benchmark}-n{key.stream}.toml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        capacity = key.stream * CLASSES[key.benchmark]
        path.write_text('[swap]\nratio = 0.5\npolicy = "carm_balanced"\n\n[[tiers]]\nkind = "lmdb"\n'
                        f'path = "tier0-lmdb"\ncapacity = {capacity}\nsync = false\n')
    return path


def command(key: RunKey, common: Common, workdir: Path, threads: int) -> list[str]:
    """The ``python -m trainers run`` command line of one run."""
    extra = [a.format(balanced=_balanced_profile(workdir, key)) if "{balanced}" in a else a
             for a in SETTING_ARGS[key.setting]]
    return [sys.executable, "-m", "trainers", "run", "--benchmark", key.benchmark, "--method", key.method,
            "--em-size", str(key.em), "--limit-per-class", str(key.stream), "--seed", str(key.seed),
            *extra, *common.args(), "--threads", str(threads), "--no-progress",
            "--out", str(key.folder(workdir))]


def _run(key: RunKey, common: Common, workdir: Path, threads: int, data_root: str | None) -> dict[str, Any]:
    folder = key.folder(workdir)
    done = folder / "result.json"
    if done.is_file():  # finished since the queue was made (another map process on the same workdir)
        result = json.loads(done.read_text())
        if _matches(result, key, common):
            return result
    folder.mkdir(parents=True, exist_ok=True)
    cmd = command(key, common, workdir, threads) + (["--data-root", data_root] if data_root else [])
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (folder / "log.txt").read_text()[-2000:]
        raise RuntimeError(f"{key}: exit {proc.returncode}\n{tail}")
    return json.loads((folder / "result.json").read_text())


def _adopt(base: Sequence[RunKey], seeds: Sequence[int], rows: Rows, workdir: Path) -> None:
    """Rows for runs (base, or their cells' extras) whose result.json is on disk from an earlier,
    interrupted map."""
    cells = dict.fromkeys(k.cell for k in base)
    extras = [RunKey(b, n, e, m, s, st) for (b, m, n, e) in cells for s in seeds for st in EXTRAS]
    for key in [*base, *extras]:
        path = key.folder(workdir) / "result.json"
        if key not in rows.rows and path.is_file():
            result = json.loads(path.read_text())
            if _matches(result, key, rows.common):
                rows.rows[key] = _row(key, result)


def _log(message: str) -> None:
    print(f"[gain-map {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_map(base: list[RunKey], rows: Rows, workdir: Path, seeds: Sequence[int], extras: str, jobs: int,
            threads: int, stop_after: float | None, data_root: str | None) -> int:
    """Run what is missing, ``jobs`` at a time; returns how many runs finished."""
    cells = list(dict.fromkeys(k.cell for k in base))
    _adopt(base, seeds, rows, workdir)
    rows.save()
    queue = [k for k in base if k not in rows.rows]
    done_cells: set = set()
    start = time.monotonic()
    finished = 0
    running: dict[Future, RunKey] = {}

    def more_extras() -> None:
        fresh: list[RunKey] = []
        for cell in cells:
            if cell in done_cells:
                continue
            want = extras_for(cell, rows.rows, seeds, extras)
            if want or all(RunKey(cell[0], cell[2], cell[3], cell[1], s, st) in rows.rows
                           for s in seeds for st in BASE):
                done_cells.add(cell)
                queued = set(queue) | set(running.values())
                fresh += [k for k in want if k not in rows.rows and k not in queued]
        # Extras go to the front, in plan order: a cell's picture is complete soonest.
        queue[:0] = fresh

    more_extras()
    _log(f"{len(rows.rows)} runs on record, {len(queue)} runs to go, {jobs} at a time, {threads} thread(s) each")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while queue or running:
            late = stop_after is not None and time.monotonic() - start > stop_after
            while queue and len(running) < jobs and not late:
                key = queue.pop(0)
                running[pool.submit(_run, key, rows.common, workdir, threads, data_root)] = key
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                try:
                    rows.add(_row(key, future.result()))
                    finished += 1
                    acc = rows.rows[key]["final_avg_accuracy"]
                    _log(f"done {key.benchmark} {key.method} n{key.stream} em{key.em} {key.setting} "
                         f"s{key.seed}: {acc:.2f}% ({len(queue)} queued)")
                except RuntimeError as exc:  # one failed run is reported; the map goes on
                    _log(f"FAILED {exc}")
            more_extras()
        if queue:
            _log(f"stopped after {stop_after:.0f} s with {len(queue)} runs not started; run again to go on")
    return finished


# -- the report -------------------------------------------------------------------------------------

def _pm(ms: Sequence[float], digits: int = 1) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" +- {std:.{digits}f}")


def _gain_text(entry: dict[str, Any] | None) -> str:
    if not entry or not entry.get("paired"):
        return "-"
    sign = "+" if entry["gain"][0] >= 0 else ""
    return f"{sign}{_pm(entry['gain'])} ({entry['wins']}/{len(entry['paired'])})"


def incomplete(cells: Sequence[dict[str, Any]], min_seeds: int, plan: Sequence[Sequence[Any]] = ()) -> list[str]:
    """Cells whose ram or carousel runs (or the extras they started) have fewer than ``min_seeds``
    paired seeds, and the cells of ``plan`` ((benchmark, method, stream, em) each) with no run yet."""
    have = {(c["benchmark"], c["method"], c["stream"], c["em"]) for c in cells}
    out = [f"{b} {m} stream {n}/class EM {e}: no run yet" for (b, m, n, e) in plan if (b, m, n, e) not in have]
    for c in cells:
        for name, entry in c["settings"].items():
            n = len(entry["seeds"]) if name == "ram" else len(entry["paired"])
            if n < min_seeds:
                out.append(f"{c['benchmark']} {c['method']} stream {c['stream']}/class EM {c['em']}: {name} has {n}")
        if "carousel" not in c["settings"]:
            out.append(f"{c['benchmark']} {c['method']} stream {c['stream']}/class EM {c['em']}: carousel has 0")
    return out


def worse(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Settings in cells where carousel is worse than RAM-only by more than one std of the paired gain."""
    out = []
    for c in cells:
        for name, entry in c["settings"].items():
            if name == "ram" or len(entry.get("paired", ())) < 2:
                continue
            mean, std = entry["gain"]
            if mean + std < 0:
                out.append(f"{c['benchmark']} {c['method']} stream {c['stream']}/class EM {c['em']} "
                           f"({c['share_pct']:.2f} % of the stream), {name}: {_gain_text(entry)}")
    return out


def markdown(data: dict[str, Any], min_seeds: int, plan: Sequence[Sequence[Any]] = ()) -> str:
    cells = data["cells"]
    common = data["common"]
    lines = ["# Where carousel helps: the gain map", "",
             "Made by `python -m benchmarks.gain_map` (the rows: `gain-map.json`). Final class-IL "
             f"average accuracy (%), {common['epochs']} epoch(s) per task, the trainers' default model "
             f"and learning rate, {common['eval_limit']} test samples per task, device {common['device']}. "
             "Gain = carousel minus RAM-only, paired by seed (mean +- std over seeds; in brackets the "
             "seeds where carousel is ahead). Share = the EM's share of the stream. `carousel`: the "
             "default (one LMDB tier, CarM swap-out, ratio 0.5); `ratio 1.0` and `carm_balanced` ran "
             f"where the default's gain is not clear (under 1 point, or under its std) or under {FADED:g} points.", ""]
    for benchmark in dict.fromkeys(c["benchmark"] for c in cells):
        lines += [f"## {benchmark}", "",
                  "| method | stream/class | EM | share | RAM-only | carousel | gain | gain, ratio 1.0 | gain, carm_balanced | forgetting RAM -> carousel | train time vs RAM |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in (c for c in cells if c["benchmark"] == benchmark):
            s = c["settings"]
            ram, car = s.get("ram"), s.get("carousel")
            forget = (f"{_pm(ram['forgetting'])} -> {_pm(car['forgetting'])}" if ram and car else "-")
            speed = f"{car['train_s'][0] / ram['train_s'][0]:.2f}x" if ram and car else "-"
            lines.append(f"| {c['method']} | {c['stream']} | {c['em']} | {c['share_pct']:.2f} % | "
                         f"{_pm(ram['acc']) if ram else '-'} | {_pm(car['acc']) if car else '-'} | "
                         f"{_gain_text(car)} | {_gain_text(s.get('carousel-ratio1'))} | "
                         f"{_gain_text(s.get('carousel-balanced'))} | {forget} | {speed} |")
        lines.append("")
    bad = worse(cells)
    lines += ["## Cells where carousel is worse than RAM-only by more than one std", ""]
    lines += [f"- {b}" for b in bad] or ["- none"]
    missing = incomplete(cells, min_seeds, plan)
    lines += ["", f"## Cells with fewer than {min_seeds} seeds", ""]
    lines += [f"- {m}" for m in missing] or ["- none: every cell has them"]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Gain against the EM's share of the stream: a panel per data set and method, a colour per
    setting, solid for the larger stream, dashed for the smaller."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    cells = data["cells"]
    benchmarks = list(dict.fromkeys(c["benchmark"] for c in cells))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    if not cells:
        return
    streams = sorted({c["stream"] for c in cells})
    colours = {"carousel": "tab:blue", "carousel-ratio1": "tab:orange", "carousel-balanced": "tab:green"}
    fig, axes = plt.subplots(len(benchmarks), len(methods), figsize=(5.2 * len(methods), 3.6 * len(benchmarks)),
                             squeeze=False, sharex=True, sharey=True)
    for i, benchmark in enumerate(benchmarks):
        for j, method in enumerate(methods):
            _panel(axes[i][j], cells, benchmark, method, streams, colours, FuncFormatter(lambda v, _: f"{v:g}"))
        axes[i][0].set_ylabel("gain over RAM-only (points)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, cells: Sequence[dict[str, Any]], benchmark: str, method: str, streams: Sequence[int],
           colours: dict[str, str], formatter: Any) -> None:
    """One data set and method: a line per setting and stream size, std as error bars."""
    for name, colour in colours.items():
        for stream in streams:
            pts = sorted((c["share_pct"], c["settings"][name]["gain"]) for c in cells
                         if (c["benchmark"], c["method"], c["stream"]) == (benchmark, method, stream)
                         and name in c["settings"] and c["settings"][name].get("paired"))
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1][0] for p in pts]
            err = [0.0 if math.isnan(p[1][1]) else p[1][1] for p in pts]
            ax.errorbar(x, y, yerr=err, color=colour, marker="o", ms=4, capsize=3,
                        ls="-" if stream == streams[-1] else "--",
                        label=f"{name}, {stream}/class")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel("EM share of the stream (%)")
    ax.set_title(f"{benchmark}, {method}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def report(rows: Rows, out: Path, min_seeds: int, plan: Sequence[RunKey] = ()) -> dict[str, Any]:
    """Write gain-map.{json,md,png} from the rows (the md also names the cells of ``plan`` that have
    no run yet); returns the json's content."""
    summary = summarise(rows.rows.values())
    rows.save(summary)
    data = {"common": asdict(rows.common), "cells": summary["cells"], "runs": [rows.rows[k] for k in sorted(rows.rows)]}
    cells = list(dict.fromkeys(k.cell for k in plan))
    (out / "gain-map.md").write_text(markdown(data, min_seeds, cells))
    plot(data, out / "gain-map.png")
    return data


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gain_map", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", default="split-fashion-mnist,split-mnist")
    p.add_argument("--methods", default="er,derpp")
    p.add_argument("--ems", default="50,100,200,500,1000", help="EM sizes")
    p.add_argument("--streams", default="1000,6000", help="training samples per class")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--extras", default="auto", choices=("auto", "all", "none"),
                   help="ratio 1.0 and carm_balanced: where the default's gain is not clear or has faded (auto), everywhere, nowhere")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-limit", type=int, default=1000, help="test samples per task")
    p.add_argument("--arch", default="auto")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is available")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="runs at a time")
    p.add_argument("--data-root", default=None)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gain-map")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--stop-after", type=float, default=None, help="seconds; start no run after that")
    p.add_argument("--min-seeds", type=int, default=3, help="the report lists cells with fewer")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the rows; run nothing")
    args = p.parse_args(argv)

    for b in args.benchmarks.split(","):
        if b not in CLASSES:
            p.error(f"unknown benchmark {b!r}; known: {', '.join(CLASSES)}")
    common = Common(epochs=args.epochs, eval_limit=args.eval_limit, arch=args.arch, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = Rows(args.out / "gain-map.json", common)
    seeds = _ints(args.seeds)
    base = planned(args.benchmarks.split(","), args.methods.split(","), _ints(args.streams), _ints(args.ems), seeds)
    if args.report_only:
        _adopt(base, seeds, rows, args.workdir)
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.device == "cpu" else 1
        run_map(base, rows, args.workdir, seeds, args.extras, args.jobs, threads, args.stop_after, args.data_root)
    data = report(rows, args.out, args.min_seeds, base)
    _log(f"wrote {args.out / 'gain-map.json'}, .md, .png ({len(data['runs'])} runs)")
    return data


if __name__ == "__main__":
    main()
