"""What ``carousel tune`` and ``carousel tune --check`` do: measure, plan, print, write; or check.

The profile written is a single-memory profile (``[daemon]`` from the base profile, if one was
given, and the tuned memory), checked by the same loader ``carousel check-config`` and
``carousel serve`` use before it is written. Beside it, ``NAME.plan.json`` keeps what was
measured, chosen and expected, which ``--check`` reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_toml
from ..toml_write import dump_toml
from .check import check_daemon, step_time_from
from .measure import HostMeasurement, TierMeasurement, measure_host, measure_tier
from .plan import TunePlan, TuneRequest, _fmt_bytes, make_plan


def plan_path(profile: str | os.PathLike[str]) -> Path:
    """Where the plan of a tuned profile lives: ``tuned.toml`` -> ``tuned.plan.json``."""
    p = Path(profile)
    return p.with_name(p.stem + ".plan.json")


def _base(base: str | None, memory: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(daemon table, memory dict)`` of the base profile, paths made absolute."""
    if base is None:
        return {}, {}
    from ..daemon.profile import load_profile

    profile = load_profile(base)
    names = list(profile.memories)
    name = memory or (names[0] if len(names) == 1 else None)
    if name not in profile.memories:
        raise ConfigError(base, "memories", f"name one memory with --memory (it has {', '.join(names)})"
                          if name is None else f"no memory {name!r} (it has {', '.join(names)})")
    daemon = dict(read_toml(base).get("daemon", {}))
    folder = os.path.dirname(os.path.abspath(base))
    for key in ("data_dir", "socket_dir", "token_file"):
        if isinstance(daemon.get(key), str):
            daemon[key] = os.path.join(folder, os.path.expanduser(daemon[key]))
    return daemon, profile.memories[name].to_dict()


def _tier_arg(text: str) -> tuple[str, str]:
    """``KIND:PATH`` or ``PATH`` (an LMDB tier)."""
    from ..config import TIER_KINDS

    kind, sep, path = text.partition(":")
    if sep and kind in TIER_KINDS:
        return kind, path
    return "lmdb", text


def measured_table(host: HostMeasurement, measured: list[TierMeasurement]) -> list[str]:
    """The measurements as the printed table."""
    lines = [f"host: {_fmt_bytes(host.mem_available_bytes)} RAM available, {_fmt_bytes(host.shm_free_bytes)} free in "
             f"/dev/shm, {host.cores} cores",
             f"{'path':<28} {'kind':<5} {'fs':<6} {'free':>10} {'write us/sample @16/64/256':>27} {'fsync p50/p99 ms':>17} "
             f"{'read us/sample @1/2/4 thr (cold)':>33} {'p99 read call ms':>16}"]
    for m in measured:
        w = "/".join(f"{m.write_s_per_sample[b] * 1e6:,.0f}" for b in sorted(m.write_s_per_sample))
        r = "/".join(f"{m.read_s_per_sample(t) * 1e6:,.0f}" for t in sorted(m.read_samples_per_s))
        lines.append(f"{m.path[-28:]:<28} {m.kind:<5} {m.fs[:6]:<6} {_fmt_bytes(m.free_bytes):>10} {w:>27} "
                     f"{m.fsync_p50_s * 1e3:>8.2f}/{m.fsync_p99_s * 1e3:<8.2f} {r:>33} "
                     f"{m.read_p99_s[1] * 1e3:>16.2f}")
        lines.append(f"{'':<28} cache: {m.cache}; {m.disk_bytes_per_record:,.0f} B on disk per record; reads of "
                     f"{m.read_batch} {'rows (a chunk)' if m.kind == 'zarr' else 'ids'} a call")
    return lines


def choices_table(plan: TunePlan) -> list[str]:
    width = max(len(c.key) for c in plan.choices)
    lines = [f"{'setting':<{width}}  {'value':<24} why"]
    for c in plan.choices:
        lines.append(f"{c.key:<{width}}  {str(c.value):<24} {c.why}")
    return lines + [f"warning: {w}" for w in plan.warnings]


def profile_dict(plan: TunePlan, daemon: dict[str, Any], memory: dict[str, Any], sample_shape, dtype) -> dict[str, Any]:
    """The tuned profile: the base's memory with the plan's sizes and tiers."""
    out: dict[str, Any] = {}
    if daemon:
        out["daemon"] = daemon
    mem = dict(memory.get("memory", {}))
    if sample_shape is not None:
        mem["sample_shape"] = list(sample_shape)
    if dtype is not None:
        mem["dtype"] = dtype
    mem.update(plan.memory)
    out["memory"] = mem
    out["swap"] = {**memory.get("swap", {}), **plan.swap}
    out["write_behind"] = {**memory.get("write_behind", {}), **plan.write_behind}
    out["tiers"] = [dict(t) for t in plan.tiers]
    return out


