"""The three memory modes a trainer runs with, all behind carousel's ``add / sample / observe``.

- ``ram``: the classic replay buffer -- a RAM-only ``CarouselMemory`` of ``em_size`` samples
  (no tiers, nothing swapped).
- ``carousel``: the same EM plus storage tiers holding every past sample, swapped into the EM
  asynchronously on every replay step (CarM). The tiers come from ``--profile`` (a carousel
  profile; its ``[memory]`` is fitted to the benchmark, its tier folders moved under the run's
  folder -- but an adopted image folder, ``layout = "imagefolder"``, stays where it is) or,
  without one, a single LMDB tier with room for the whole stream. ``--swap-workers 0`` swaps
  synchronously on the trainer's thread (the ablation). With ``daemon=True`` the memory
  lives in a ``carousel serve`` subprocess started for the run and the trainer talks to it
  through ``carousel.connect``; with ``connect=SOCKET`` it uses a daemon already running (its
  memory must be empty and have the right shape).
- ``storage``: every replay batch is read straight from a store of all past samples (CarM's
  "ST-L" upper bound on what replay from storage can give; slow by design, every step waits on
  storage). This is the one mode that bypasses the memory and talks to ``storage_backends``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import carousel
from carousel import CarouselMemory
from carousel.batch import Batch
from carousel.config import CarouselConfig, read_toml
from storage_backends import open_store

from .options import MODES  # noqa: F401 - the modes are a run setting, named where the flags are
from .streams import Stream

Extras = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass
class MemorySpec:
    """What the trainer asks of its memory; :func:`open_memory` turns it into one."""

    mode: str                              # one of MODES
    em_size: int
    admission: str = "reservoir"
    extras: Extras = field(default_factory=dict)
    profile: str | None = None             # carousel mode: a profile TOML for swap settings and tiers
    swap_workers: int | None = None        # carousel mode: override [swap].workers (0 = synchronous)
    swap_ratio: float | None = None        # carousel mode: override [swap].ratio
    deterministic: bool = True             # carousel mode: [swap].deterministic (a seed gives the same run)
    daemon: bool = False                   # carousel mode: run the memory in a `carousel serve` subprocess
    connect: str | None = None             # carousel mode: socket of a daemon already running
    seed: int = 0
    kind: str = "plain"                    # memory kind: "plain", "coreset" (weights + retain) or "saliency"
    tier_capacity: str | None = None       # carousel mode's default tier: samples ("50000") or bytes ("2MiB")
    theta: float | None = None             # saliency: keep pixels with saliency >= theta


class OpenMemory:
    """A memory opened for one run: ``memory`` (the add/sample/observe object) and ``close()``."""

    def __init__(self, memory: Any, describe: str, cleanup=None) -> None:
        self.memory = memory
        self.describe = describe
        self._cleanup = cleanup

    def close(self) -> dict[str, Any]:
        """Close the memory (and stop its daemon); returns its last stats."""
        stats = {}
        try:
            flush = getattr(self.memory, "flush", None)
            if flush is not None:
                flush()  # what the run stored, all of it where it belongs, before counting it
            stats = dict(self.memory.stats())
            self.memory.close()
        finally:
            if self._cleanup is not None:
                self._cleanup()
        return stats


def memory_dict(spec: MemorySpec, stream: Stream, workdir: Path) -> dict[str, Any]:
    """The TOML-shaped memory config for ``ram`` / ``carousel`` mode (without a ``[daemon]`` table)."""
    memory = {"em_size": spec.em_size, "sample_shape": list(stream.input_shape), "dtype": "uint8",
              "seed": spec.seed, "admission": spec.admission, "kind": spec.kind,
              "extras": {k: {"shape": list(shape), "dtype": dt} for k, (shape, dt) in spec.extras.items()}}
    if spec.kind == "saliency":
        memory["saliency"] = {} if spec.theta is None else {"theta": spec.theta}
    if spec.mode == "ram":
        return {"memory": memory}
    stream_size = sum(len(t.train_y) for t in stream.tasks)
    if spec.profile and spec.tier_capacity is not None:
        raise ValueError("--tier-capacity sizes the default tier; with --profile, set the capacity in the profile")
    if spec.profile:
        data = read_toml(spec.profile)
        if "memories" in data:
            raise ValueError(f"{spec.profile}: holds several [memories.*]; give a single-memory profile")
        data.pop("daemon", None)
        # The benchmark decides the sample shape, extras and EM size; tiers get fresh folders per run
        # so that runs never share stored samples -- except an adopted image folder (a files tier
        # with layout = "imagefolder"): a data set read where it is, never moved, copied or written;
        # its path is kept as given (relative: to the profile's folder, as carousel reads it).
        tiers = []
        for i, tier in enumerate(data.get("tiers", [])):
            if tier.get("layout") == "imagefolder":
                path = Path(os.path.expanduser(str(tier.get("path", ""))))
                tiers.append({**tier, "path": str(path if path.is_absolute() else Path(spec.profile).parent / path)})
                continue
            tiers.append({**tier, "path": str(workdir / f"tier{i}-{tier.get('kind', 'store')}")})
        data["tiers"] = tiers
        data.pop("memory", None)
    else:
        capacity: int | str = stream_size
        if spec.tier_capacity is not None:
            text = str(spec.tier_capacity).strip()
            capacity = int(text) if text.isdigit() else text
        data = {"swap": {"ratio": 0.5, "policy": "carm"},
                "tiers": [{"kind": "lmdb", "path": str(workdir / "tier0-lmdb"), "capacity": capacity,
                           "sync": False, **({"codec": "zstd"} if spec.kind == "saliency" else {})}]}
    if not data["tiers"]:
        raise ValueError("carousel mode needs at least one storage tier; the profile has none (use --memory ram)")
    swap = dict(data.get("swap", {}))
    if spec.swap_workers is not None:
        swap["workers"] = spec.swap_workers
    if spec.swap_ratio is not None:
        swap["ratio"] = spec.swap_ratio
    swap["deterministic"] = spec.deterministic
    memory["state_dir"] = str(workdir / "state")
    out = {"memory": memory, **{k: v for k, v in data.items() if k not in ("memory",)}, "swap": swap}
    CarouselConfig.from_dict(out)  # every problem surfaces here, as a ConfigError naming the key
    return out


def open_memory(spec: MemorySpec, stream: Stream, workdir: Path) -> OpenMemory:
    """Open the memory ``spec`` describes for ``stream``; its files live under ``workdir``."""
    if spec.mode not in MODES:
        raise ValueError(f"unknown memory mode {spec.mode!r}; known: {', '.join(MODES)}")
    workdir.mkdir(parents=True, exist_ok=True)
    if spec.mode == "storage":
        if spec.kind == "saliency":
            raise ValueError("--memory-kind saliency compresses samples in carousel's tiers; use --memory carousel")
        fields = {"x": (tuple(stream.input_shape), "uint8"), "y": ((), "int64"), "task": ((), "int16"),
                  **{k: (tuple(s), d) for k, (s, d) in spec.extras.items()}}
        if spec.kind == "coreset":
            fields["weight"] = ((), "float32")
        return OpenMemory(StorageReplay(f"lmdb://{workdir / 'all-samples'}?sync=0", fields, spec.seed),
                          "storage: every replay batch read from an LMDB store of all past samples")
    if spec.mode == "carousel" and spec.connect:
        client = carousel.connect(spec.connect)
        if client.stats().get("added", 0):
            client.close()
            raise ValueError(f"the daemon at {spec.connect} already holds samples; a run needs an empty memory")
        return OpenMemory(client, f"carousel daemon at {spec.connect}")
    config = memory_dict(spec, stream, workdir)
    if spec.mode == "carousel" and spec.daemon:
        return _start_daemon(config, workdir)
    mem = CarouselMemory.from_dict(config)
    describe = f"{spec.mode}: EM {spec.em_size} in RAM, "
    if mem.config.tiers:
        sc = mem.config.swap
        describe += (f"tiers: {', '.join(f'{t.kind} ({t.path})' for t in mem.config.tiers)}, "
                     f"swap ratio {sc.ratio} ({sc.policy}), workers {sc.workers}")
    else:
        describe += "no tiers"
    return OpenMemory(mem, describe)


def _start_daemon(config: dict[str, Any], workdir: Path) -> OpenMemory:
    """The run's own daemon (``carousel.spawn``: a child process, its log ``workdir/daemon.log`` kept for
    post-mortems); closing the memory stops it cleanly and fails unless it exits 0."""
    mem = carousel.spawn(config, workdir=workdir)
    return OpenMemory(mem, f"carousel daemon (pid {mem.process.pid}, {mem.address}): EM {config['memory']['em_size']}, "
                           f"tiers: {', '.join(t['kind'] for t in config['tiers'])}")


class StorageReplay:
    """CarM's ST-L: replay batches drawn uniformly from *every* past sample, read from storage on
    every call -- what replaying straight from flash would give, at storage's speed."""

    def __init__(self, url: str, fields: Mapping[str, tuple[tuple[int, ...], str]], seed: int = 0) -> None:
        self.fields = dict(fields)
        self.store = open_store(url, self.fields)
        self._n = 0
        self._rng = np.random.default_rng([seed, 7])

    def add(self, x: Any, y: Any, task: Any, **extras: Any) -> torch.Tensor:
        x = _np(x)
        n = x.shape[0]
        t = _np(task)
        records = {"x": x, "y": _np(y).astype(np.int64),
                   "task": (np.full(n, int(t)) if t.ndim == 0 else t).astype(np.int16),
                   **{k: _np(v).astype(self.fields[k][1]) for k, v in extras.items()}}
        if "weight" in self.fields and "weight" not in records:
            records["weight"] = np.ones(n, np.float32)  # a coreset sample weighs 1 unless told
        ids = np.arange(self._n, self._n + n, dtype=np.int64)
        self.store.put_many(ids, records)
        self._n += n
        return torch.from_numpy(ids)

    def sample(self, n: int, **_: Any) -> Batch:
        ids = self._rng.choice(self._n, min(n, self._n), replace=False) if self._n else np.zeros(0, np.int64)
        rec = self.store.get_many(ids) if ids.size else {k: np.zeros((0, *s), d) for k, (s, d) in self.fields.items()}
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rec.items()}
        return Batch(torch.from_numpy(ids.astype(np.int64)), t.pop("x"), t.pop("y"), t.pop("task"), t)

    def observe(self, ids: Any, logits: Any = None, loss: Any = None) -> None:
        """Nothing to do: every past sample is already replayable."""

    def end_step(self) -> None:
        """Nothing to do: no swaps."""

    def stats(self) -> dict[str, Any]:
        return {"added": self._n, "stored": len(self.store), "bytes": self.store.nbytes}

    def close(self) -> None:
        self.store.close()


def _np(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
