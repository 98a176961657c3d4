"""The ``carousel`` command line.

``carousel serve --config PROFILE.toml``   run the daemon (see :mod:`carousel.server`)
``carousel check-config PROFILE.toml``     validate a profile (daemon or memory) and exit
``carousel status [--socket PATH]``        occupancy, swap rates, prefetch hit rate, latency of a daemon
``carousel store info URL``    schema, record count, bytes on disk, chunking of a store
``carousel store verify URL``  read every record, check every checksum (corrupt ones are
                               quarantined when the store is writable); exit 1 if any failed
Exit codes: 0 ok, 1 corrupt records found / daemon unreachable, 2 bad usage, an invalid profile or a
store that cannot be opened.
"""

from __future__ import annotations

import argparse
import signal
import sys

from storage_backends import CorruptRecordError, StoreError, open_store

from . import __version__
from .config import ConfigError


def _info(url: str) -> int:
    with open_store(url) as store:
        print(f"url:        {store.url}")
        print(f"backend:    {type(store).__name__}")
        print(f"records:    {len(store)}")
        print(f"on disk:    {store.nbytes} bytes")
        print(f"chunks:     {store.num_chunks()} x {store.chunk_rows} rows")
        print(f"quarantine: {store.quarantined_ids().size} records")
        print("schema:")
        for name, spec in store.schema.items():
            print(f"  {name:<12} {spec.dtype.name:<8} {spec.shape}")
    return 0


def _verify(url: str) -> int:
    bad = 0
    checked = 0
    with open_store(url) as store:
        for i in range(store.num_chunks()):
            try:
                checked += store.get_chunk(i).ids.size
            except CorruptRecordError as exc:
                bad += exc.ids.size
                print(f"corrupt: {exc}", file=sys.stderr)
                checked += store.get_chunk(i).ids.size  # the rest of the chunk, corrupt ones gone
            except IndexError:
                break  # the store shrank while we walked (generic chunking)
    print(f"verified {checked} records, {bad} corrupt")
    return 1 if bad else 0


def _capacity(tier) -> str:
    """A tier's capacity as the profile gave it: samples, or a byte budget."""
    if tier.capacity_bytes is not None:
        return f"{tier.capacity_bytes:,} bytes"
    return f"{tier.capacity_samples:,} samples"


def _check_config(path: str) -> int:
    from .daemon_config import load_profile

    try:
        profile = load_profile(path)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    for name, cfg in profile.memories.items():
        tiers = ", ".join(f"{t.kind} {t.path} ({_capacity(t)})" for t in cfg.tiers) or "RAM only"
        print(f"memory {name}: kind {cfg.memory.kind}; em_size {cfg.memory.em_size} x {list(cfg.memory.sample_shape)} "
              f"{cfg.memory.dtype}; swap {cfg.swap.policy} ratio {cfg.swap.ratio}; tiers: {tiers}")
    print(f"{path}: ok")
    return 0


def _serve(path: str, log_level: str | None) -> int:
    from .daemon_config import load_profile
    from .server import EARLY_STOP, Daemon, DaemonError, setup_logging

    try:
        profile = load_profile(path)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    setup_logging(log_level or profile.daemon.log_level)
    # Opening the memories (recovery) can take a while: a SIGTERM meanwhile is kept and honoured
    # as soon as the daemon is up -- it then shuts down cleanly instead of dying mid-recovery.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: EARLY_STOP.set())
    try:
        daemon = Daemon(profile)
    except (DaemonError, ConfigError, StoreError, OSError) as exc:
        print(f"carousel: cannot start: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    try:
        return daemon.run()
    except DaemonError as exc:
        print(f"carousel: cannot start: {exc}", file=sys.stderr)
        return 1


def _status(socket_path: str | None, memory: str, interval: float, as_json: bool) -> int:
    import json
    import math
    import time

    from .client import connect

    try:
        client = connect(socket_path, memory, reconnect_s=0)
    except (ConnectionError, OSError) as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 1
    with client:
        first = client.status()
        time.sleep(interval)
        second = client.status()
    if as_json:
        print(json.dumps(second, indent=2, default=str))
        return 0
    print(f"daemon pid {second['pid']} (carousel {second['version']}), {second['clients']} client(s), "
          f"{second['shm_segments']} shm segment(s) / {second['shm_bytes']} bytes, socket {second['socket']}")
    for name, st in second["memories"].items():
        before = first["memories"].get(name, st)
        rate = lambda key: (st[key] - before[key]) / interval  # noqa: E731
        print(f"memory {name}: added {st['added']}, evicted {st['evicted']}, task {st['current_task']}")
        for tier, t in st["tiers"].items():
            cap = t.get("capacity") or 0
            use = f"{100 * t['samples'] / cap:5.1f}%" if cap else "   -  "
            print(f"  tier {tier:<10} {t['samples']:>10} / {cap:<10} {use}  {t['bytes']:>14} bytes")
        hit = st["prefetch_hit_rate"]
        print(f"  swaps: {rate('swapped_in'):.1f}/s in, {rate('swapped_out'):.1f}/s out; lag {st['swap_lag']}; "
              f"prefetch hit rate {'-' if hit is None or math.isnan(hit) else f'{100 * hit:.1f}%'}; "
              f"ratio {st['swap_ratio']:.3f}")
        lat = st.get("sample_latency_seconds", {})
        print("  sample latency: " + ", ".join(f"{k} {v * 1e6:.0f} us" if v is not None else f"{k} -"
                                              for k, v in lat.items()))
        print(f"  write-behind queue {st['pending_writes']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carousel", description="storage-tiered replay memory")
    parser.add_argument("--version", action="version", version=f"carousel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    store = sub.add_parser("store", help="inspect a storage tier").add_subparsers(dest="action", required=True)
    store.add_parser("info", help="schema, size and chunking of a store").add_argument("url")
    store.add_parser("verify", help="check every record's checksum").add_argument("url")
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", required=True, help="daemon or memory profile (TOML)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    check = sub.add_parser("check-config", help="validate a profile and exit (2 on error)")
    check.add_argument("config")
    status = sub.add_parser("status", help="show a running daemon's memories")
    status.add_argument("--socket", help="the daemon's socket (default $XDG_RUNTIME_DIR/carousel/carousel.sock)")
    status.add_argument("--memory", default="default")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between the two readings for rates")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.config, args.log_level)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "status":
        return _status(args.socket, args.memory, args.interval, args.json)
    try:
        return {"info": _info, "verify": _verify}[args.action](args.url)
    except StoreError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