def run_tune(args) -> int:
    """``carousel tune``: see :mod:`carousel.tune`. Exit 0 with a profile written, 2 on bad input."""
    from ..config import CarouselConfig
    from ..daemon.profile import DaemonProfile
    from ..kinds import make_codec

    try:
        daemon, base = _base(args.profile, args.memory)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    shape = None if args.sample_shape is None else [int(v) for v in args.sample_shape.replace("x", ",").split(",") if v]
    if not base and shape is None:
        print("carousel: tune needs the samples' shape: --sample-shape 3,32,32 (or a base --profile)", file=sys.stderr)
        return 2
    memory_table = {**base.get("memory", {}), **({"sample_shape": shape} if shape else {}),
                    **({"dtype": args.dtype} if args.dtype else {})}
    memory_table.setdefault("em_size", 1)
    try:
        probe = CarouselConfig.from_dict({"memory": memory_table})
    except ConfigError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2
    mc = probe.memory
    fields = {"x": (tuple(mc.sample_shape), mc.dtype), "y": ((), "int64"), "task": ((), "int16"),
              **{n: (tuple(s), d) for n, (s, d) in mc.extras.items()}}
    schema = make_codec(mc, fields).stored
    from storage_backends import Schema

    record = Schema(schema).record_nbytes
    step_s = None if args.step_ms is None else args.step_ms / 1e3
    if args.from_metrics:
        try:
            step_s, steps = step_time_from(args.from_metrics, args.window)
        except (OSError, ValueError) as exc:
            print(f"carousel: cannot read the trainer's step time from {args.from_metrics}: {exc}", file=sys.stderr)
            return 2
        print(f"trainer step: {step_s * 1e3:.2f} ms ({steps} steps seen by the daemon in {args.window:g} s)")
    if step_s is None:
        print("carousel: tune needs the trainer's step time: --step-ms MS, or --from-metrics HOST:PORT of a daemon "
              "beside a running trainer", file=sys.stderr)
        return 2
    want_em = args.em_size if args.em_size is not None else (base.get("memory", {}).get("em_size") if base else None)
    try:
        req = TuneRequest(record_nbytes=record, step_s=step_s, batch=args.batch,
                          stream_batch=args.stream_batch if args.stream_batch is not None else args.batch,
                          margin=args.margin, ram_budget_bytes=args.ram_budget, em_size=want_em,
                          ratio=args.ratio if args.ratio is not None else float(base.get("swap", {}).get("ratio", 0.5)),
                          max_lag_steps=int(base.get("swap", {}).get("max_lag_steps", 4)), disk_share=args.disk_share)
    except ValueError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2
    host = measure_host()
    measured = []
    for text in args.tier:
        kind, path = _tier_arg(text)
        print(f"measuring {kind} at {path} ...", file=sys.stderr, flush=True)
        try:
            measured.append(measure_tier(path, kind, schema, sync=not args.no_sync, records=args.records,
                                         read_batch=max(1, args.batch // 2)))
        except (OSError, ValueError) as exc:
            print(f"carousel: cannot measure {path}: {exc}", file=sys.stderr)
            return 2
    try:
        plan = make_plan(req, host, measured)
    except ValueError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2
    print(f"records: {record:,} B ({list(mc.sample_shape)} {mc.dtype}); trainer step {step_s * 1e3:g} ms, "
          f"{req.batch} replayed + {req.stream_batch} added a step; margin {req.margin}x")
    print("\n".join(measured_table(host, measured)))
    print()
    print("\n".join(choices_table(plan)))
    data = profile_dict(plan, daemon, base, shape, args.dtype)
    out = Path(args.out)
    try:
        DaemonProfile.from_dict(data, source=str(out.absolute()))  # what check-config and serve will load
    except ConfigError as exc:
        print(f"carousel: the tuned profile does not load: {exc}", file=sys.stderr)
        return 2
    header = ["# carousel profile written by `carousel tune` (see " + plan_path(out).name + " for the measurements)",
              "# check it against the running daemon: carousel tune --check " + out.name, "#"]
    header += ["# " + line for line in choices_table(plan)]
    out.write_text("\n".join(header) + "\n\n" + dump_toml(data))
    plan_path(out).write_text(json.dumps({
        "request": req.__dict__, "host": host.to_json(), "measured": [m.to_json() for m in measured],
        **plan.to_json()}, indent=1, default=str))
    print(f"\nwrote {out} and {plan_path(out)}")
    return 0


def run_check(args) -> int:
    """``carousel tune --check PROFILE``: exit 0 when the daemon runs as planned, 1 when not, 2 when it
    cannot tell (no plan, no daemon)."""
    path = plan_path(args.check)
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"carousel: no plan for {args.check} ({path}: {exc}); run carousel tune first", file=sys.stderr)
        return 2
    address = args.metrics
    if address is None:
        from ..daemon.profile import load_profile

        try:
            profile = load_profile(args.check)
        except ConfigError as exc:
            print(f"carousel: invalid profile: {exc}", file=sys.stderr)
            return 2
        if profile.daemon.metrics_address is None:
            print("carousel: the profile serves no metrics (daemon.metrics = \"\"): pass --metrics HOST:PORT",
                  file=sys.stderr)
            return 2
        host, port = profile.daemon.metrics_address
        address = f"{host}:{port}"
    try:
        report = check_daemon(plan, address, args.window, args.memory)
    except OSError as exc:
        print(f"carousel: no daemon metrics at {address}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2
    print(f"daemon at {address}, {args.window:g} s window, against {path.name}:")
    print("\n".join(report.lines()))
    print("as planned" if report.ok else "NOT as planned")
    return 0 if report.ok else 1
