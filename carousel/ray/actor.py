"""One shard: a :class:`~carousel.CarouselMemory` in its own folder, hosted by a Ray actor.

:class:`ShardActor` is a plain class; :mod:`carousel.ray.sharded` turns it into a Ray actor with
``max_restarts`` (Ray restarts the process when it dies) and a placement that keeps it on the node
holding its tiers. Its constructor is therefore also its recovery: it claims its folder (refusing
another layout), opens the memory there -- which recovers every sample on its tiers -- and starts
its ``/metrics`` server. Ray re-runs it with the same arguments after a crash.

Batches leave as a dict of numpy arrays: Ray stores numpy buffers out of band in its object store,
and a reader on the same node maps them read-only, without a copy (never a pickled object per
sample). Ids leave as the sharded memory's global ids (:mod:`carousel.ray.routing`).

A bad request raises in the caller (Ray carries the exception back); the actor keeps serving.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..em_pool import torch_dtype
from ..inputs import MemoryInputError
from ..memory import CarouselMemory
from .allocation import Composition
from .layout import claim_folder, shard_config, shard_folder, write_memory_toml
from .routing import global_ids, local_ids
from .shard_metrics import ShardExposition

__all__ = ["ShardActor"]

_COMPOSITION_MAX_AGE_S = 0.05  # a reply's EM composition may be this old (recounting costs ~10 us per 500 slots)


class ShardActor:
    """Shard ``shard`` of ``n_shards``; ``memory`` is the memory configuration every shard shares
    (a TOML-shaped dict), placed under ``{root}/shard-{shard}/`` (see :mod:`carousel.ray.layout`)."""

    def __init__(self, shard: int, n_shards: int, routing: str, memory: Mapping[str, Any], root: str,
                 sharding: Mapping[str, Any], metrics_host: str | None, metrics_port: int | None) -> None:
        import ray  # the actor runs inside Ray; importing this module alone does not need it

        self.shard, self.n_shards, self.routing = shard, n_shards, routing
        self.root = os.path.abspath(root)
        self.sharding = dict(sharding)  # what connect() rebuilds the client from
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60's property calls its own deprecated actor_id inside
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ctx.was_current_actor_reconstructed)
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.folder = shard_folder(self.root, shard)
        claim_folder(self.folder, shard, n_shards, routing)
        config = shard_config(memory, self.root, shard, n_shards)
        write_memory_toml(self.folder, config)
        self.memory = CarouselMemory(config)  # recovers every sample its tiers hold
        self._write_lock = threading.Lock()  # add / observe / flush / checkpoint: one at a time, like the daemon
        self._comp: Composition | None = None
        self._comp_at = 0.0
        self._exposition = ShardExposition(self.memory.registry, memory=str(sharding.get("name", "default")),
                                           shard=shard, n_shards=n_shards, routing=routing, restarted=self.restarted,
                                           recovered_samples=int(self.memory.recovered["samples"]))
        self.metrics_address: str | None = None
        if metrics_port is not None:
            port = 0 if metrics_port == 0 else metrics_port + shard
            bound = self._exposition.serve(metrics_host or "127.0.0.1", port)
            host, _, p = bound.rpartition(":")
            # A wildcard bind is reached through the node's address.
            self.metrics_address = f"{self.node_ip}:{p}" if host in ("0.0.0.0", "::", "") else bound

    # ---- what the client asks ---------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Who and where this shard is, plus its schema and its EM composition."""
        mc = self.memory.config.memory
        return {"shard": self.shard, "n_shards": self.n_shards, "routing": self.routing, "root": self.root,
                "sharding": self.sharding, "pid": os.getpid(), "node_id": self.node_id, "node_ip": self.node_ip,
                "metrics": self.metrics_address, "restarted": self.restarted,
                "recovered": dict(self.memory.recovered), "kind": mc.kind, "max_label": mc.max_label,
                "fields": {k: (list(s), d) for k, (s, d) in self.memory.fields.items()},
                "input_fields": {k: (list(s), d) for k, (s, d) in self.memory.input_fields.items()},
                "composition": self._composition().to_arrays()}

    def ping(self) -> dict[str, Any]:
        """A cheap liveness answer with the shard's pid and EM composition."""
        return self._info()

    def pid(self) -> int:
        return os.getpid()

    def add(self, fields: Mapping[str, np.ndarray], durable: bool, timeout_s: float) -> tuple[np.ndarray, dict]:
        """Add samples (``fields``: x, y, task and the extras, stacked); returns their global ids.

        ``durable``: return only once they are on the first tier and flushed (acknowledged)."""
        fields = dict(fields)
        x, y, task = fields.pop("x"), fields.pop("y"), fields.pop("task")
        with self._write_lock:
            ids = self.memory.add(x, y, task, **fields).numpy()
            if durable:
                self.memory.flush(timeout_s)
            else:  # the reply's EM composition must include them: the caller plans draws with it
                self.memory.wait_admitted(timeout_s)
        self._comp_at = 0.0
        return global_ids(ids, self.shard, self.n_shards), self._info()

    def sample(self, sizes: list[int], classes: list[int] | None, tasks: list[int] | None, seed: int | None,
               balanced: bool) -> tuple[dict[str, np.ndarray], dict]:
        """Draws of ``sizes[j]`` EM samples each, stacked in one set of numpy arrays (``id``
        global), plus the shard's info with ``counts[j]``, the rows each draw got (fewer when the
        EM, or its filtered part, holds fewer). Several draws per call amortize Ray's per-call
        cost (~0.6 ms here): each is gathered straight into its rows of the output, one copy."""
        sizes = [int(v) for v in sizes]
        if not sizes or min(sizes) < 0:
            raise MemoryInputError(f"sizes must be a non-empty list of counts >= 0, got {sizes}")
        if seed is not None:  # a seeded draw is the memory's own (sample_into takes no seed)
            if len(sizes) != 1:
                raise MemoryInputError("a seeded request draws one batch")
            b = self.memory.sample(sizes[0], classes=classes, tasks=tasks, seed=seed, balanced=balanced)
            arrays = {"id": b.ids.numpy(), "x": b.x.numpy(), "y": b.y.numpy(), "task": b.task.numpy(),
                      **{k: v.numpy() for k, v in b.extras.items()}}
            counts = [len(b)]
        else:
            total = sum(sizes)
            out = {"id": torch.empty(total, dtype=torch.int64),
                   **{k: torch.empty((total, *shape), dtype=torch_dtype(dtype))
                      for k, (shape, dtype) in self.memory.fields.items()}}
            counts, row = [], 0
            for size in sizes:
                got = self.memory.sample_into(size, {k: t[row:] for k, t in out.items()}, classes=classes,
                                              tasks=tasks, balanced=balanced)
                counts.append(got)
                row += got
            arrays = {k: t[:row].numpy() for k, t in out.items()}
        arrays["id"] = global_ids(arrays["id"], self.shard, self.n_shards)
        return arrays, {**self._info(), "counts": counts}

    def observe(self, ids: np.ndarray, logits: np.ndarray | None, loss: np.ndarray | None) -> None:
        """Statistics of replayed samples (global ids owned by this shard)."""
        ids = self._own(ids)
        with self._write_lock:
            self.memory.observe(local_ids(ids, self.n_shards), logits=logits, loss=loss)

    def read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every field of stored samples (global ids owned by this shard), read from the tiers, not
        the EM: what a restart would bring back. Raises ``MemoryInputError`` for ids not stored."""
        ids = self._own(ids)
        local = local_ids(ids, self.n_shards)
        added = self.memory.stats()["added"]
        if local.size and local.max() >= added:
            raise MemoryInputError(f"shard {self.shard}: unknown ids {ids[local >= added][:10].tolist()}")
        with self._write_lock:
            self.memory.flush()  # with ack = "queued" some may still wait in write-behind
        # carousel.ray lives in the carousel package: it may read the tiers the way recovery does.
        out = self.memory._read_stored(local)
        out["id"] = ids
        return out

    def stats(self) -> dict[str, Any]:
        return {**self.memory.stats(), "shard": self.shard, "pid": os.getpid(), "node_id": self.node_id,
                "restarted": self.restarted, "recovered": dict(self.memory.recovered)}

    def flush(self, timeout_s: float) -> None:
        with self._write_lock:
            self.memory.flush(timeout_s)

    def checkpoint(self) -> None:
        with self._write_lock:
            self.memory.checkpoint()

    def close(self) -> None:
        """Drain, checkpoint and close the memory, stop ``/metrics`` (before the actor is killed)."""
        with self._write_lock:
            self.memory.close()
        self._exposition.close()

    # ---- helpers -------------------------------------------------------------------------------------
    def _own(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise MemoryInputError(f"ids must be a 1-D array of integers, got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or (ids % self.n_shards != self.shard).any()):
            raise MemoryInputError(f"shard {self.shard} of {self.n_shards} got ids it does not own")
        return ids

    def _composition(self) -> Composition:
        now = time.monotonic()
        if self._comp is None or now - self._comp_at > _COMPOSITION_MAX_AGE_S:
            slot_ids, labels, tasks = self.memory.pool.snapshot()
            filled = slot_ids >= 0
            self._comp, self._comp_at = Composition.of(labels[filled], tasks[filled]), now
        return self._comp

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "composition": self._composition().to_arrays()}

    def __repr__(self) -> str:  # Ray names the actor's log lines with this
        return f"ShardActor(shard={self.shard}/{self.n_shards}, root={str(Path(self.root))!r})"
