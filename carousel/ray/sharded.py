"""``ShardedMemory``: one replay memory made of carousel shards, each a Ray actor on its node.

An example (it needs a running Ray cluster, so it is not a doctest)::

    import ray
    from carousel.ray import ShardedMemory, ShardingConfig
    ray.init()  # or ray.init(address="auto") to join a cluster
    mem = ShardedMemory.create({"memory": {"em_size": 500, "sample_shape": [3, 32, 32]},
                                "tiers": [{"kind": "lmdb", "capacity": 50000}]},
                               "/local/flash/carousel", ShardingConfig(n_shards=2))
    ids = mem.add(x_uint8, y, task=0, keys=dataset_index)  # durable on return
    batch = mem.sample(256)                   # batch.unavailable: shards left out
    mem.observe(batch.ids, logits=model(batch.x.float()))
    mem.shutdown()                            # checkpoint and end the shard actors

The same ``add / sample / observe / stats`` as :class:`~carousel.CarouselMemory`, so the trainers'
methods run on it unchanged. What each call does across shards:

- ``add`` routes every sample to one shard (:mod:`carousel.ray.routing`: by a stable hash of
  ``keys``, or of the sample's bytes without keys, or by class) and returns global ids that
  encode the shard. With ``ack = "durable"`` (the default) it returns only once every shard has
  its samples on its first tier, flushed: a SIGKILL of the shard after that loses none of them.
  A shard that is down (restarting) or fails makes ``add`` raise :class:`ShardUnavailableError`,
  which says which rows were acknowledged (their ids) and which were not; the latter may or may
  not have been applied when the shard died mid-call, so retrying them may store them twice.
- ``sample(n)`` splits ``n`` over the available shards (:mod:`carousel.ray.allocation`: uniform
  over the union of their EMs, optionally a ``local_share`` from local shards first) and draws on
  all of them at once. A shard that fails or does not answer within ``timeout_s`` is left out of
  this batch and of later ones until it answers a probe again; :attr:`ShardedBatch.unavailable`
  names the shards left out. It never raises because a shard is down.
- ``observe(ids, ...)`` sends each id's statistics to the shard that owns it (``id % n_shards``);
  statistics for a shard that is down are dropped (counted in ``stats()["observe_dropped"]``);
  a shard slower than ``timeout_s`` still applies them, the call just stops waiting.

A client is for one thread. Another process gets its own by :meth:`ShardedMemory.connect` or by
receiving this one (a Ray task argument, say: it reconnects by name where it lands).

Batches travel as numpy buffers through Ray's object store. A batch drawn from one shard is a
read-only, zero-copy view of the object (same node); one drawn from several is concatenated once
into fresh tensors. Pass ``copy=True`` when you will write into the batch in place.
Unseeded draws are pipelined: for each standing request (same ``n`` and filters) every shard
involved draws ``prefetch`` batches in one call, and the next such call is in flight while those
are handed out -- Ray's per-call cost is paid once per ``prefetch`` batches, and a batch may predate
your latest ``add`` by up to ``2 * prefetch`` steps, as with the daemon's shared-memory rings.
Seeded draws are made on request, one call each.

Why one module of ~730 lines: one class, :class:`ShardedMemory`, the same API as
:class:`~carousel.CarouselMemory` across shards; each method is its fan-out and its degradation
around down shards, over one client state (handles, health, standing draws). The pure parts are
modules of their own (routing, allocation, health, layout, placement, metrics).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields as dc_fields
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..batch import Batch
from ..config import WEIGHT_FIELD, ConfigError
from ..inputs import MemoryInputError, as_array, check_extra, check_sample_fields
from .actor import ShardActor
from .allocation import allocate
from .config import ShardingConfig
from .health import ShardHealth
from .layout import memory_dict, shard_config
from .placement import strategies
from .routing import route, shard_of
from .shard_metrics import file_sd_groups, write_file_sd

__all__ = ["ShardStartError", "ShardUnavailableError", "ShardedBatch", "ShardedMemory"]

log = logging.getLogger("carousel.ray")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor names in its error texts
_MAX_STANDING = 8  # standing requests (n, filters) with draws in flight; the oldest is dropped beyond this
_CLIENT_KEYS = ("timeout_s", "add_timeout_s", "probe_interval_s", "prefetch", "local_share")  # per client


class ShardStartError(RuntimeError):
    """A shard actor's constructor raised (its folder holds another layout, its config is bad, its
    tiers cannot be opened); the message carries the original exception's type and text."""


