"""How a sharded memory is laid out on a Ray cluster: a typed, frozen dataclass.

The memory itself (EM size, tiers, swap policy) is an ordinary carousel memory configuration,
the same for every shard; :class:`ShardingConfig` says how many shards there are, how samples are
routed to them, when an ``add`` counts as acknowledged, where the shard actors run and how the
client treats a shard that does not answer.

>>> ShardingConfig(n_shards=2, routing="class").ack
'durable'
>>> ShardingConfig(n_shards=0)
Traceback (most recent call last):
...
carousel.config.ConfigError: sharding.n_shards: must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .routing import ROUTINGS

__all__ = ["ACKS", "PLACEMENTS", "ShardingConfig"]

ACKS = ("durable", "queued")
PLACEMENTS = ("node_affinity", "spread", "strict_spread")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _fail(key: str, reason: str):
    raise ConfigError(None, f"sharding.{key}", reason)


def _int(value: Any, key: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(key, f"must be an integer >= {lo}, got {value!r}")


def _positive(value: Any, key: str, zero_ok: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (value >= 0 if zero_ok else value > 0)
    if not ok:
        _fail(key, f"must be a finite number {'>=' if zero_ok else '>'} 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ShardingConfig:
    """A sharded memory's layout and the client's fault handling (defaults documented per field)."""

    n_shards: int = 2                     # shard actors, each with its own CarouselMemory; fixed for the memory's life
    # "key": a stable hash of add(keys=...) (of the samples' bytes without keys); "class": label % n_shards
    routing: str = "key"
    # "durable": add() returns once every sample is on its shard's first tier and flushed (survives
    # SIGKILL of the shard); "queued": add() returns once the shard queued the samples for
    # write-behind, and they are acknowledged by the next flush() / checkpoint().
    ack: str = "durable"
    # "node_affinity": shard k on nodes[k % len(nodes)] (all alive nodes by address when nodes is
    # empty), hard affinity so a restart comes back to the node holding the shard's tiers;
    # "spread" / "strict_spread": a placement group with one bundle per shard (strict: one node each).
    placement: str = "node_affinity"
    nodes: tuple[str, ...] = ()           # node ids or node IP addresses, for "node_affinity"
    max_restarts: int = -1                # Ray restarts of a dead shard actor; -1 = always
    num_cpus: float = 1.0                 # CPUs reserved per shard actor (Ray scheduling)
    max_concurrency: int = 4              # threads per shard actor: samples run beside a blocked add
    metrics_host: str = "127.0.0.1"       # each shard's /metrics listens here ("0.0.0.0" for a remote Prometheus)
    metrics_port: int | None = 0          # 0: an ephemeral port; P: shard k listens on P + k; None: no /metrics
    timeout_s: float = 1.0                # sample(): how long to wait for a shard before serving without it
    add_timeout_s: float = 120.0          # add() / flush(): how long to wait for a shard (a durable add flushes)
    probe_interval_s: float = 0.2         # how often an unavailable shard is asked whether it is back
    # Unseeded draws: batches fetched per call to each shard, while the previous ones are handed
    # out (Ray's per-call cost, ~0.6 ms here, is paid once per `prefetch` batches); 0: one call per draw.
    prefetch: int = 4
    local_share: float | None = None      # fraction of a batch from the local shards first; None: by size only
    placement_timeout_s: float = 60.0     # how long creation waits for a placement group
    name: str = "default"                 # actors are named "carousel.{name}.shard-{k}" in the namespace
    namespace: str = "carousel"
    detached: bool = False                # actors outlive the driver that created them (shutdown() ends them)

    def __post_init__(self) -> None:
        _int(self.n_shards, "n_shards", 1)
        if self.routing not in ROUTINGS:
            _fail("routing", f"{self.routing!r} is not one of {', '.join(ROUTINGS)}")
        if self.ack not in ACKS:
            _fail("ack", f"{self.ack!r} is not one of {', '.join(ACKS)}")
        if self.placement not in PLACEMENTS:
            _fail("placement", f"{self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if isinstance(self.nodes, str) or not all(isinstance(v, str) and v for v in self.nodes):
            _fail("nodes", f"expected a list of node ids or IP addresses, got {self.nodes!r}")
        object.__setattr__(self, "nodes", tuple(self.nodes))
        _int(self.max_restarts, "max_restarts", -1)
        _positive(self.num_cpus, "num_cpus", zero_ok=True)
        _int(self.max_concurrency, "max_concurrency", 2)
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            _fail("metrics_host", f"expected a host to listen on, got {self.metrics_host!r}")
        if self.metrics_port is not None:
            _int(self.metrics_port, "metrics_port", 0)
            if self.metrics_port + self.n_shards - 1 > 65535:
                _fail("metrics_port", f"ports {self.metrics_port}..{self.metrics_port + self.n_shards - 1} "
                                      "do not all exist")
        for key in ("timeout_s", "add_timeout_s", "probe_interval_s", "placement_timeout_s"):
            _positive(getattr(self, key), key)
        _int(self.prefetch, "prefetch", 0)
        if self.local_share is not None:
            _positive(self.local_share, "local_share", zero_ok=True)
            if self.local_share > 1:
                _fail("local_share", f"must be in [0, 1], got {self.local_share}")
        for key in ("name", "namespace"):
            if not isinstance(getattr(self, key), str) or not _NAME.match(getattr(self, key)):
                _fail(key, "a letter or digit, then up to 63 letters, digits, '_', '.' or '-'")

    def actor_name(self, shard: int) -> str:
        """The Ray actor name of shard ``shard`` (found again by :meth:`ShardedMemory.connect`)."""
        return f"carousel.{self.name}.shard-{shard}"
