"""``carousel tune --check``: compare a running daemon's metrics with the plan ``carousel tune`` wrote.

Two scrapes of the daemon's ``/metrics``, ``window_s`` apart, give rates over the window; the
gauges are read at the second. Per memory:

- **per tier, reads**: seconds in reads over samples read (``carousel_storage_read_seconds_total``
  / ``carousel_storage_read_samples_total``): the samples a second the tier delivers to the
  swap engine's readers now; short of ``margin`` times the plan's swap rate, the tier **lags**
  (its cost against what tune measured there is shown beside it);
- **per tier, writes**: the same for ``carousel_storage_write_seconds_total`` /
  ``carousel_storage_written_samples_total``, against the stream's add rate;
- **swaps**: the swap lag gauge against ``max_lag_steps`` steps of swaps, backlog skips, and the
  prefetch hit rate (``carousel_prefetch_requests_total``) against 90 %;
- **write-behind**: the queue against half its planned size, and time add() spent blocked.

Each finding names what to change (the slow tier: a lower ``swap.ratio`` that its observed cost
sustains, a deeper prefetch, or moving it down/out; a slow first tier: a larger write-behind batch
or ``sync = false``). The checks only judge what the window saw: a tier nobody read from is not
judged (say so rather than guess).
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Samples = dict[tuple[str, frozenset], float]


def scrape(address: str, timeout_s: float = 5.0) -> Samples:
    """Every sample of the daemon's ``/metrics`` at ``address`` (``host:port``), keyed by
    ``(name, frozenset(labels.items()))``. Raises ``OSError`` when nothing answers."""
    from prometheus_client.parser import text_string_to_metric_families

    url = address if address.startswith("http") else f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a URL the user gave
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls and not math.isnan(v))


def memories(samples: Samples) -> list[str]:
    """The memory names a daemon's metrics carry (its ``memory`` label)."""
    return sorted({dict(ls)["memory"] for (n, ls) in samples if n == "carousel_added_total" and "memory" in dict(ls)})


@dataclass
class Finding:
    """One line of the check: what was looked at, the plan, what was seen, and whether it is a problem."""

    what: str
    planned: str
    observed: str
    ok: bool
    advice: str = ""


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    lagging_tiers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def lines(self) -> list[str]:
        width = max((len(f.what) for f in self.findings), default=10)
        out = [f"{'':3}{'check':<{width}}  {'planned':>16}  {'observed':>22}"]
        for f in self.findings:
            out.append(f"{'ok' if f.ok else '!!':3}{f.what:<{width}}  {f.planned:>16}  {f.observed:>22}")
        for f in self.findings:
            if not f.ok and f.advice:
                out.append(f"-> {f.advice}")
        if self.lagging_tiers:
            out.append(f"lagging tier(s): {', '.join(self.lagging_tiers)}")
        return out


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f} us/sample"


