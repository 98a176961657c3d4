"""``python -m trainers compare``: one method in several memory modes over several seeds.

    python -m trainers compare --benchmark split-fashion-mnist --method er \\
        --modes ram,carousel,carousel-sync,storage --seeds 0,1,2 --out runs/compare-er

Modes: ``ram``, ``carousel`` (async swapping), ``carousel-sync`` (``--swap-workers 0``: the
synchronous ablation), ``carousel-daemon`` (the memory in a ``carousel serve`` subprocess), and
``storage`` (replay read from a store of every past sample); ``carousel-raw`` and
``carousel-saliency`` store samples raw or saliency-compressed (``--tier-capacity "1MiB"`` gives
both the same byte budget). Every (mode, seed) run is written to
``OUT/MODE-sSEED/result.json``; the table (mean +- std over seeds: final average accuracy,
task-IL accuracy, forgetting, train time and its ratio to ``ram``) goes to ``OUT/table.md`` and
``OUT/compare.json``, the figure to ``OUT/accuracy.png``. Runs already on disk with the same
settings are reused, so an interrupted comparison resumes. A mode may name its own seeds
(``storage:0`` or ``carousel-sync:0+1``) when it is too slow to run with all of them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import metrics, plot
from .run import RunConfig, add_run_arguments, config_from_args, run

VARIANTS: dict[str, dict[str, Any]] = {
    "ram": {"memory": "ram"},
    "carousel": {"memory": "carousel"},
    "carousel-sync": {"memory": "carousel", "swap_workers": 0},
    "carousel-daemon": {"memory": "carousel", "daemon": True},
    "storage": {"memory": "storage"},
    # The same carousel memory, samples stored raw or saliency-compressed (give both the same
    # --tier-capacity in bytes: the byte-budget experiment).
    "carousel-raw": {"memory": "carousel", "memory_kind": "plain"},
    "carousel-saliency": {"memory": "carousel", "memory_kind": "saliency"},
}


def variant_config(base: RunConfig, mode: str, seed: int, out: Path) -> RunConfig:
    if mode not in VARIANTS:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(VARIANTS)}")
    cfg = RunConfig(**{**asdict(base), **VARIANTS[mode], "seed": seed, "label": mode,
                       "out": str(out / f"{mode}-s{seed}")})
    return cfg


def _reusable(cfg: RunConfig) -> dict[str, Any] | None:
    path = Path(cfg.out) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    # A setting added since the run was written counts as its default.
    saved = {**asdict(RunConfig()), **result.get("config", {})}
    same = {k: v for k, v in saved.items() if k not in ("progress", "out")} == \
        {k: v for k, v in asdict(cfg).items() if k not in ("progress", "out")}
    return result if same else None


def table(results: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Markdown lines and the numbers: per mode, mean and std over seeds."""
    rows: dict[str, dict[str, float]] = {}
    base_train = None
    if "ram" in results:
        base_train = metrics.mean_std([r["wall_time_s"]["train"] for r in results["ram"]])[0]
    stored = {m: [_stored(r) for r in runs] for m, runs in results.items()}
    show_stored = any(s for ss in stored.values() for s in ss)  # a run with storage tiers
    lines = ["| memory | seeds | final avg acc (class-IL) | task-IL acc | forgetting | train time (s) | "
             "vs ram | replay sample (s) |" + (" samples on storage | bytes per stored sample |" if show_stored else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if show_stored else "")]
    for mode, runs in results.items():
        acc = metrics.mean_std([r["final_avg_accuracy"] for r in runs])
        til = metrics.mean_std([r["task_il_accuracy"] for r in runs])
        fgt = metrics.mean_std([r["forgetting"] for r in runs])
        train = metrics.mean_std([r["wall_time_s"]["train"] for r in runs])
        sample = metrics.mean_std([r["wall_time_s"]["replay_sample"] for r in runs])
        ratio = train[0] / base_train if base_train else float("nan")
        rows[mode] = {"final_avg_accuracy_mean": acc[0], "final_avg_accuracy_std": acc[1],
                      "task_il_accuracy_mean": til[0], "task_il_accuracy_std": til[1],
                      "forgetting_mean": fgt[0], "forgetting_std": fgt[1], "train_s_mean": train[0],
                      "train_s_std": train[1], "train_ratio_to_ram": ratio, "replay_sample_s_mean": sample[0],
                      "seeds": len(runs)}
        line = (f"| {mode} | {len(runs)} | {acc[0]:.2f} +- {acc[1]:.2f} | {til[0]:.2f} +- {til[1]:.2f} | "
                f"{fgt[0]:.2f} +- {fgt[1]:.2f} | {train[0]:.1f} +- {train[1]:.1f} | {ratio:.3f} | {sample[0]:.2f} |")
        if show_stored:
            got = [s for s in stored[mode] if s]
            if got:
                n = metrics.mean_std([s[0] for s in got])[0]
                per = sum(s[1] for s in got) / max(sum(s[0] for s in got), 1)
                rows[mode].update(stored_samples_mean=n, bytes_per_stored_sample=per)
                line += f" {n:.0f} | {per:.0f} |"
            else:
                line += " - | - |"
        lines.append(line)
    return lines, rows


