"""A shard's Prometheus exposition: its memory's metrics labelled with the shard, over HTTP.

Each shard actor serves ``/metrics`` itself (prometheus_client's HTTP server on a thread), on an
ephemeral port unless configured: Ray's own metrics export (``ray.util.metrics``) would carry the
values too, but renamed (``ray_`` prefix) and through the node's metrics agent, so the carousel
dashboards and alerts would not apply. Every series of the memory's registry gets ``memory`` (the
sharded memory's name) and ``shard`` labels, the way the daemon labels its memories, plus:

- ``carousel_shard_info{memory, shard, n_shards, routing}`` = 1
- ``carousel_shard_restarted{memory, shard}``: 1 when Ray restarted this actor (it reopened its tiers)
- ``carousel_shard_recovered_samples{memory, shard}``: samples found on the tiers when it opened

Prometheus finds the shards through a file_sd file (:func:`file_sd_groups`, written by
``ShardedMemory.write_file_sd``), since ephemeral ports change when an actor restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.metrics_core import Metric

__all__ = ["ShardExposition", "file_sd_groups", "write_file_sd"]


class _Labelled:
    """A registry's families with extra labels on every sample (added at scrape time)."""

    def __init__(self, registry: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self._registry, self._labels = registry, dict(labels)

    def collect(self):
        for fam in self._registry.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, **self._labels}, s.value, s.timestamp, s.exemplar)
            yield out


class ShardExposition:
    """The registry a shard exposes (its memory's, labelled, plus the shard gauges) and its server."""

    def __init__(self, memory_registry: CollectorRegistry, *, memory: str, shard: int, n_shards: int, routing: str,
                 restarted: bool, recovered_samples: int) -> None:
        labels = {"memory": memory, "shard": str(shard)}
        self.registry = r = CollectorRegistry()
        Gauge("carousel_shard_info", "A shard of a sharded carousel memory (Ray actor).",
              ["memory", "shard", "n_shards", "routing"], registry=r).labels(
            memory=memory, shard=str(shard), n_shards=str(n_shards), routing=routing).set(1)
        Gauge("carousel_shard_restarted", "1 when Ray restarted this shard's actor and it reopened its tiers.",
              ["memory", "shard"], registry=r).labels(**labels).set(int(restarted))
        Gauge("carousel_shard_recovered_samples", "Samples found on the shard's tiers when it opened.",
              ["memory", "shard"], registry=r).labels(**labels).set(recovered_samples)
        r.register(_Labelled(memory_registry, labels))
        self._server = None
        self.address: str | None = None

    def serve(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: any free port); returns ``host:port`` as bound."""
        result = start_http_server(port, addr=host, registry=self.registry)
        self._server = result[0] if isinstance(result, tuple) else None
        bound = self._server.server_address[1] if self._server is not None else port
        self.address = f"{host}:{bound}"
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def file_sd_groups(endpoints: Mapping[int, str | None], memory: str, job_labels: Mapping[str, str] | None = None
                   ) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups: one per shard with a ``/metrics`` endpoint.

    >>> file_sd_groups({0: "10.0.0.1:9101", 1: None}, "default")
    [{'targets': ['10.0.0.1:9101'], 'labels': {'carousel_memory': 'default', 'carousel_shard': '0'}}]
    """
    return [{"targets": [address], "labels": {"carousel_memory": memory, "carousel_shard": str(shard),
                                              **(job_labels or {})}}
            for shard, address in sorted(endpoints.items()) if address]


def write_file_sd(path: str | os.PathLike[str], groups: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``groups`` as a file_sd JSON file, atomically (Prometheus re-reads it on change)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(groups), indent=1) + "\n")
    os.replace(tmp, path)
    return path
