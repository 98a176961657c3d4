"""The memory's Prometheus metrics, in a registry the memory owns (no global state).

Names follow Prometheus conventions: ``carousel_`` prefix, base units, ``_total`` on counters;
labels only from small closed sets (tier names from the config, direction, result, op).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# sample() is a memcpy-sized operation: ~30 us for 256 CIFAR samples here.
_LATENCY_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)


class MemoryMetrics:
    """Every metric of one :class:`~carousel.CarouselMemory`; ``registry`` is what to expose."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.samples = Gauge("carousel_samples", "Samples held per tier (ram = EM slots filled).", ["tier"], registry=r)
        self.bytes = Gauge("carousel_bytes", "Bytes occupied per tier.", ["tier"], registry=r)
        self.capacity = Gauge("carousel_capacity_samples", "Capacity per tier in samples.", ["tier"], registry=r)
        self.capacity_bytes = Gauge("carousel_capacity_bytes", "Byte budget per tier (tiers of variable-size "
                                    "records with capacity in bytes).", ["tier"], registry=r)
        self.record_bytes = Gauge("carousel_record_bytes", "Bytes of the records each tier holds, as its budget "
                                  "counts them (a compressed sample: its compressed size).", ["tier"], registry=r)
        self.codec_seconds = Counter("carousel_codec_seconds_total", "Time encoding samples for storage "
                                     "(write-behind) and decoding them back (prefetch; saliency: completion).",
                                     ["op"], registry=r)
        self.added = Counter("carousel_added_total", "Samples handed to add().", registry=r)
        self.admissions = Counter("carousel_admissions_total", "EM admission decisions.", ["result"], registry=r)
        self.evictions = Counter("carousel_evictions_total", "Samples dropped for good.", ["reason"], registry=r)
        self.migrated = Counter("carousel_migrated_samples_total", "Samples demoted to the next tier.",
                                ["tier"], registry=r)
        self.migrated_bytes = Counter("carousel_migrated_bytes_total", "Bytes demoted to the next tier.",
                                      ["tier"], registry=r)
        self.swaps = Counter("carousel_swaps_total", "EM swaps by direction.", ["direction"], registry=r)
        self.swap_skipped = Counter("carousel_swap_skipped_total", "Swap requests not carried out.",
                                    ["reason"], registry=r)
        self.swap_lag = Gauge("carousel_swap_lag_requests", "Swap requests waiting for the engine.", registry=r)
        self.step_boundary = Counter("carousel_step_boundary_seconds_total", "Time the trainer's thread spent in "
                                     "step boundaries of a deterministic memory (waiting for storage, applying swaps, "
                                     "planning capacity).", registry=r)
        self.swap_ratio = Gauge("carousel_swap_effective_ratio", "Swap ratio in force (adaptive mode lowers it).",
                                registry=r)
        self.prefetch_depth = Gauge("carousel_prefetch_depth", "Decoded swap-in candidates ready.", registry=r)
        self.prefetch = Counter("carousel_prefetch_requests_total", "Swap-ins served from the prefetch queue "
                                "(hit) or read on demand (miss).", ["result"], registry=r)
        self.sample_latency = LatencyHistogram("carousel_sample_latency_seconds", "sample() latency.",
                                               _LATENCY_BUCKETS, registry=r)
        self.write_queue = Gauge("carousel_write_behind_queue_samples", "Samples waiting for write-behind.",
                                 registry=r)
        self.write_blocked = Counter("carousel_write_behind_blocked_seconds_total",
                                     "Time add() spent blocked on a full write-behind queue.", registry=r)
        self.errors = Counter("carousel_errors_total", "Errors by operation and kind.", ["op", "kind"], registry=r)
        self.storage_reads = Counter("carousel_storage_read_samples_total", "Samples read from storage tiers.",
                                     ["tier"], registry=r)
        # Per tier, so that `carousel tune --check` can name the tier that lags: time over samples
        # is the cost per sample the tier gives the swap engine (reads) and the write-behind (writes).
        self.storage_read_seconds = Counter("carousel_storage_read_seconds_total", "Time spent in storage "
                                            "reads (swap-ins and prefetch), by tier.", ["tier"], registry=r)
        self.storage_writes = Counter("carousel_storage_written_samples_total", "Samples written to storage "
                                      "tiers (write-behind and demotions), by tier.", ["tier"], registry=r)
        self.storage_write_seconds = Counter("carousel_storage_write_seconds_total", "Time spent in storage "
                                             "writes (write-behind and demotions), by tier.", ["tier"], registry=r)
        self.integrity_checks = Counter("carousel_integrity_checked_samples_total",
                                        "Samples of sample()'s batches checked against their add-time references "
                                        "(the integrity mode): ok, or mismatch (IntegrityError).", ["result"],
                                        registry=r)

    def timed_codec(self, op: str, fn: Callable[[Mapping[str, Any]], dict[str, Any]],
                    records: Mapping[str, Any]) -> dict[str, Any]:
        """``fn(records)`` -- a codec's ``encode`` (write-behind) or ``decode`` (swap engine) -- with its
        time counted in ``carousel_codec_seconds_total{op}`` when it returns."""
        t0 = time.perf_counter()
        out = fn(records)
        self.codec_seconds.labels(op=op).inc(time.perf_counter() - t0)
        return out

    def count_write(self, tier: str, n: int, seconds: float) -> None:
        """``n`` samples written to ``tier`` in ``seconds`` (one ``put_many``)."""
        self.storage_writes.labels(tier=tier).inc(n)
        self.storage_write_seconds.labels(tier=tier).inc(seconds)

    def count_error(self, op: str, exc: BaseException) -> None:
        """One error of ``op`` (``write_behind``, ``read``, ``swap``, ...), by its class: ``carousel_errors_total``."""
        self.errors.labels(op=op, kind=type(exc).__name__).inc()


class LatencyHistogram:
    """A Prometheus histogram for the hot path, observed in 0.13 us instead of 0.65 us.

    ``prometheus_client.Histogram.observe`` takes two locks and walks the buckets in Python: 2.5 %
    of a 26 us ``sample()``. This one bisects into plain counters and leaves the locking to its
    callers, who already hold one (``sample()`` observes under the EM's lock), so two observers
    never interleave. A scrape copies the counters; it may see a ``_sum`` one sample behind the
    buckets, never a bucket count that goes down.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        """Count one latency (callers serialize: see the class docstring)."""
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1  # le: bound included
        self._sum += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, c in zip((*map(floatToGoString, self._bounds), "+Inf"), counts):
            running += c
            cumulative.append((bound, running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)
