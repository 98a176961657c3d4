"""The daemon's metrics: its own registry, every memory's registry labelled ``memory=NAME``, and the
latency quantiles ``carousel status`` prints. Served on ``/metrics`` over HTTP on loopback.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import Metric

from .. import __version__
from ..memory import CarouselMemory

REQUEST_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0, 5.0)


class MemoryCollector:
    """Every memory's registry, each sample labelled ``memory=NAME``, as one set of families."""

    def __init__(self, memories: Mapping[str, CarouselMemory]) -> None:
        self._memories = memories

    def collect(self):
        families: dict[str, Metric] = {}
        for name, mem in list(self._memories.items()):
            for fam in mem.registry.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "memory": name}, s.value, s.timestamp, s.exemplar)
        return list(families.values())


class DaemonMetrics:
    """The daemon's own registry (process, build, clients, requests, shared memory, rings) plus every
    memory's, read at scrape time through :class:`MemoryCollector`."""

    def __init__(self, memories: Mapping[str, CarouselMemory]) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        Info("carousel_build", "carousel version and runtime.", registry=r).info(
            {"version": __version__, "python": ".".join(map(str, sys.version_info[:3]))})
        self.clients = Gauge("carousel_clients", "Connected clients that completed HELLO.", registry=r)
        self.pending = Gauge("carousel_pending_connections",
                             "Connections that have not completed HELLO yet (closed after hello_timeout_s).",
                             registry=r)
        self.requests = Counter("carousel_requests_total", "Requests by op and result.", ["op", "result"],
                                registry=r)
        # reason: uid, token, busy, stopping, hello_timeout (no HELLO in time), pending_full (the
        # oldest connection before HELLO, closed to make room for a new one)
        self.refused = Counter("carousel_connections_refused_total", "Connections refused.", ["reason"],
                               registry=r)
        self.protocol_errors = Counter("carousel_protocol_errors_total", "Frames that broke the protocol.",
                                       registry=r)
        self.latency = Histogram("carousel_request_latency_seconds", "Request latency in the daemon.", ["op"],
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.shm_segments = Gauge("carousel_shm_segments", "Shared-memory segments owned by the daemon.",
                                  registry=r)
        self.shm_bytes = Gauge("carousel_shm_bytes", "Bytes of shared memory owned by the daemon.", registry=r)
        self.ring_batches = Counter("carousel_ring_batches_total", "Batches placed in shared-memory rings.",
                                    registry=r)
        r.register(MemoryCollector(memories))


def histogram_quantiles(registry: CollectorRegistry, name: str, qs) -> dict[str, float]:
    """Quantiles of a histogram, interpolated within buckets as PromQL's ``histogram_quantile``."""
    buckets = []
    for fam in registry.collect():
        if fam.name == name:
            buckets = sorted((float(s.labels["le"]), s.value) for s in fam.samples if s.name == name + "_bucket")
    out = {}
    total = buckets[-1][1] if buckets else 0
    for q in qs:
        key = f"p{round(q * 100)}"
        if not total:
            out[key] = math.nan
            continue
        rank, prev_le, prev_c = q * total, 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                out[key] = le if math.isinf(le) else prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-12))
                if math.isinf(le):
                    out[key] = prev_le
                break
            prev_le, prev_c = le, c
    return out