def _stored(result: dict[str, Any]) -> tuple[int, int] | None:
    """(samples, record bytes) on a run's storage tiers at its end; None without tiers."""
    tiers = {k: v for k, v in result.get("memory", {}).get("stats", {}).get("tiers", {}).items()
             if k != "ram" and isinstance(v, dict) and "record_bytes" in v}
    if not tiers:
        return None
    return sum(int(v["samples"]) for v in tiers.values()), sum(int(v["record_bytes"]) for v in tiers.values())


def parse_modes(text: str, seeds: list[int]) -> dict[str, list[int]]:
    """``"ram,carousel,storage:0"`` -> ``{"ram": seeds, "carousel": seeds, "storage": [0]}``."""
    modes: dict[str, list[int]] = {}
    for item in (m.strip() for m in text.split(",")):
        if not item:
            continue
        name, sep, own = item.partition(":")
        if name not in VARIANTS:
            raise ValueError(f"unknown mode {name!r}; known: {', '.join(VARIANTS)}")
        modes[name] = [int(s) for s in own.split("+")] if sep else list(seeds)
    return modes


def compare(base: RunConfig, modes: list[str] | dict[str, list[int]], seeds: list[int], out: Path) -> dict[str, Any]:
    """Run every (mode, seed) not already on disk; ``modes`` is a list (all ``seeds``) or mode -> seeds."""
    plan = modes if isinstance(modes, dict) else {m: list(seeds) for m in modes}
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in plan}
    # Seed-major order: a machine's slow minutes fall on every mode alike, not on one.
    for seed in sorted({s for ss in plan.values() for s in ss}):
        for mode, mode_seeds in plan.items():
            if seed not in mode_seeds:
                continue
            cfg = variant_config(base, mode, seed, out)
            result = _reusable(cfg)
            if result is None:
                result = run(cfg)
            else:
                print(f"[{mode}] seed {seed}: reusing {cfg.out}/result.json")
            results[mode].append(result)
    lines, rows = table(results)
    title = f"{base.method} on {base.benchmark}, EM {base.em_size}"
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([f"{title}", "", *lines]) + "\n"
    (out / "table.md").write_text(text)
    summary = {"method": base.method, "benchmark": base.benchmark, "em_size": base.em_size, "seeds": plan,
               "modes": rows, "runs": {m: [r["config"]["out"] for r in rs] for m, rs in results.items()}}
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    plot.accuracy_figure({m: [r["acc_matrix"] for r in rs] for m, rs in results.items()}, out / "accuracy.png", title)
    print("\n" + text)
    print(f"wrote {out}/table.md, {out}/compare.json and {out}/accuracy.png")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m trainers compare", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, memory=False)
    p.add_argument("--modes", default="ram,carousel",
                   help=f"comma-separated, of: {', '.join(VARIANTS)}; MODE:0+1 runs that mode with seeds 0 and 1 only")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", default=None, help="folder (default: runs/compare-BENCHMARK-METHOD)")
    args = p.parse_args(argv)
    base = config_from_args(args)
    out = Path(args.out or f"runs/compare-{base.benchmark}-{base.method}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        return compare(base, parse_modes(args.modes, seeds), seeds, out)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"trainers compare: {exc}") from None