def check(plan: Mapping[str, Any], before: Samples, after: Samples, window_s: float,
          memory: str | None = None) -> CheckReport:
    """Judge the window between two scrapes against ``plan`` (the ``.plan.json`` tune wrote)."""
    expect, swap, wb = plan["expect"], plan["swap"], plan["write_behind"]
    labels = {} if memory is None else {"memory": memory}
    margin = float(expect["margin"])
    rep = CheckReport()

    def delta(name: str, **ls: str) -> float:
        return _sum(after, name, **labels, **ls) - _sum(before, name, **labels, **ls)

    # A tier lags when what it delivers now falls short of what the trainer's pace asks of it, with
    # the margin: reads against the swap rate (``workers`` readers at the observed cost each),
    # writes against the stream's add rate (the first tier takes every add; the next ones the
    # demotions, which, once the tiers above are full, come at the same rate -- and run on the
    # writer thread, so a slow lower tier holds up the first one's writes too). How far the cost
    # is from what tune measured is shown, not judged: a tier slower than measured but still
    # fast enough for the pace does not lag.
    step_s, workers = float(expect["step_s"]), max(1, int(swap["workers"]))
    swap_rate = float(expect["swaps_per_step"]) / step_s
    add_rate = float(expect.get("stream_batch", expect["batch"])) / step_s
    worst: dict[str, float] = {}
    for tier in expect["tiers"]:
        for op, seconds, count in (("reads", "carousel_storage_read_seconds_total", "carousel_storage_read_samples_total"),
                                   ("writes", "carousel_storage_write_seconds_total",
                                    "carousel_storage_written_samples_total")):
            planned = float(expect["read_s_per_sample" if op == "reads" else "write_s_per_sample"][tier])
            n, t = delta(count, tier=tier), delta(seconds, tier=tier)
            if n <= 0:
                rep.findings.append(Finding(f"{tier} {op}", _us(planned), "none in window", True))
                continue
            cost = t / n
            vs_plan = cost / planned if planned > 0 else math.inf
            delivers = (workers if op == "reads" else 1) / cost
            demand = swap_rate if op == "reads" else add_rate
            ok = delivers >= demand * margin
            advice = ""
            if not ok:
                worst[tier] = max(worst.get(tier, 0.0), demand * margin / delivers)
                where = f"tier {tier} ({expect['tiers'][tier]})"
                if op == "reads":
                    ratio = math.floor(delivers * step_s / (int(expect["batch"]) * margin) / 0.05) * 0.05
                    advice = (f"{where} reads at {_us(cost)} ({vs_plan:.1f}x what tune measured there): "
                              f"{delivers:,.0f} samples/s for a swap rate of {swap_rate:,.0f}/s x {margin}. Set "
                              f"swap.ratio = {min(max(ratio, 0.0), float(swap['ratio'])):.2f} (what it sustains now), "
                              f"raise swap.prefetch_depth to {2 * int(swap['prefetch_depth'])}, or move this tier to "
                              "a faster device (re-run carousel tune)")
                else:
                    advice = (f"{where} writes at {_us(cost)} ({vs_plan:.1f}x the plan): {delivers:,.0f} samples/s for "
                              f"a stream of {add_rate:,.0f}/s x {margin}. Raise write_behind.batch to "
                              f"{2 * int(wb['batch'])}, set sync = false on it if a power cut may lose the last "
                              "second, or move it to a faster device")
            rep.findings.append(Finding(f"{tier} {op}", _us(planned), f"{_us(cost)} ({vs_plan:.1f}x)", ok, advice))
    slow_writers = [t for t in worst if any(f.what == f"{t} writes" and not f.ok for f in rep.findings)]

    lag = _sum(after, "carousel_swap_lag_requests", **labels)
    lag_max = float(expect["max_lag_requests"])
    backlog = delta("carousel_swap_skipped_total", reason="backlog")
    rep.findings.append(Finding("swap lag", f"<= {lag_max:g} requests", f"{lag:g}", lag <= lag_max,
                                "swaps trail the trainer: see the lagging tier above, or raise swap.workers"))
    rep.findings.append(Finding("swaps dropped (backlog)", "0 in window", f"{backlog:g}", backlog == 0,
                                "the engine dropped swaps it could not keep up with: lower swap.ratio"))
    hits, misses = delta("carousel_prefetch_requests_total", result="hit"), delta("carousel_prefetch_requests_total",
                                                                                  result="miss")
    if hits + misses >= 20:
        rate = hits / (hits + misses)
        rep.findings.append(Finding("prefetch hit rate", f">= {expect['prefetch_hit_rate']:.0%}", f"{rate:.0%}",
                                    rate >= float(expect["prefetch_hit_rate"]),
                                    f"swap-ins are read on demand: raise swap.prefetch_depth to "
                                    f"{2 * int(swap['prefetch_depth'])}"))
    else:
        rep.findings.append(Finding("prefetch hit rate", f">= {expect['prefetch_hit_rate']:.0%}",
                                    f"{hits + misses:g} swap-ins", True))
    queue = _sum(after, "carousel_write_behind_queue_samples", **labels)
    blocked = delta("carousel_write_behind_blocked_seconds_total")
    behind = (f"the write-behind waits on {', '.join(slow_writers)} (see above; demotions run on the writer thread)"
              if slow_writers else f"the first tier falls behind the stream: raise write_behind.batch to "
                                   f"{2 * int(wb['batch'])}")
    rep.findings.append(Finding("write-behind queue", f"<= {expect['write_queue_max']}", f"{queue:g}",
                                queue <= int(expect["write_queue_max"]), behind))
    rep.findings.append(Finding("add() blocked", "0 s in window", f"{blocked:.3f} s", blocked < 0.01 * window_s,
                                f"add() waited on a full write-behind queue: {behind}"))
    rep.lagging_tiers = sorted(worst, key=lambda t: -worst[t])
    return rep


def check_daemon(plan: Mapping[str, Any], address: str, window_s: float, memory: str | None = None) -> CheckReport:
    """Scrape ``address`` twice, ``window_s`` apart, and :func:`check` the window."""
    before = scrape(address)
    names = memories(before)
    if memory is None and len(names) > 1:
        raise ValueError(f"the daemon serves {len(names)} memories ({', '.join(names)}): name one with --memory")
    if memory is not None and memory not in names:
        raise ValueError(f"the daemon serves no memory {memory!r}; it serves {', '.join(names) or 'none'}")
    time.sleep(window_s)
    after = scrape(address)
    return check(plan, before, after, window_s, memory)


def step_time_from(address: str, window_s: float) -> tuple[float, int]:
    """The trainer's step time as a running daemon sees it: the window over the ``observe``
    requests in it (a trainer observes once a step), else over the ring batches it took.
    Returns ``(seconds per step, steps counted)``; raises ``ValueError`` when it saw none."""
    before = scrape(address)
    time.sleep(window_s)
    after = scrape(address)
    counts: dict[str, float] = defaultdict(float)
    for key in ("observe", "sample"):
        counts[key] = _sum(after, "carousel_requests_total", op=key) - _sum(before, "carousel_requests_total", op=key)
    rings = _sum(after, "carousel_ring_batches_total") - _sum(before, "carousel_ring_batches_total")
    steps = counts["observe"] or counts["sample"] + rings
    if steps <= 0:
        raise ValueError(f"the daemon at {address} saw no observe() or sample() in {window_s:g} s: is a trainer running?")
    return window_s / steps, int(steps)
