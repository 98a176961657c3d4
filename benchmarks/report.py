"""What every benchmark script ends with: the table printed, ``results.json`` and ``results.md`` written."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def timed_args(prog: str, doc: str, seconds: float, rounds: int, argv: list[str] | None) -> argparse.Namespace:
    """The options of a benchmark that times variants in rounds: ``--quick`` (0.3 s, one round),
    ``--seconds``, ``--rounds`` and ``--out`` (default ``bench-out/<name>``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (CI-sized)")
    parser.add_argument("--seconds", type=float, default=seconds, help="timed seconds per variant per round")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default=f"bench-out/{prog.rsplit('.', 1)[-1]}")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 0.3, 1
    return args


def machine(**extra: str) -> dict:
    """What every result records of the machine it ran on (``extra``: versions of peers, say)."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), **extra}


@contextmanager
def scratch(out: Path, prefix: str = "carousel-bench-") -> Iterator[Path]:
    """A fresh work folder under ``out`` (created), removed afterwards whatever happens."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=out)).resolve()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(out: Path, results: dict, lines: list[str]) -> dict:
    """Print the markdown table ``lines`` and write it and ``results`` (as JSON) into ``out``."""
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    return results
