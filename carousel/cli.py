"""The ``carousel`` command line.

``carousel serve --config PROFILE.toml``   run the daemon (see :mod:`carousel.daemon`); ``--parent-fd FD``:
                                           also stop cleanly when that inherited pipe closes (how
                                           :func:`carousel.spawn` ties its child daemon to the trainer)
``carousel check-config PROFILE.toml``     validate a profile (daemon or memory), check that it fits this
                                           machine (RAM, writable paths) and print what it holds; exit
``carousel status [--socket PATH | --config PROFILE]``
                                           occupancy, swap rates, prefetch hit rate, latency of a daemon
``carousel tune --tier [KIND:]PATH ... --step-ms MS [--profile BASE] [--out P.toml]``
                                           measure the tier paths (cold random reads, writes, fsync,
                                           free space) and RAM, write a profile that fits them and
                                           P.plan.json; ``tune --check P.toml`` compares the running
                                           daemon's metrics with that plan (:mod:`carousel.tune`);
                                           exit 1 when it does not run as planned
``carousel store info URL``    schema, record count, bytes on disk, chunking of a store
``carousel store verify URL``  read every record, check every checksum (corrupt ones are
                               quarantined when the store is writable); exit 1 if any failed
``carousel import SRC --profile PROFILE [--memory NAME]``
                                           bulk-load a data set (IDX, CIFAR pickles or .tar.gz, .npz,
                                           CLASS/*.png folders) into a memory's tiers: resumable after
                                           a kill, checksummed; ``--verify`` re-checks source and records
                                           (see :mod:`carousel.importer`); refused while a daemon serves it
Exit codes: 0 ok, 1 corrupt records found / daemon unreachable / the daemon cannot start / an import
that failed or does not verify, 2 bad usage,
an invalid profile (or one that cannot run here) or a store that cannot be opened.

Each command imports only what it needs: ``carousel --help``, ``check-config`` and a ``status``
that finds no daemon answer without loading torch. ``serve`` never ends in a traceback: a start
that fails is one line ``carousel: cannot start: ...`` on stderr (the traceback goes to the
log at ``--log-level debug``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from . import __version__


def _info(url: str) -> int:
    from storage_backends import open_store

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
    from storage_backends import CorruptRecordError, open_store

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
    if tier.layout == "imagefolder":
        return "read-only: the folder's images"
    if tier.capacity_bytes is not None:
        return f"{tier.capacity_bytes:,} bytes"
    return f"{tier.capacity_samples:,} samples"


def _check_config(path: str, machine: bool) -> int:
    from .config import ConfigError
    from .daemon.preflight import check_profile
    from .daemon.profile import load_profile

    try:
        profile = load_profile(path)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    report = check_profile(profile) if machine else None
    for name, cfg in profile.memories.items():
        tiers = ", ".join(f"{t.kind} {t.path} ({_capacity(t)})" for t in cfg.tiers) or "RAM only"
        print(f"memory {name}: kind {cfg.memory.kind}; em_size {cfg.memory.em_size} x {list(cfg.memory.sample_shape)} "
              f"{cfg.memory.dtype}; swap {cfg.swap.policy} ratio {cfg.swap.ratio}; tiers: {tiers}")
        if report is not None:
            print("\n".join(report.lines(name)))
    if report is not None:
        print(report.summary())
        if report.problems:
            for problem in report.problems:
                print(f"carousel: invalid profile: {problem}", file=sys.stderr)
            return 2
        print(f"socket {profile.socket_path()}; the tier, state, data and socket folders can be created and written")
    print(f"{path}: ok")
    return 0


def _first_line(exc: BaseException) -> str:
    """An exception as one line: torch's allocator and others write several."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _serve(path: str, log_level: str | None, parent_fd: int | None = None) -> int:
    from .config import ConfigError
    from .daemon.preflight import check_profile
    from .daemon.profile import load_profile

    try:
        profile = load_profile(path)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    if parent_fd is not None:
        try:
            os.set_blocking(parent_fd, False)
        except OSError as exc:
            print(f"carousel: cannot start: --parent-fd {parent_fd}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    # What check-config checks, before anything is made or allocated: an EM larger than this
    # machine's RAM must not reach torch's allocator, an unwritable tier folder not a mkdir.
    problems = check_profile(profile).problems
    if problems:
        more = "" if len(problems) == 1 else \
            f" (and {len(problems) - 1} more: `carousel check-config {path}` lists them)"
        print(f"carousel: cannot start: {problems[0]}{more}", file=sys.stderr)
        return 2

    import logging

    from .daemon.log import setup_logging
    from .daemon.service import EARLY_STOP, Daemon

    setup_logging(log_level or profile.daemon.log_level)
    log = logging.getLogger("carousel.daemon")
    from . import sched

    if profile.daemon.batch_scheduling:
        # Before any thread of the daemon's starts: they inherit it (carousel.sched says why).
        log.debug("SCHED_BATCH", extra={"threads": sched.batch_process()})
    else:  # the comparison it is there for: every thread of the daemon's under the default policy
        sched.keep_default_policy()
    # Opening the memories (recovery) can take a while: a SIGTERM meanwhile is kept and honoured
    # as soon as the daemon is up -- it then shuts down cleanly instead of dying mid-recovery.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: EARLY_STOP.set())
    try:
        daemon = Daemon(profile, parent_fd)
    except Exception as exc:  # noqa: BLE001 - a start that fails is one line, whatever failed
        log.debug("start failed", exc_info=True)
        print(f"carousel: cannot start: {_first_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    try:
        return daemon.run()
    except Exception as exc:  # noqa: BLE001 - a port in use, a socket that cannot be bound, ...
        if daemon.ready.is_set():  # not a start failure: a fault while serving, kept in the log whole
            log.error("the daemon stopped on an error", exc_info=True)
            print(f"carousel: stopped on an error: {_first_line(exc)}", file=sys.stderr)
        else:
            log.debug("start failed", exc_info=True)
            print(f"carousel: cannot start: {_first_line(exc)}", file=sys.stderr)
        return 1


def _probe(address: str, timeout_s: float = 1.0) -> str | None:
    """Why nothing accepts a connection at ``address`` (a socket path or ``tcp://HOST:PORT``), or None.
    Cheap and torch-free, so ``status`` without a daemon answers at once."""
    try:
        if address.startswith("tcp://"):
            host, _, port = address[len("tcp://"):].rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
    except (OSError, ValueError) as exc:
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    sock.close()
    return None


def _status(socket_path: str | None, config: str | None, memory: str, interval: float, as_json: bool) -> int:
    import json
    import math
    import time

    from .config import ConfigError
    from .daemon.profile import resolve_socket_path, socket_hint

    try:
        address = resolve_socket_path(socket_path, config)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    # One try, a short timeout, no retries: a daemon that never answered will not start answering
    # because we wait (connect() retries only a connection that once existed).
    refused = _probe(address)
    if refused is not None:
        print(f"carousel: cannot reach a carousel daemon at {address} ({refused}): {socket_hint(address)}",
              file=sys.stderr)
        return 1

    from .daemon.client import connect
    from .daemon.wire import RemoteError

    try:
        client = connect(address, memory, reconnect_s=0, timeout_s=10.0)
    except (ConnectionError, OSError, RemoteError) as exc:
        print(f"carousel: {address}: {exc}", file=sys.stderr)
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


def _task_map(text: str) -> dict[str, int]:
    """``--task-of-class "0:0,1:0,2:1"`` (a label or an image folder's class name : task)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        cls, sep, task = part.rpartition(":")
        if not sep or not cls or not task.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected CLASS:TASK pairs such as 0:0,1:0,2:1; got {part!r}")
        out[cls.strip()] = int(task)
    if not out:
        raise argparse.ArgumentTypeError("expected CLASS:TASK pairs such as 0:0,1:0,2:1")
    return out


def _import_parser(sub) -> None:
    imp = sub.add_parser("import", help="bulk-load a data set into a memory's tiers (resumable, checksummed)",
                         description="Add every row of a data set to the memory a profile describes, through the "
                         "memory itself (catalog, capacity, recovery), in batches. Rerunning the same command after "
                         "a kill or Ctrl-C goes on where it stopped, never adding a row twice. Formats: IDX "
                         "(*-images-idx3-ubyte[.gz] and its labels file; the file or its folder), CIFAR python "
                         "(cifar-10-batches-py, cifar-100-python, or the .tar.gz), .npz (arrays x, y and optionally "
                         "task), folders of CLASS/*.png.")
    imp.add_argument("src", help="the data set: a file or a folder")
    imp.add_argument("--profile", required=True, help="memory or daemon profile (TOML) naming the tiers")
    imp.add_argument("--memory", help="which memory of a [memories.NAME] profile (default: 'default' or the only one)")
    imp.add_argument("--split", choices=("train", "test"), default="train",
                     help="which files of an IDX or CIFAR folder or archive (default train; an IDX images file "
                     "given by name is read as it is)")
    tasks = imp.add_mutually_exclusive_group()
    tasks.add_argument("--classes-per-task", type=int, metavar="K",
                       help="task = (position of the class among the sorted labels) // K (default: an .npz's "
                       "task array, else task 0)")
    tasks.add_argument("--task-of-class", type=_task_map, metavar="MAP",
                       help="explicit tasks: CLASS:TASK pairs, e.g. 0:0,1:0,2:1 (a label, or a folder's class name)")
    imp.add_argument("--limit", type=int, metavar="N", help="import the first N rows only")
    imp.add_argument("--batch", type=int, default=1024, metavar="N", help="rows per add (default 1024)")
    imp.add_argument("--checkpoint-rows", type=int, default=16384, metavar="N",
                     help="rows between progress checkpoints (flush + record; default 16384)")
    imp.add_argument("--x-key", default="x", help=".npz array of the samples (default x)")
    imp.add_argument("--y-key", default="y", help=".npz array of the labels (default y)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar (none is drawn off a terminal anyway)")
    imp.add_argument("--verify", action="store_true",
                     help="add nothing: re-check the source's sha256 and the stored records against the import's "
                     "manifest; exit 1 on a difference")


def _import(args: argparse.Namespace) -> int:
    """``carousel import``: the profile's memory, under the daemon's data-directory lock."""
    from .config import ConfigError
    from .daemon.profile import load_profile
    from .importer import ImportOptions, ImportSourceError, describe, import_dataset, verify_import
    from storage_backends import StoreError, StoreLockedError

    try:
        profile = load_profile(args.profile)
    except ConfigError as exc:
        print(f"carousel: invalid profile: {exc}", file=sys.stderr)
        return 2
    name = args.memory or ("default" if "default" in profile.memories or len(profile.memories) != 1
                           else next(iter(profile.memories)))
    if name not in profile.memories:
        print(f"carousel: {args.profile} has no memory {name!r}; it has {', '.join(profile.memories)} "
              "(choose with --memory NAME)", file=sys.stderr)
        return 2
    try:
        opts = ImportOptions(split=args.split, x_key=args.x_key, y_key=args.y_key,
                             classes_per_task=args.classes_per_task, task_of_class=args.task_of_class,
                             limit=args.limit, batch=args.batch, checkpoint_rows=args.checkpoint_rows)
        if args.verify:
            result = verify_import(profile.memories[name], args.src, opts)
            print("\n".join(result.lines))
            print(f"verify: {'ok' if result.ok else 'FAILED'}")
            return 0 if result.ok else 1
        from .daemon.errors import DaemonError  # (loads torch: not for --verify)
        from .daemon.lock import FileLock

        # The daemon's lock file: carousel.daemon.service.LOCK_NAME (importing that module loads torch).
        lock_path = os.path.join(profile.data_dir(), "daemon.lock")
        try:  # the daemon's own lock: no daemon starts on this data while we write it, and none runs now
            lock = FileLock(lock_path, "data directory")
        except DaemonError:
            print(f"carousel: cannot import: a carousel daemon (or another import) is using {args.profile}'s data "
                  f"({lock_path} is locked); stop it first (`carousel status --config {args.profile}`), then "
                  "import", file=sys.stderr)
            return 1
        # SIGTERM and Ctrl-C stop the import between two adds (a KeyboardInterrupt inside one would
        # leave its rows stored but not counted); the rows added so far are flushed, then recorded.
        # A second Ctrl-C interrupts at once.
        stopping: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            if stopping and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stopping.append(signum)

        old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = import_dataset(profile.memories[name], args.src, opts, progress=False if args.quiet else None,
                                    log=lambda line: print(f"carousel: {line}", file=sys.stderr),
                                    stop=lambda: bool(stopping))
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            lock.release()
    except ImportSourceError as exc:
        print(f"carousel: cannot import: {exc}", file=sys.stderr)
        return 2
    except StoreLockedError as exc:
        print(f"carousel: cannot import: another process writes the memory's tiers (a daemon started from "
              f"another profile, or a trainer): {_first_line(exc)}", file=sys.stderr)
        return 1
    except (StoreError, OSError, TimeoutError) as exc:
        print(f"carousel: import failed: {_first_line(exc)} (rerun the same command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("carousel: import interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print("\n".join(describe(result)))
    print(f"check again: carousel import {args.src} --profile {args.profile}"
          + (f" --memory {args.memory}" if args.memory else "") + " --verify")
    return 0


def _tune_parser(sub) -> None:
    from storage_backends.url import parse_size

    def size(text: str) -> int:
        try:
            return parse_size(text, "size")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    tune = sub.add_parser("tune", help="measure tier paths and this machine, write a profile that fits them; "
                          "--check a running daemon against it")
    tune.add_argument("--tier", action="append", default=[], metavar="[KIND:]PATH",
                      help="a candidate tier folder (repeat; KIND lmdb, zarr, flat, ...; default lmdb)")
    tune.add_argument("--profile", help="a base profile: its [daemon], [memory] shape and settings are kept")
    tune.add_argument("--memory", help="the memory of a base profile with several (--profile), or to --check")
    tune.add_argument("--sample-shape", help="x's shape, e.g. 3,32,32 (without a base profile)")
    tune.add_argument("--dtype", help="x's dtype (default uint8)")
    tune.add_argument("--step-ms", type=float, help="the trainer's step time, ms")
    tune.add_argument("--from-metrics", metavar="HOST:PORT",
                      help="read the step time from a running daemon's /metrics instead (a trainer must be running)")
    tune.add_argument("--batch", type=int, default=32, help="replay rows per step (default 32)")
    tune.add_argument("--stream-batch", type=int, help="samples added per step (default: --batch)")
    tune.add_argument("--em-size", type=int, help="wanted EM size (default: the base profile's, else what the RAM "
                      "budget gives)")
    tune.add_argument("--ratio", type=float, help="wanted swap ratio (default: the base profile's, else 0.5)")
    tune.add_argument("--ram-budget", type=size, help="RAM for the daemon, e.g. 1GiB (default: a quarter of "
                      "MemAvailable)")
    tune.add_argument("--margin", type=float, default=2.0, help="plan every rate at this multiple of the demand")
    tune.add_argument("--disk-share", type=float, default=0.5, help="share of each path's free space for its tier")
    tune.add_argument("--records", type=int, default=3072, help="records the probe writes per path")
    tune.add_argument("--no-sync", action="store_true", help="tiers without fsync per write (sync = false)")
    tune.add_argument("--out", default="carousel-tuned.toml", help="the profile to write (and NAME.plan.json)")
    tune.add_argument("--check", metavar="PROFILE", help="compare the daemon serving PROFILE (tuned) with its plan")
    tune.add_argument("--metrics", metavar="HOST:PORT", help="--check: the daemon's /metrics (default: the profile's)")
    tune.add_argument("--window", type=float, default=10.0, help="seconds between the two metric readings")



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
    serve.add_argument("--parent-fd", type=int, metavar="FD",
                       help="stop cleanly when this inherited pipe closes (set by carousel.spawn)")
    check = sub.add_parser("check-config", help="validate a profile, check it fits this machine, and exit (2 on error)")
    check.add_argument("config")
    check.add_argument("--no-machine-checks", dest="machine", action="store_false",
                       help="validate the profile only: skip the RAM and path checks against this machine "
                       "(a profile written for another device)")
    status = sub.add_parser("status", help="show a running daemon's memories")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the daemon's socket, or tcp://HOST:PORT (default: $CAROUSEL_SOCKET, else "
                       "$XDG_RUNTIME_DIR/carousel/carousel.sock)")
    where.add_argument("--config", help="the profile the daemon was started with: its daemon.socket_dir")
    status.add_argument("--memory", default="default")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between the two readings for rates")
    status.add_argument("--json", action="store_true")
    _import_parser(sub)
    _tune_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "tune":
        from .tune.command import run_check, run_tune

        return run_check(args) if args.check else run_tune(args)
    if args.command == "import":
        return _import(args)
    if args.command == "serve":
        return _serve(args.config, args.log_level, args.parent_fd)
    if args.command == "check-config":
        return _check_config(args.config, args.machine)
    if args.command == "status":
        return _status(args.socket, args.config, args.memory, args.interval, args.json)
    from storage_backends import StoreError

    try:
        return {"info": _info, "verify": _verify}[args.action](args.url)
    except StoreError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
