"""Choose a profile's sizes from measurements: pure arithmetic, no I/O, every choice with its reason.

The trainer's step sets the pace. Each step replays ``batch`` rows and swaps ``ratio x batch`` of
them for stored samples, so the tiers must deliver ``ratio x batch / step`` samples a second; each
step also adds ``stream_batch`` samples, which the write-behind must store at the same pace. Both
are planned with a ``margin`` (2x by default): a tier that only just keeps up lags at its first
slow spell. The rules:

- **tier order**: fastest random reads first (the EM's misses are served from the top);
- **capacity**: ``disk_share`` of each path's free space, counted in record bytes as the tier's
  budget counts them (the probe measured the bytes on disk per record);
- **EM size**: the wanted size, else as many samples as half the RAM budget holds (at most 5,000:
  CarM's EMs are small by design; the tiers hold the rest), lowered to fit the budget if needed;
- **swap workers and ratio**: the slowest tier is where most samples live (the last, largest
  tier) and the bound. Workers: the fewest readers (up to half the cores) whose measured rate
  covers the demand with the margin. Ratio: the wanted one (CarM's 0.5), lowered to what that
  rate sustains, in steps of 0.05;
- **prefetch depth**: candidates for ``max(max_lag_steps, p99 read stall in steps)`` steps of
  swaps, times the margin, so a slow read is absorbed by the queue; at most 15 % of the budget;
- **write-behind batch**: the smallest measured batch whose cost per sample on the first tier
  keeps up with the stream with the margin and is within 25 % of the best (bigger batches
  amortise the commit, its fsync and flash wear, until they no longer do); the queue holds 4
  batches, 1,024 samples, or what arrives during a p99 fsync stall x 4 x margin, the largest;
- **reads in flight** (a files tier): the ``inflight`` whose cold reads were fastest;
- **tmpfs**: a path on tmpfs is RAM, emptied at reboot: its tier gets at most a quarter of the
  RAM budget, and the plan warns;
- **adaptive**: on when the slowest tier stalls (p99 read call over 5x its median) or the ratio
  had to be lowered: the memory then lowers its ratio itself when the tier falls behind.

:class:`TunePlan` also states what a running daemon should then show (:attr:`TunePlan.expect`),
which :mod:`carousel.tune.check` compares with its metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .measure import HostMeasurement, TierMeasurement

BASE_RSS = 320 << 20  # the daemon before any sample: Python, numpy, torch (measured ~260 MB)
MAX_DEFAULT_EM = 5000
RATIO_STEP = 0.05
STALL_FACTOR = 5.0
RAM_FS = ("tmpfs", "ramfs")
MIN_QUEUE = 1024  # samples: a few MB that ride out a commit's stall at any step time


@dataclass
class TuneRequest:
    """What the plan must serve (the trainer's pace) and within what (RAM, disk, margin)."""

    record_nbytes: int                 # bytes of one stored record (x, y, task, extras)
    step_s: float                      # the trainer's step time
    batch: int = 32                    # replay rows per step (sample(n))
    stream_batch: int = 32             # samples add()ed per step
    margin: float = 2.0                # every rate planned at this multiple of the demand
    ram_budget_bytes: int | None = None  # None: a quarter of MemAvailable
    em_size: int | None = None         # wanted EM size; None: what the budget gives
    ratio: float = 0.5                 # wanted swap ratio (CarM)
    max_lag_steps: int = 4
    disk_share: float = 0.5            # of each path's free space for its tier

    def __post_init__(self) -> None:
        if not self.step_s > 0:
            raise ValueError(f"step time must be > 0 s, got {self.step_s}")
        if self.batch < 1 or self.stream_batch < 0 or self.record_nbytes < 1:
            raise ValueError("batch >= 1, stream_batch >= 0 and record_nbytes >= 1 are needed")
        if not self.margin >= 1:
            raise ValueError(f"margin must be >= 1, got {self.margin}")
        if not 0 < self.disk_share <= 1:
            raise ValueError(f"disk share must be in (0, 1], got {self.disk_share}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")


@dataclass
class Choice:
    """One chosen setting: its TOML key, value and the reason, for the printed table."""

    key: str
    value: Any
    why: str


@dataclass
class TunePlan:
    """The chosen settings (``memory``, ``swap``, ``write_behind``, ``tiers``: TOML-shaped), their
    reasons, warnings, and what the running daemon should show (``expect``)."""

    memory: dict[str, Any]
    swap: dict[str, Any]
    write_behind: dict[str, Any]
    tiers: list[dict[str, Any]]
    choices: list[Choice] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _capacity_text(nbytes: int) -> str:
    """A byte capacity as the config writes it (whole MiB or GiB, rounded down)."""
    if nbytes >= 1 << 30 and nbytes % (1 << 30) < (1 << 30) // 64:
        return f"{nbytes >> 30}GiB"
    return f"{max(1, nbytes >> 20)}MiB"


def _rate(x: float) -> str:
    return f"{x:,.0f}/s"


def make_plan(req: TuneRequest, host: HostMeasurement, measured: list[TierMeasurement]) -> TunePlan:
    """Settings for ``measured`` tiers on ``host`` serving ``req``; see the module docstring."""
    if not measured:
        raise ValueError("no tier was measured: give at least one path")
    choices: list[Choice] = []
    warnings: list[str] = []
    rec = req.record_nbytes
    budget = req.ram_budget_bytes if req.ram_budget_bytes is not None else host.mem_available_bytes // 4
    usable = budget - BASE_RSS
    if usable < 64 * rec:
        raise ValueError(f"a RAM budget of {_fmt_bytes(budget)} leaves {_fmt_bytes(max(usable, 0))} after the daemon's "
                         f"own ~{_fmt_bytes(BASE_RSS)}: too little for an EM of {rec:,} B records")
    budget_why = "given" if req.ram_budget_bytes is not None else f"a quarter of MemAvailable ({_fmt_bytes(host.mem_available_bytes)})"

    # -- tiers: fastest first, capacity from free space --------------------------------------------------
    order = sorted(measured, key=lambda m: m.read_s_per_sample(1))
    tiers = []
    for i, m in enumerate(order):
        share = int(m.free_bytes * req.disk_share)
        if m.fs in RAM_FS:  # a tmpfs tier is RAM (and gone at reboot): it comes out of the RAM budget
            share = min(share, usable // 4)
            warnings.append(f"{m.path} is {m.fs}: RAM, emptied at every reboot; its tier takes at most a quarter "
                            "of the RAM budget")
        cap = int(share * rec / max(m.disk_bytes_per_record, rec))  # record bytes that take `share` on disk
        if cap < 64 * rec:
            warnings.append(f"{m.path}: {_fmt_bytes(m.free_bytes)} free leaves room for fewer than 64 samples; left out")
            continue
        tier = {"kind": m.kind, "path": m.path, "capacity": _capacity_text(cap), "sync": m.sync}
        inflight = None
        if m.best_inflight is not None:
            tier["inflight"] = m.best_inflight
            rates = ", ".join(f"{k}: {v:,.0f}/s" for k, v in sorted(m.inflight_samples_per_s.items()))
            inflight = Choice(f"tiers[{len(tiers)}].inflight", m.best_inflight,
                              f"cold reads from one reader by file reads in flight: {rates}")
        tiers.append(tier)
        choices.append(Choice(f"tiers[{len(tiers) - 1}]", f"{m.kind} {m.path}, {_capacity_text(cap)}",
                              f"reads {m.read_s_per_sample(1) * 1e6:,.0f} us/sample ({m.fs}; "
                              f"{'fastest' if i == 0 else f'#{i + 1} by speed'}); {req.disk_share:.0%} of "
                              f"{_fmt_bytes(m.free_bytes)} free at {m.disk_bytes_per_record:,.0f} B on disk per record"))
        if inflight is not None:
            choices.append(inflight)
    used = [m for m in order if any(t["path"] == m.path and t["kind"] == m.kind for t in tiers)]
    if not used:
        raise ValueError("no measured path has room for a tier")

    # -- the EM --------------------------------------------------------------------------------------------
    fit = int(0.6 * usable // rec)
    if req.em_size is not None:
        em = min(req.em_size, fit)
        why = "as asked" if em == req.em_size else f"lowered from {req.em_size:,}: 60 % of the RAM budget holds {fit:,}"
    else:
        em = min(MAX_DEFAULT_EM, int(0.5 * usable // rec))
        why = f"half the RAM budget holds {int(0.5 * usable // rec):,}" + \
            (f"; capped at {MAX_DEFAULT_EM:,} (CarM's EMs are small, the tiers hold the rest)" if em == MAX_DEFAULT_EM else "")
    choices.append(Choice("memory.em_size", em, f"{why}; {_fmt_bytes(em * rec)} of a {_fmt_bytes(budget)} "
                                                f"budget ({budget_why})"))

    # -- swap workers and ratio from the slowest tier ---------------------------------------------------------
    slow = used[-1]
    max_workers = max(1, host.cores // 2)
    demand = req.ratio * req.batch / req.step_s
    threads = sorted(t for t in slow.read_samples_per_s if t <= max_workers) or [min(slow.read_samples_per_s)]
    workers = next((t for t in threads if slow.read_samples_per_s[t] >= demand * req.margin),
                   max(threads, key=lambda t: slow.read_samples_per_s[t]))
    rate = slow.read_samples_per_s[workers]
    sustained = rate * req.step_s / (req.batch * req.margin)
    ratio = min(req.ratio, math.floor(sustained / RATIO_STEP) * RATIO_STEP)
    ratio = round(max(ratio, 0.0), 2)
    lowered = ratio < req.ratio
    choices.append(Choice("swap.workers", workers,
                          f"{slow.kind} at {slow.path} (slowest) reads {_rate(rate)} with {workers} reader(s); "
                          f"at most half of {host.cores} cores"))
    if lowered:
        why = (f"lowered from {req.ratio}: the slowest tier sustains {_rate(rate)}; {req.margin}x the demand of "
               f"{req.batch} x ratio per {req.step_s * 1e3:g} ms step allows {sustained:.3f}")
        if ratio == 0:
            warnings.append(f"{slow.path} cannot serve even a 0.05 swap ratio at a {req.step_s * 1e3:g} ms step: "
                            "swapping is off (ratio 0); use a faster tier or a slower step")
    else:
        why = f"as wanted: {_rate(demand)} swapped in, {rate / max(demand, 1e-9):.1f}x covered by {slow.kind} at {slow.path}"
    choices.append(Choice("swap.ratio", ratio, why))

    # -- prefetch depth --------------------------------------------------------------------------------------
    per_step = ratio * req.batch
    p99 = slow.read_p99_s[workers]
    stall_steps = p99 / req.step_s
    depth = math.ceil(per_step * max(req.max_lag_steps, stall_steps) * req.margin / 32) * 32 if per_step else 0
    depth = max(depth, 32 if per_step else 0)
    cap_depth = int(0.15 * usable // rec)
    if depth > cap_depth:
        warnings.append(f"the prefetch depth that absorbs a {p99 * 1e3:.1f} ms read stall ({depth}) is over 15 % of the "
                        f"RAM budget; capped at {cap_depth}")
        depth = cap_depth
    choices.append(Choice("swap.prefetch_depth", depth,
                          f"{per_step:g} swaps a step x max({req.max_lag_steps} lag steps, p99 read {p99 * 1e3:.2f} ms = "
                          f"{stall_steps:.1f} steps) x {req.margin}; {_fmt_bytes(depth * rec)}"))
    stalls = slow.read_p99_s[workers] > STALL_FACTOR * slow.read_p50_s[workers]
    adaptive = bool(lowered or stalls)
    choices.append(Choice("swap.adaptive", adaptive,
                          "the ratio was lowered to what the slowest tier sustains: let the memory lower it further "
                          "when the tier falls behind" if lowered else
                          f"the slowest tier's p99 read is {slow.read_p99_s[workers] / slow.read_p50_s[workers]:.0f}x its "
                          "median: let the memory lower its ratio during stalls" if stalls else
                          "reads are steady and cover the demand: a fixed ratio"))

    # -- write-behind ------------------------------------------------------------------------------------------
    top = used[0]
    add_rate = req.stream_batch / req.step_s
    sizes = sorted(top.write_s_per_sample)
    best = min(top.write_s_per_sample.values())
    # The smallest batch that keeps up with margin and costs within 25 % of the best per sample:
    # larger ones amortise a commit (and its fsync, and flash wear) no further.
    wb = next((b for b in sizes if top.write_s_per_sample[b] * add_rate * req.margin <= 1.0
               and top.write_s_per_sample[b] <= 1.25 * best), sizes[-1])
    cost = top.write_s_per_sample[wb]
    if cost * add_rate * req.margin > 1.0:
        warnings.append(f"{top.kind} at {top.path} stores {1 / cost:,.0f} samples/s at its best batch ({wb}); the stream "
                        f"adds {add_rate:,.0f}/s ({req.margin}x margin): add() will block. Use sync = false or a faster "
                        "first tier, or add less per step")
    stall = max(top.fsync_p99_s, cost * wb)
    queue = max(4 * wb, MIN_QUEUE, math.ceil(add_rate * stall * req.margin * 4))
    queue = 1 << math.ceil(math.log2(queue))
    cap_queue = max(wb, int(0.1 * usable // rec))
    if queue > cap_queue:
        warnings.append(f"a write-behind queue of {queue} is over 10 % of the RAM budget; capped at {cap_queue}")
        queue = max(wb, cap_queue)
    choices.append(Choice("write_behind.batch", wb,
                          f"{top.kind} at {top.path} stores {1 / cost:,.0f} samples/s at batches of {wb}: "
                          f"{req.margin}x the stream's {add_rate:,.0f}/s" + ("" if cost * add_rate * req.margin <= 1 else " (NOT)")))
    choices.append(Choice("write_behind.queue_samples", queue,
                          f"4 batches, {MIN_QUEUE}, or the samples added during a p99 fsync ({top.fsync_p99_s * 1e3:.2f} ms) x 4 x "
                          f"{req.margin}; {_fmt_bytes(queue * rec)}"))

    tier_names = {f"{i}-{t['kind']}": t["path"] for i, t in enumerate(tiers)}
    by_path = {(m.kind, m.path): m for m in used}
    expect = {
        "step_s": req.step_s, "batch": req.batch, "stream_batch": req.stream_batch, "margin": req.margin,
        "swaps_per_step": per_step,
        "max_lag_requests": req.max_lag_steps * per_step, "prefetch_hit_rate": 0.9,
        "write_queue_max": queue // 2,
        "read_s_per_sample": {name: by_path[(t["kind"], t["path"])].read_s_per_sample(workers)
                              for name, t in zip(tier_names, tiers)},
        # The first tier takes the write-behind's batches; the others take demotions, batches as
        # large as the overflow: their best measured cost.
        "write_s_per_sample": {name: cost if i == 0 else min(by_path[(t["kind"], t["path"])].write_s_per_sample.values())
                               for i, (name, t) in enumerate(zip(tier_names, tiers))},
        "tiers": tier_names,
    }
    return TunePlan(
        memory={"em_size": em},
        swap={"ratio": ratio, "workers": workers, "prefetch_depth": depth, "adaptive": adaptive,
              "max_lag_steps": req.max_lag_steps},
        write_behind={"batch": wb, "queue_samples": queue},
        tiers=tiers, choices=choices, warnings=warnings, expect=expect)
