"""Which shards a client may ask: the client's view of each shard actor, up or down.

A shard is marked down when a call to it fails (Ray raises ``RayActorError`` for a dead or
restarting actor) or does not answer within the client's timeout. While down it gets no work;
every ``probe_interval_s`` it is asked a cheap ``ping`` (or the late answer it owes is checked),
and it is up again as soon as one arrives. A restart shows as a new process id in an answer.
Nothing here blocks: a check is ``ray.wait(..., timeout=0)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from .allocation import Composition

__all__ = ["ShardHealth", "ShardView"]

log = logging.getLogger("carousel.ray")


@dataclass
class ShardView:
    """The client's view of one shard actor."""

    index: int
    handle: Any
    node_id: str
    pid: int
    composition: Composition | None
    down_since: float | None = None
    probe: Any = None           # an ObjectRef whose answer says the shard is back
    next_probe: float = 0.0
    restarts_seen: int = 0      # restarts this client noticed (a new pid)


class ShardHealth:
    """Up/down marks, probes and the latest EM composition of every shard."""

    def __init__(self, handles: Sequence[Any], identities: Sequence[Mapping[str, Any]], probe_interval_s: float
                 ) -> None:
        self.probe_interval_s = probe_interval_s
        self.shards = [ShardView(i, h, ident["node_id"], ident["pid"], Composition.from_arrays(ident["composition"]))
                       for i, (h, ident) in enumerate(zip(handles, identities))]

    def __len__(self) -> int:
        return len(self.shards)

    def handle(self, k: int) -> Any:
        return self.shards[k].handle

    def compositions(self) -> list[Composition | None]:
        return [s.composition for s in self.shards]

    def available(self) -> np.ndarray:
        """Which shards to ask now (bool per shard); probes the ones marked down, without blocking."""
        now = time.monotonic()
        return np.array([s.down_since is None or self._probe(s, now) for s in self.shards], dtype=bool)

    def mark_down(self, k: int, pending: Any = None) -> None:
        """Shard ``k`` failed or was too slow; ``pending``: a call it still owes an answer to."""
        s = self.shards[k]
        now = time.monotonic()
        if s.down_since is None:
            s.down_since = now
            log.warning("shard %d is unavailable; serving from the others", k)
        if pending is not None and s.probe is None:
            s.probe = pending
        s.next_probe = now + self.probe_interval_s

    def mark_up(self, k: int) -> None:
        s = self.shards[k]
        if s.down_since is not None:
            log.info("shard %d is back", k)
        s.down_since, s.probe = None, None

    def seen(self, k: int, info: Mapping[str, Any]) -> None:
        """An answer from shard ``k`` with its pid and EM composition."""
        s = self.shards[k]
        if info.get("pid") is not None and info["pid"] != s.pid:
            s.pid = info["pid"]
            s.restarts_seen += 1
        if "composition" in info:
            s.composition = Composition.from_arrays(info["composition"])

    def _probe(self, s: ShardView, now: float) -> bool:
        """Whether a shard marked down is back: its pending answer arrived, or a probe says so."""
        if s.probe is not None:
            ready, _ = ray.wait([s.probe], timeout=0)
            if not ready:
                return False
            try:
                answer = ray.get(s.probe)
            except RayActorError:
                s.probe, s.next_probe = None, now + self.probe_interval_s
                return False
            except RayTaskError:
                answer = None  # it answered (with that request's own error): it is up
            self.mark_up(s.index)
            if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[1], dict):
                answer = answer[1]  # a late sample() or add() reply: (arrays, info)
            if isinstance(answer, dict) and "pid" in answer:
                self.seen(s.index, answer)
            return True
        if now >= s.next_probe:
            s.probe = s.handle.ping.remote()
        return False