class ShardUnavailableError(ConnectionError):
    """Some rows of an ``add`` went to shards that are down; the other rows were acknowledged.

    ``ids``: int64, one per input row: the global id of an acknowledged row, -1 for a row not
    acknowledged. ``shards``: the shards that were down or failed mid-call.
    """

    def __init__(self, message: str, ids: torch.Tensor, shards: tuple[int, ...]) -> None:
        super().__init__(message)
        self.ids, self.shards = ids, shards

    def __reduce__(self):
        return type(self), (str(self), self.ids, self.shards)


@dataclass  # not frozen: Batch is not (see carousel.batch)
class ShardedBatch(Batch):
    """A :class:`~carousel.Batch` plus where it came from.

    ``per_shard[k]``: rows drawn from shard ``k``; ``unavailable``: shards left out of this draw
    because they were down or too slow (empty when every shard served its share).
    """

    per_shard: tuple[int, ...] = ()
    unavailable: tuple[int, ...] = field(default=())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ShardedBatch:
        b = super().to(device, non_blocking)
        return ShardedBatch(b.ids, b.x, b.y, b.task, b.extras, self.per_shard, self.unavailable)

    def pin_memory(self) -> ShardedBatch:
        b = super().pin_memory()
        return ShardedBatch(b.ids, b.x, b.y, b.task, b.extras, self.per_shard, self.unavailable)


@dataclass
class _Draw:
    """Draws in flight: ``plans[j, k]`` samples of batch ``j`` from shard ``k``, a ref per shard asked."""

    n: int
    plans: np.ndarray
    refs: dict[int, Any]
    unavailable: tuple[int, ...]
    request: tuple  # (classes, tasks, seed, balanced)


@dataclass
class _Standing:
    """A standing request (same ``n`` and filters): batches ready to hand out, the next draw in flight."""

    ready: deque = field(default_factory=deque)
    pending: _Draw | None = None


class ShardedMemory:
    """A replay memory sharded over Ray actors (see the module docstring). Build it with
    :meth:`create` (starts the shard actors) or :meth:`connect` (attaches to running ones)."""

    def __init__(self, handles: Sequence[Any], identities: Sequence[Mapping[str, Any]], sharding: ShardingConfig,
                 *, local_shards: Sequence[int] | None = None, owner: bool = False,
                 placement_group: Any = None) -> None:
        self.sharding = sharding
        self.n_shards = sharding.n_shards
        first = identities[0]
        self.root: str = first["root"]
        self.kind: str = first["kind"]
        self.fields = {k: (tuple(s), d) for k, (s, d) in first["fields"].items()}
        self.input_fields = {k: (tuple(s), d) for k, (s, d) in first["input_fields"].items()}
        self.max_label: int | None = first.get("max_label")
        self._health = ShardHealth(handles, identities, sharding.probe_interval_s)
        here = ray.get_runtime_context().get_node_id()
        local = ([s.index for s in self._health.shards if s.node_id == here] if local_shards is None
                 else list(local_shards))
        bad = [k for k in local if not (isinstance(k, (int, np.integer)) and 0 <= k < self.n_shards)]
        if bad:
            raise MemoryInputError(f"local_shards must be shard indices in 0..{self.n_shards - 1}, got {bad}")
        self.local_shards = tuple(sorted(set(int(k) for k in local)))
        self._local = np.isin(np.arange(self.n_shards), self.local_shards)
        self._owner, self._pg = owner, placement_group
        self._rng = np.random.default_rng()
        self._inflight: OrderedDict[tuple, _Standing] = OrderedDict()
        self._observe_dropped = 0
        self._degraded_batches = 0
        self._closed = False

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, memory: Mapping[str, Any] | str | os.PathLike[str], root: str | os.PathLike[str],
               sharding: ShardingConfig | None = None, *, local_shards: Sequence[int] | None = None) -> ShardedMemory:
        """Start (or attach to, when they run under the same names) the shard actors.

        ``memory``: one memory configuration for every shard (a TOML-shaped dict or a TOML file);
        ``root``: a folder on each node's local disk, the same path on every node; shard ``k``
        keeps its tiers in ``{root}/shard-{k}/`` (reopened from there after a restart).
        Raises :class:`~carousel.ConfigError` for a bad configuration (before any actor starts),
        :class:`ShardStartError` when a shard cannot open (its folder holds another layout: a
        :class:`~carousel.ray.layout.ShardLayoutError` in the message), and
        :class:`~carousel.ray.placement.ShardPlacementError` when the cluster cannot place them.
        """
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialized: call ray.init() (or ray.init(address=...)) first")
        sharding = ShardingConfig() if sharding is None else sharding
        if not isinstance(sharding, ShardingConfig):
            raise ConfigError(None, "sharding", f"expected a ShardingConfig, got {type(sharding).__name__}")
        data = memory_dict(memory)
        extras = (data.get("memory") or {}).get("extras") or {}
        if "keys" in extras:
            raise ConfigError(None, "memory.extras.keys", "'keys' is add()'s routing key in a sharded memory; "
                                                          "name the field otherwise")
        root = os.path.abspath(os.fspath(root))
        for k in range(sharding.n_shards):  # every shard's config is checked before any actor starts
            shard_config(data, root, k, sharding.n_shards)
        running = _running(sharding)
        if running is not None:  # created before (by another driver, say): attach, if it is this memory
            identities = _identities(running, sharding.add_timeout_s)
            for ident in identities:
                if (ident["root"], ident["n_shards"], ident["routing"]) != (root, sharding.n_shards, sharding.routing):
                    raise ConfigError(None, "sharding.name",
                                      f"actors named {sharding.actor_name(ident['shard'])!r} already serve shard "
                                      f"{ident['shard']} of {ident['n_shards']} ({ident['routing']}) at "
                                      f"{ident['root']}; use another name, or connect() to them")
            return cls(running, identities, sharding, local_shards=local_shards, owner=True)
        scheds, pg = strategies(sharding)
        remote = ray.remote(ShardActor)
        handles = []
        try:
            for k in range(sharding.n_shards):
                handles.append(remote.options(
                    name=sharding.actor_name(k), namespace=sharding.namespace, get_if_exists=True,
                    lifetime="detached" if sharding.detached else None,
                    # Restarts bring the shard back from its tiers. Calls are not retried by Ray:
                    # an add cut off mid-call may have been applied, so the client decides.
                    max_restarts=sharding.max_restarts, max_task_retries=0,
                    max_concurrency=sharding.max_concurrency, num_cpus=sharding.num_cpus,
                    scheduling_strategy=scheds[k],
                ).remote(k, sharding.n_shards, sharding.routing, data, root, _sharding_dict(sharding),
                         sharding.metrics_host, sharding.metrics_port))
            identities = _identities(handles, sharding.placement_timeout_s)
        except BaseException:
            for h in handles:
                ray.kill(h, no_restart=True)
            if pg is not None:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(pg)
            raise
        return cls(handles, identities, sharding, local_shards=local_shards, owner=True, placement_group=pg)

    @classmethod
    def connect(cls, name: str = "default", namespace: str = "carousel", *, local_shards: Sequence[int] | None = None,
                **client: Any) -> ShardedMemory:
        """Attach to the shard actors of a sharded memory started elsewhere (by name), e.g. from a
        training worker. ``client``: per-client settings among ``timeout_s``, ``add_timeout_s``,
        ``probe_interval_s``, ``prefetch``, ``local_share``."""
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialized: call ray.init() (or ray.init(address=...)) first")
        unknown = sorted(set(client) - set(_CLIENT_KEYS))
        if unknown:
            raise ConfigError(None, "sharding", f"connect() takes only client settings {_CLIENT_KEYS}, got {unknown}")
        probe = ShardingConfig(name=name, namespace=namespace)
        try:
            first = ray.get_actor(probe.actor_name(0), namespace=namespace)
        except ValueError:
            raise ValueError(f"no sharded memory {name!r} runs in Ray namespace {namespace!r} "
                             f"(no actor {probe.actor_name(0)!r}): ShardedMemory.create() starts one") from None
        ident0 = _identities([first], probe.add_timeout_s)[0]
        sharding = ShardingConfig(**{**ident0["sharding"], **client})
        handles = [first] + [ray.get_actor(sharding.actor_name(k), namespace=namespace)
                             for k in range(1, sharding.n_shards)]
        identities = [ident0] + _identities(handles[1:], sharding.add_timeout_s)
        return cls(handles, identities, sharding, local_shards=local_shards)

    def __reduce__(self):
        # A client sent to another Ray task or actor attaches there by name (its handles would
        # travel too, but its in-flight draws and probes are this process's).
        return (_reconnect, (self.sharding.name, self.sharding.namespace, self.local_shards,
                             {k: getattr(self.sharding, k) for k in _CLIENT_KEYS}))

    # ---- add ------------------------------------------------------------------------------------------
    def add(self, x: Any, y: Any, task: Any, *, keys: Any = None, **extras: Any) -> torch.Tensor:
        """Add stream samples; returns their global ids (int64 tensor, one per row, in row order).

        ``x``: ``(n, *sample_shape)`` of the memory's dtype; ``y``: ``(n,)`` integer labels;
        ``task``: an int or ``(n,)``; ``keys``: ``(n,)`` int64 routing keys (``routing = "key"``;
        without them the samples' bytes are hashed); ``extras``: the memory's extra fields.
        Bad input raises :class:`~carousel.MemoryInputError` before anything is sent.
        """
        self._check_open()
        fields, key_arr = self._check_add(x, y, task, keys, extras)
        n = fields["y"].shape[0]
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        shards = route(self.sharding.routing, self.n_shards, keys=key_arr, labels=fields["y"], x=fields["x"])
        avail = self._health.available()
        durable = self.sharding.ack == "durable"
        rows: dict[int, np.ndarray] = {}
        refs: dict[int, Any] = {}
        down: list[int] = []
        for k in np.unique(shards).tolist():
            rows[k] = np.flatnonzero(shards == k)
            if not avail[k]:
                down.append(k)
                continue
            part = fields if rows[k].size == n else {name: a[rows[k]] for name, a in fields.items()}
            refs[k] = self._health.handle(k).add.remote(part, durable, self.sharding.add_timeout_s)
        ids = np.full(n, -1, dtype=np.int64)
        errors: list[tuple[int, BaseException]] = []
        deadline = time.monotonic() + self.sharding.add_timeout_s
        for k, ref in refs.items():
            try:
                gids, info = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
            except (RayActorError, GetTimeoutError) as exc:
                self._health.mark_down(k, None if isinstance(exc, RayActorError) else ref)
                down.append(k)
                continue
            except RayTaskError as exc:
                errors.append((k, _cause(exc, k)))
                continue
            ids[rows[k]] = gids
            self._health.seen(k, info)
        if errors:
            k, exc = errors[0]
            done = sorted(set(refs) - set(down) - {e[0] for e in errors})
            if done:
                exc.add_note(f"rows routed to shards {done} were acknowledged: their ids are {ids[ids >= 0][:10]}...")
            raise exc
        if down:
            down = sorted(down)
            raise ShardUnavailableError(
                f"shards {down} did not acknowledge {int((ids < 0).sum())} of {n} rows (down, restarting or past "
                f"add_timeout_s); rows with ids >= 0 in .ids were acknowledged. A shard that failed mid-call may have "
                f"stored some of its rows anyway: retrying them may store them twice",
                torch.from_numpy(ids), tuple(down))
        return torch.from_numpy(ids)

    def _check_add(self, x: Any, y: Any, task: Any, keys: Any, extras: Mapping[str, Any]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The shards' own checks, made here first, so that no shard takes a batch another rejects."""
        shape, dtype = self.input_fields["x"]
        core = check_sample_fields(x, y, task, shape, dtype, self.max_label)
        n = core["x"].shape[0]
        key_arr = None
        if keys is not None:
            if self.sharding.routing != "key":
                raise MemoryInputError(f'keys route samples with routing = "key"; this memory routes by '
                                       f'{self.sharding.routing!r}')
            key_arr = as_array(keys)
            if key_arr.shape != (n,) or key_arr.dtype.kind not in "iu":
                raise MemoryInputError(f"keys must be {n} integers (one routing key per sample), "
                                       f"got {key_arr.dtype} {tuple(key_arr.shape)}")
            key_arr = key_arr.astype(np.int64)
        names = [k for k in self.input_fields if k not in ("x", "y", "task")]
        optional = {WEIGHT_FIELD} if self.kind == "coreset" else set()
        unknown = sorted(set(extras) - set(names))
        missing = sorted(set(names) - set(extras) - optional)
        if unknown or missing:
            raise MemoryInputError(f"extras must be exactly {names}: unknown {unknown}, missing {missing}")
        out = {**core, **{name: check_extra(name, value, n, *self.input_fields[name]) for name, value in extras.items()}}
        return out, key_arr

    # ---- sample ---------------------------------------------------------------------------------------
    def sample(self, n: int, *, classes: Any = None, tasks: Any = None, seed: int | None = None,
               balanced: bool = False, copy: bool = False) -> ShardedBatch:
        """A replay batch of up to ``n`` distinct samples from the available shards.

        ``classes`` / ``tasks`` restrict the draw, ``balanced`` draws classes equally often,
        ``seed`` makes it reproducible (given the same shard contents); ``copy=True`` returns
        writable tensors (otherwise a one-shard batch is a read-only view of Ray's object store).
        Fewer than ``n`` come back when the EMs (or their filtered parts) hold fewer, or when a
        shard failed during this draw (see :attr:`ShardedBatch.unavailable`).
        """
        self._check_open()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise MemoryInputError(f"n must be an integer >= 0, got {n!r}")
        n = int(n)
        cls_list = _int_list(classes, "classes")
        task_list = _int_list(tasks, "tasks")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise MemoryInputError(f"seed must be an integer >= 0, got {seed!r}")
        if n == 0:
            return self._batch([], (), copy)
        balanced = bool(balanced)
        if seed is not None or self.sharding.prefetch == 0:
            return self._collect(self._submit(n, 1, cls_list, task_list, seed, balanced), copy)[0]
        key = (n, None if cls_list is None else tuple(cls_list), None if task_list is None else tuple(task_list),
               balanced)
        standing = self._inflight.pop(key, None) or _Standing()
        self._inflight[key] = standing  # most recent last
        while len(self._inflight) > _MAX_STANDING:
            self._inflight.popitem(last=False)
        if not standing.ready:
            if standing.pending is None:
                standing.pending = self._submit(n, self.sharding.prefetch, cls_list, task_list, None, balanced)
            draw, standing.pending = standing.pending, None
            standing.ready.extend(self._collect(draw, False))
        batch = standing.ready.popleft()
        if standing.pending is None:  # the next draws travel while these are handed out
            standing.pending = self._submit(n, self.sharding.prefetch, cls_list, task_list, None, balanced)
        return _copied(batch) if copy else batch

    def _submit(self, n: int, batches: int, classes: list[int] | None, tasks: list[int] | None, seed: int | None,
                balanced: bool, shortfall: np.ndarray | None = None) -> _Draw:
        """Plan ``batches`` draws of ``n`` over the available shards (or, for a top-up, draws of
        ``shortfall[j]``) and ask every shard involved for its part of all of them in one call."""
        avail = self._health.available()
        rng = self._rng if seed is None else np.random.default_rng([seed, 0x5A4D])
        wants = [n] * batches if shortfall is None else [int(v) for v in shortfall]
        comps = self._health.compositions()
        plans = np.stack([allocate(w, comps, available=avail, classes=classes, tasks=tasks, balanced=balanced,
                                   local=self._local, local_share=self.sharding.local_share, rng=rng) for w in wants])
        refs = {}
        for k in np.flatnonzero(plans.sum(axis=0)).tolist():
            seed_k = None if seed is None else int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0]
                                                   >> np.uint64(1))
            refs[k] = self._health.handle(k).sample.remote(plans[:, k].tolist(), classes, tasks, seed_k, balanced)
        return _Draw(n, plans, refs, tuple(np.flatnonzero(~avail).tolist()), (classes, tasks, seed, balanced))

    def _collect(self, draw: _Draw, copy: bool) -> list[ShardedBatch]:
        """The batches of a draw, from the parts that arrived within ``timeout_s``."""
        parts, failed = self._gather(draw)
        unavailable = set(draw.unavailable) | failed
        if failed:
            # A shard failed during this draw: the others make up its part (one more round trip,
            # only when a failure is first seen). A seeded draw gets a seed of its own for it.
            got = np.zeros(draw.plans.shape[0], np.int64)
            for _, _, counts in parts:
                got += counts
            short = np.maximum(draw.n - got, 0)
            classes, tasks, seed, balanced = draw.request
            if short.any():
                extra = self._submit(draw.n, 0, classes, tasks, None if seed is None else seed + 1, balanced,
                                     shortfall=short)
                more, failed_again = self._gather(extra)
                parts += more
                unavailable |= failed_again | set(extra.unavailable)
        self._degraded_batches += draw.plans.shape[0] if unavailable else 0
        starts = [(k, arrays, counts, np.concatenate([[0], np.cumsum(counts)])) for k, arrays, counts in parts]
        out = []
        for j in range(draw.plans.shape[0]):
            pieces = [(k, {name: a[off[j]:off[j + 1]] for name, a in arrays.items()})
                      for k, arrays, counts, off in starts if counts[j]]
            out.append(self._batch(pieces, tuple(sorted(unavailable)), copy))
        return out

    def _gather(self, draw: _Draw) -> tuple[list[tuple[int, dict[str, np.ndarray], np.ndarray]], set[int]]:
        """The shards' replies that arrived within ``timeout_s`` (shard, arrays, rows per batch),
        and the shards that failed or were too slow (marked down until they answer again)."""
        parts: list[tuple[int, dict[str, np.ndarray], np.ndarray]] = []
        failed: set[int] = set()
        if not draw.refs:
            return parts, failed
        refs = list(draw.refs.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.sharding.timeout_s)
        ready_set = set(ready)
        for k, ref in draw.refs.items():
            if ref not in ready_set:
                self._health.mark_down(k, ref)  # its late answer will say it is back
                failed.add(k)
                continue
            try:
                arrays, info = ray.get(ref)
            except RayActorError:
                self._health.mark_down(k, None)
                failed.add(k)
                continue
            except RayTaskError as exc:
                raise _cause(exc, k) from None
            self._health.seen(k, info)
            parts.append((k, arrays, np.asarray(info["counts"], np.int64)))
        return parts, failed

    def _batch(self, parts: list[tuple[int, dict[str, np.ndarray]]], unavailable: tuple[int, ...],
               copy: bool) -> ShardedBatch:
        per_shard = [0] * self.n_shards
        for k, arrays in parts:
            per_shard[k] += int(arrays["id"].shape[0])
        names = ["id", *self.fields]
        if not parts:
            out = {"id": np.zeros(0, np.int64),
                   **{k: np.zeros((0, *s), dtype=np.dtype(d)) for k, (s, d) in self.fields.items()}}
        elif len(parts) == 1:
            out = {k: np.array(v) if copy else v for k, v in parts[0][1].items()}
        else:  # one concatenation per field into fresh (writable) arrays
            out = {k: np.concatenate([p[k] for _, p in parts]) for k in names}
        with warnings.catch_warnings():
            # Read-only object-store buffers, shared on purpose (say copy=True to write into them).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = {k: torch.from_numpy(out[k]) for k in names}
        extras = {k: t[k] for k in names if k not in ("id", "x", "y", "task")}
        return ShardedBatch(t["id"], t["x"], t["y"], t["task"], extras, tuple(per_shard), unavailable)

    # ---- observe, read --------------------------------------------------------------------------------
    def observe(self, ids: Any, logits: Any = None, loss: Any = None) -> None:
        """Statistics of replayed samples, sent to the shards that own them (see
        :meth:`CarouselMemory.observe`). Statistics for shards that are down are dropped."""
        self._check_open()
        ids = self._check_ids(ids)
        lg = None if logits is None else as_array(logits)
        ls = None if loss is None else as_array(loss).reshape(-1)
        if lg is not None and (lg.ndim != 2 or lg.shape[0] != ids.size):
            raise MemoryInputError(f"logits must be ({ids.size}, C), got {tuple(lg.shape)}")
        if ls is not None and ls.size != ids.size:
            raise MemoryInputError(f"loss must have {ids.size} values, got {ls.size}")
        avail = self._health.available()
        owner = shard_of(ids, self.n_shards)
        refs = {}
        for k in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == k)
            if not avail[k]:
                self._observe_dropped += rows.size
                continue
            refs[k] = (rows.size, self._health.handle(k).observe.remote(
                ids[rows], None if lg is None else lg[rows], None if ls is None else ls[rows]))
        deadline = time.monotonic() + self.sharding.timeout_s
        for k, (count, ref) in refs.items():
            try:
                ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
            except RayActorError:
                self._health.mark_down(k, None)
                self._observe_dropped += count
            except GetTimeoutError:
                self._health.mark_down(k, ref)  # slow, not lost: the shard applies it when it gets to it
            except RayTaskError as exc:
                raise _cause(exc, k) from None

    def read(self, ids: Any) -> dict[str, torch.Tensor]:
        """Every field of stored samples (``"id"`` plus the EM's fields), read from the shards'
        tiers -- what a restart brings back -- in the order of ``ids``. Waits up to
        ``add_timeout_s`` for shards that are restarting."""
        self._check_open()
        ids = self._check_ids(ids)
        owner = shard_of(ids, self.n_shards)
        out = {"id": ids.copy(),
               **{k: np.zeros((ids.size, *s), dtype=np.dtype(d)) for k, (s, d) in self.fields.items()}}
        parts = {k: np.flatnonzero(owner == k) for k in np.unique(owner).tolist()}
        got = self._call_all({k: ("read", (ids[rows],)) for k, rows in parts.items()}, wait=True)
        for k, rows in parts.items():
            for name, value in got[k].items():
                if name != "id":
                    out[name][rows] = value
        return {k: torch.from_numpy(v) for k, v in out.items()}

    # ---- the rest of the memory API --------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-shard ``stats()`` (None for a shard that did not answer within ``timeout_s``) and sums."""
        self._check_open()
        got = self._call_all({k: ("stats", ()) for k in range(self.n_shards)}, wait=False)
        shards = [got.get(k) for k in range(self.n_shards)]
        live = [s for s in shards if s is not None]
        return {"shards": shards, "unavailable": [k for k, s in enumerate(shards) if s is None],
                "added": sum(s["added"] for s in live), "evicted": sum(s["evicted"] for s in live),
                "em_samples": sum(s["tiers"]["ram"]["samples"] for s in live),
                "stored": sum(v["samples"] for s in live for name, v in s["tiers"].items() if name != "ram"),
                "observe_dropped": self._observe_dropped, "degraded_batches": self._degraded_batches,
                "restarts_seen": [s.restarts_seen for s in self._health.shards]}

    def flush(self, timeout_s: float | None = None) -> None:
        """Acknowledge every sample added so far on every shard (needed with ``ack = "queued"``)."""
        self._check_open()
        t = self.sharding.add_timeout_s if timeout_s is None else timeout_s
        self._call_all({k: ("flush", (t,)) for k in range(self.n_shards)}, wait=True)

    def checkpoint(self) -> None:
        """``flush`` plus every shard's EM contents and statistics (faster, fuller reopen)."""
        self._check_open()
        self._call_all({k: ("checkpoint", ()) for k in range(self.n_shards)}, wait=True)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every shard answers (after a restart, say); ``TimeoutError`` otherwise."""
        self._check_open()
        t = self.sharding.add_timeout_s if timeout_s is None else timeout_s
        got = self._call_all({k: ("ping", ()) for k in range(self.n_shards)}, wait=True, timeout_s=t)
        for k, info in got.items():
            self._health.seen(k, info)

    def identities(self) -> list[dict[str, Any]]:
        """Each shard's identity: pid, node, ``/metrics`` address, whether it was restarted, ..."""
        self._check_open()
        got = self._call_all({k: ("identity", ()) for k in range(self.n_shards)}, wait=True)
        return [got[k] for k in range(self.n_shards)]

    def metrics_endpoints(self) -> dict[int, str | None]:
        """``host:port`` of each shard's ``/metrics`` (None: metrics off or the shard is down).
        Ephemeral ports change when a shard restarts: ask again, or rewrite the file_sd file."""
        self._check_open()
        got = self._call_all({k: ("identity", ()) for k in range(self.n_shards)}, wait=False)
        return {k: (got[k]["metrics"] if k in got else None) for k in range(self.n_shards)}

    def write_file_sd(self, path: str | os.PathLike[str], labels: Mapping[str, str] | None = None) -> str:
        """Write the shards' ``/metrics`` endpoints as a Prometheus file_sd JSON file (atomically);
        point a ``file_sd_configs`` scrape job at it (see docs/scale-out.md)."""
        groups = file_sd_groups(self.metrics_endpoints(), self.sharding.name, labels)
        return str(write_file_sd(path, groups))

    def close(self) -> None:
        """Forget this client's in-flight draws; the shards keep running (see :meth:`shutdown`)."""
        self._inflight.clear()
        self._closed = True

    def shutdown(self) -> None:
        """Checkpoint and close every shard's memory, then end the actors (no restart). Idempotent."""
        if self._closed and not self._health.shards:
            return
        self._inflight.clear()
        for s in self._health.shards:
            try:
                ray.get(s.handle.close.remote(), timeout=self.sharding.add_timeout_s)
            except (RayActorError, GetTimeoutError, RayTaskError) as exc:
                log.warning("shard %d did not close cleanly: %s", s.index, exc)
            ray.kill(s.handle, no_restart=True)
        pg = self._pg
        if pg is None and self._owner and self.sharding.placement != "node_affinity":
            try:  # attached to shards another driver created: their group is found by name
                pg = ray.util.get_placement_group(f"carousel.{self.sharding.name}")
            except ValueError:
                pg = None
        if pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(pg)
            self._pg = None
        self._health.shards = []
        self._closed = True

    def __enter__(self) -> ShardedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owner:
            self.shutdown()
        else:
            self.close()

    # ---- calls to several shards ---------------------------------------------------------------------
    def _call_all(self, calls: Mapping[int, tuple[str, tuple]], *, wait: bool, timeout_s: float | None = None
                  ) -> dict[int, Any]:
        """Call a method on several shards at once. ``wait``: retry shards that are restarting until
        ``timeout_s`` (default ``add_timeout_s``), then raise; otherwise leave out shards that do
        not answer within ``timeout_s`` (default ``sharding.timeout_s``)."""
        limit = (self.sharding.add_timeout_s if wait else self.sharding.timeout_s) if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        todo = dict(calls)
        out: dict[int, Any] = {}
        while True:
            refs = {k: getattr(self._health.handle(k), m).remote(*args) for k, (m, args) in todo.items()}
            for k, ref in refs.items():
                try:
                    out[k] = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
                    del todo[k]
                    self._health.mark_up(k)
                except (RayActorError, GetTimeoutError) as exc:
                    self._health.mark_down(k, ref if isinstance(exc, GetTimeoutError) else None)
                    if not wait or time.monotonic() >= deadline:
                        if wait:
                            raise TimeoutError(f"shard {k} did not answer {todo[k][0]}() within {limit} s: "
                                               f"{type(exc).__name__}") from None
                        continue
                except RayTaskError as exc:
                    raise _cause(exc, k) from None
            if not todo or not wait:
                return out
            time.sleep(min(self.sharding.probe_interval_s, max(deadline - time.monotonic(), 0.0)))

    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = as_array(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise MemoryInputError(f"ids must be a 1-D array of integers, got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.astype(np.int64)
        if ids.size and ids.min() < 0:
            raise MemoryInputError("ids must be >= 0 (ids of this sharded memory)")
        return ids

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the sharded memory client is closed")

    def __repr__(self) -> str:
        return (f"ShardedMemory(name={self.sharding.name!r}, n_shards={self.n_shards}, "
                f"routing={self.sharding.routing!r}, root={self.root!r})")


def _copied(b: ShardedBatch) -> ShardedBatch:
    """``b`` with private, writable tensors."""
    return ShardedBatch(b.ids.clone(), b.x.clone(), b.y.clone(), b.task.clone(),
                        {k: v.clone() for k, v in b.extras.items()}, b.per_shard, b.unavailable)


def _reconnect(name: str, namespace: str, local_shards: tuple[int, ...], client: dict[str, Any]) -> ShardedMemory:
    return ShardedMemory.connect(name, namespace, local_shards=local_shards, **client)


def _running(sharding: ShardingConfig) -> list[Any] | None:
    """Handles of the shard actors already running under ``sharding``'s names (None if shard 0 is not)."""
    try:
        first = ray.get_actor(sharding.actor_name(0), namespace=sharding.namespace)
    except ValueError:
        return None
    handles = [first]
    for k in range(1, sharding.n_shards):
        try:
            handles.append(ray.get_actor(sharding.actor_name(k), namespace=sharding.namespace))
        except ValueError:
            raise ConfigError(None, "sharding.n_shards", f"actors named {sharding.actor_name(0)!r} run, but not "
                                                         f"{sharding.actor_name(k)!r}: another shard count") from None
    return handles


def _identities(handles: Sequence[Any], timeout_s: float) -> list[dict[str, Any]]:
    """Each actor's identity. Ray reduces an exception raised by an actor's constructor to its
    text (an ``ActorDiedError``), so a shard that could not open raises :class:`ShardStartError`
    with that text (the original type and message: a ``ShardLayoutError``, a ``ConfigError``...)."""
    try:
        return ray.get([h.identity.remote() for h in handles], timeout=timeout_s)
    except GetTimeoutError:
        raise ShardStartError(f"the shard actors did not answer within {timeout_s} s (not placed: too few "
                              "CPUs or the node is gone?)") from None
    except RayActorError as exc:
        if not exc.actor_init_failed:
            raise
        raise ShardStartError(f"a shard actor failed to start: {_ANSI.sub('', str(exc))}") from None


def _sharding_dict(sharding: ShardingConfig) -> dict[str, Any]:
    return {f.name: getattr(sharding, f.name) for f in dc_fields(sharding)}


def _cause(exc: RayTaskError, shard: int) -> BaseException:
    """The shard's own exception (a MemoryInputError, say), noted with the shard that raised it."""
    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
    cause.add_note(f"(raised by shard {shard})")
    return cause


def _int_list(values: Any, what: str) -> list[int] | None:
    if values is None:
        return None
    arr = as_array(values).ravel()
    if arr.size and arr.dtype.kind not in "iu":
        raise MemoryInputError(f"{what} must be integers, got {arr.dtype}")
    return [int(v) for v in arr]
