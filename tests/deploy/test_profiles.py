"""The profiles in deploy/configs: valid, within their device's budget, and really served.

Three device profiles for a systemd service (/var/lib/carousel, /run/carousel) and ``user.toml``,
which runs as an ordinary user with every path relative to its own folder. Each states its
device's budget in ``# budget.NAME = VALUE`` comment lines (RAM, cores, flash, disk, /dev/shm, the
expected load). These tests hold the settings to that budget, using bookkeeping costs and on-disk
record sizes measured here rather than taken on trust; then they serve every profile for real:
a device profile's /var/lib/carousel and /run/carousel paths moved into a temp dir (the user
profile just copied there), ``carousel serve --config`` started, samples added and sampled
through ``carousel.connect``, SIGTERM, exit 0, and the samples found on disk where the profile put them.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
import tomllib
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import carousel
from carousel.catalog import Catalog
from carousel.daemon.profile import load_profile
from carousel.daemon.shm import shm_free_bytes
from carousel.daemon.shm_ring import RingLayout
from storage_backends import Schema, open_store

from tests.daemon.harness import free_port, rss_bytes

from .profiles import CAROUSEL, budget, dump_toml, kill, move_paths, start_serve, stop, strings, wait_for_socket

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "deploy" / "configs"
PROFILES = sorted(CONFIGS.glob("*.toml"))
EXPECTED = {"edge-board", "phone", "workstation", "user"}
USER = CONFIGS / "user.toml"  # an ordinary user, in the profile's folder; the others are systemd services
SYSTEM = [p for p in PROFILES if p != USER]
STATE_ROOT, RUNTIME_ROOT = "/var/lib/carousel", "/run/carousel"  # systemd StateDirectory / RuntimeDirectory
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
SPEED = {"lmdb": 0, "zarr": 1}  # flash before disk: tiers are listed fastest first
BUDGET_KEYS = {"ram", "carousel_ram", "base_rss", "cores", "shm", "flash", "disk", "stream_samples", "batch",
               "add_batch", "clients"}
# RAM per sample the profiles' comments budget for bookkeeping (peaks, while arrays double);
# test_bookkeeping_costs_are_what_the_profiles_budget measures them.
CATALOG_BYTES = 128   # per sample ever added: the catalog's columns, sized by the highest id
MANIFEST_BYTES = 64   # per row of a Zarr or flat tier: its manifest (43 B measured at peak)
STATE_BYTES = 29      # per sample ever added, in the EM checkpoint: label, task, correct, entropy, loss, replays

pytestmark = pytest.mark.timeout(120)


def test_the_profiles_are_there():
    assert {p.stem for p in PROFILES} == EXPECTED
    assert (CONFIGS / "README.md").is_file()


def _fields(cfg) -> dict:
    mc = cfg.memory
    return {"x": (tuple(mc.sample_shape), mc.dtype), "y": ((), "int64"), "task": ((), "int16"),
            **{name: (tuple(shape), dtype) for name, (shape, dtype) in mc.extras.items()}}


def _load(path: Path):
    profile = load_profile(path)
    assert list(profile.memories) == ["default"], "a device profile serves one memory"
    cfg = profile.memories["default"]
    return profile, cfg, Schema(_fields(cfg)).record_nbytes


# ---- valid ---------------------------------------------------------------------------------------------
def placed(path: Path, folder: Path) -> Path:
    """A copy of the profile in ``folder``, runnable by an ordinary user on this machine: a device
    profile's /var/lib/carousel and /run/carousel paths moved below ``folder`` (check-config checks
    that they can be created), the user profile as it is (its relative paths land in ``folder``)."""
    data = tomllib.loads(path.read_text())
    if path != USER:
        data = move_paths(data, {STATE_ROOT: str(folder / "var-lib-carousel"), RUNTIME_ROOT: str(folder / "run")})
        moved = [s for s in strings(data) if s.startswith("/")]
        assert moved and all(s.startswith(str(folder)) for s in moved), f"a path the test does not move: {moved}"
        text = dump_toml(data)
    else:
        text = path.read_text()
    out = folder / path.name
    out.write_text(text)
    return out


@pytest.fixture(scope="module")
def checked() -> dict[str, tuple[Path, subprocess.CompletedProcess, list[str]]]:
    """``carousel check-config`` on every profile placed in a short temp folder of its own, as
    real processes run side by side: the copy, what the run printed, and what the folder held after."""
    roots = {p.stem: Path(tempfile.mkdtemp(prefix="cz-")) for p in PROFILES}
    try:
        copies = {p.stem: placed(p, roots[p.stem]) for p in PROFILES}
        procs = {name: subprocess.Popen([*CAROUSEL, "check-config", str(copy)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for name, copy in copies.items()}
        out = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=60)
            out[name] = (copies[name], subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                         sorted(q.name for q in roots[name].iterdir()))
        yield out
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_check_config_accepts_the_profile(path, checked):
    copy, done, left = checked[path.stem]
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"{copy}: ok")
    assert left == [path.name], "check-config created something"
    profile, cfg, _ = _load(copy)
    assert f"kind {cfg.memory.kind};" in done.stdout
    assert f"socket {profile.socket_path()};" in done.stdout
    assert "RAM: ~" in done.stdout and f"(memory.em_size: {cfg.memory.em_size:,} x " in done.stdout
    for tier in cfg.tiers:
        capacity = (f"{tier.capacity_bytes:,} bytes" if tier.capacity_bytes is not None
                    else f"{tier.capacity_samples:,} samples")
        assert f"{tier.kind} {tier.path} ({capacity})" in done.stdout


@pytest.mark.parametrize("path", SYSTEM, ids=lambda p: p.stem)
def test_profile_is_laid_out_for_a_systemd_service(path):
    profile, cfg, _ = _load(path)
    dc = profile.daemon
    assert dc.data_dir == STATE_ROOT
    assert dc.socket_dir == RUNTIME_ROOT
    for p in [cfg.memory.state_dir, *(t.path for t in cfg.tiers)]:
        assert p is not None and p.startswith(STATE_ROOT + "/"), p
    assert cfg.memory.sample_shape == (3, 32, 32) and cfg.memory.dtype == "uint8"
    assert dc.metrics_address is not None and dc.metrics_address[0] in LOOPBACK, dc.metrics
    assert dc.tcp_address is None, "device profiles serve the Unix socket only"
    assert cfg.tiers, "every device profile has storage tiers"
    kinds = [SPEED[t.kind] for t in cfg.tiers]
    assert kinds == sorted(kinds), f"tiers not fastest first: {[t.kind for t in cfg.tiers]}"
    assert set(budget(path)) == BUDGET_KEYS, f"{path.name}: budget lines {sorted(budget(path))}"


def test_user_profile_stays_in_its_folder(tmp_path):
    """No root, no systemd: every path relative, so all of it lands in carousel-data beside the profile."""
    data = tomllib.loads(USER.read_text())
    paths = [data["daemon"]["data_dir"], data["daemon"]["socket_dir"], data["memory"]["state_dir"],
             *(t["path"] for t in data["tiers"])]
    assert all(not p.startswith(("/", "~")) for p in paths), paths
    assert not [s for s in strings(data) if s.startswith("/")], "an absolute path in the user profile"
    profile, cfg, _ = _load(placed(USER, tmp_path))
    home = tmp_path / "carousel-data"
    for p in [profile.daemon.data_dir, profile.daemon.socket_dir, cfg.memory.state_dir, *(t.path for t in cfg.tiers)]:
        assert Path(p) == home or home in Path(p).parents, p
    assert profile.socket_path() == str(home / "run" / "carousel.sock")
    dc = profile.daemon
    assert dc.metrics_address is not None and dc.metrics_address[0] in LOOPBACK
    assert dc.tcp_address is None
    assert cfg.tiers and cfg.memory.sample_shape == (3, 32, 32)
    assert set(budget(USER)) == BUDGET_KEYS


# ---- within budget -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored_bytes(tmp_path_factory) -> dict[tuple, float]:
    """Bytes on disk per CIFAR record for each tier layout the profiles use, measured on 2,048 records."""
    fields = {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
    rng = np.random.default_rng(0)
    n = 2048
    data = {"x": rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), "y": rng.integers(0, 10, n),
            "task": np.zeros(n, np.int16)}
    out = {}
    layouts = {(t.kind, t.chunk, t.codec) for p in PROFILES for t in _load(p)[1].tiers}
    for i, (kind, chunk, codec) in enumerate(sorted(layouts)):
        path = tmp_path_factory.mktemp("bytes") / f"{kind}{i}"
        url = f"lmdb://{path}?sync=0" if kind == "lmdb" else f"zarr://{path}?chunk={chunk}&codec={codec}&sync=0"
        with open_store(url, fields) as store:
            for lo in range(0, n, 256):
                store.put_many(np.arange(lo, lo + 256), {k: v[lo:lo + 256] for k, v in data.items()})
            store.flush()
            out[(kind, chunk, codec)] = store.nbytes / n  # random pixels: zstd gains nothing, the worst case
    return out


def test_bookkeeping_costs_are_what_the_profiles_budget(tmp_path):
    """The per-sample RAM the budgets assume, measured at its peak (while arrays double)."""
    n = 1 << 17
    labels = np.arange(n) % 100
    tracemalloc.start()
    try:
        catalog = Catalog()
        for lo in range(0, n, 512):
            catalog.register(np.arange(lo, lo + 512), labels[lo:lo + 512], np.zeros(512, np.int64), 0)
        for c in range(100):
            catalog.class_ids(c)
        catalog_peak = tracemalloc.get_traced_memory()[1] / n
        del catalog
        tracemalloc.reset_peak()
        fields = {"x": ((1,), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
        with open_store(f"zarr://{tmp_path}/z?chunk=4096&sync=0", fields) as store:
            base = tracemalloc.get_traced_memory()[0]
            k = 1024  # the largest write_behind.batch of the profiles: what one write holds at once
            for lo in range(0, n, k):
                store.put_many(np.arange(lo, lo + k), {"x": np.zeros((k, 1), np.uint8), "y": np.zeros(k, np.int64),
                                                       "task": np.zeros(k, np.int16)})
            manifest_peak = (tracemalloc.get_traced_memory()[1] - base) / n
    finally:
        tracemalloc.stop()
    assert catalog_peak <= CATALOG_BYTES, f"catalog peaks at {catalog_peak:.0f} B a sample"
    assert manifest_peak <= MANIFEST_BYTES, f"zarr manifest peaks at {manifest_peak:.0f} B a row"


def test_prefetch_depth_is_a_total_as_the_budgets_assume(tmp_path):
    """The budgets count prefetch_depth x record bytes of RAM: a total over all classes. (config.py's
    comment on SwapConfig.prefetch_depth says "per class", which would be 10-100x more here.)"""
    depth, classes = 40, 10
    mem = carousel.CarouselMemory.from_dict({
        "memory": {"em_size": 20, "sample_shape": [4]}, "swap": {"prefetch_depth": depth, "workers": 1},
        "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 100000, "sync": False}]})
    try:
        n = 2000
        mem.add(np.zeros((n, 4), np.uint8), np.arange(n) % classes, task=0)
        mem.flush()
        deadline = time.monotonic() + 30
        while mem.stats()["prefetched"] < depth and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the prefetcher wakes every 50 ms: give it a few more rounds to overshoot
        assert mem.stats()["prefetched"] == depth, "candidates held in RAM, all classes together"
    finally:
        mem.close()


def _ram_plan(path: Path) -> dict[str, float]:
    """What the daemon of a profile holds in RAM at full load, by part (bytes)."""
    profile, cfg, rec = _load(path)
    b = budget(path)
    capacities = [t.capacity_for(rec) for t in cfg.tiers]
    ring = RingLayout.plan(b["batch"], profile.daemon.ring_slots, _fields(cfg)).size
    return {
        "base": b["base_rss"],
        "em": cfg.memory.em_size * rec,
        "write_behind": cfg.write_behind.queue_samples * rec,
        "prefetch": cfg.swap.prefetch_depth * rec,
        "catalog": max(b["stream_samples"], sum(capacities)) * CATALOG_BYTES,
        "zarr_manifests": sum(c for t, c in zip(cfg.tiers, capacities) if t.kind == "zarr") * MANIFEST_BYTES,
        # Rings and upload segments live in /dev/shm: RAM the daemon owns.
        "shm": b["clients"] * (ring + b["add_batch"] * rec),
    }


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_fits_its_ram_budget(path):
    b = budget(path)
    plan = _ram_plan(path)
    need = sum(plan.values())
    detail = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in plan.items())
    assert need <= b["carousel_ram"] <= b["ram"], \
        f"{path.name}: needs {need / 2**20:.0f} MiB of {b['carousel_ram'] / 2**20:.0f} MiB ({detail})"


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_fits_its_flash_and_disk(path, stored_bytes):
    _, cfg, rec = _load(path)
    b = budget(path)
    per = {"lmdb": 0.0, "zarr": 0.0}
    for i, t in enumerate(cfg.tiers):
        rows = t.capacity_for(rec)
        if i == len(cfg.tiers) - 1:
            rows += cfg.memory.em_size  # the last tier may run over by the samples the EM holds
        per[t.kind] += rows * stored_bytes[(t.kind, t.chunk, t.codec)]
    state = b["stream_samples"] * STATE_BYTES  # the EM checkpoint, beside the flash tier
    assert per["lmdb"] + state <= b["flash"], f"{path.name}: {(per['lmdb'] + state) / 2**30:.1f} GiB of flash"
    assert per["zarr"] <= b["disk"], f"{path.name}: {per['zarr'] / 2**30:.1f} GiB of disk"


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_fits_its_cores_shm_and_load(path):
    profile, cfg, rec = _load(path)
    dc, sc, b = profile.daemon, cfg.swap, budget(path)
    assert 1 <= sc.workers <= b["cores"] // 2, "swap threads: at most half the cores, the trainer needs the rest"
    per_step = math.ceil(sc.ratio * b["batch"])
    assert sc.prefetch_depth >= sc.max_lag_steps * per_step, \
        f"prefetch_depth {sc.prefetch_depth} does not cover {sc.max_lag_steps} lagging steps of {per_step} swaps"
    ring = RingLayout.plan(b["batch"], dc.ring_slots, _fields(cfg)).size
    working_set = b["clients"] * (ring + b["add_batch"] * rec)
    assert working_set <= dc.min_free_shm_bytes <= b["shm"], \
        f"/dev/shm: expected load {working_set} B, checked at start {dc.min_free_shm_bytes} B, device {b['shm']} B"
    assert b["add_batch"] * rec <= dc.max_frame_bytes, "an add() of add_batch rows must fit one upload segment"
    assert ring <= max(4 * dc.max_frame_bytes, 1 << 26), "the daemon refuses rings this large (daemon/handlers.py)"
    assert dc.max_clients >= b["clients"]
    assert cfg.write_behind.queue_samples >= b["add_batch"], "one add() must fit the write-behind queue"


# ---- what each device is for ---------------------------------------------------------------------------
def _by_name():
    return {p.stem: _load(p)[1] for p in PROFILES}


def test_edge_board_spares_its_flash_and_keeps_demoted_samples():
    cfg = _by_name()["edge-board"]
    lmdb = [t for t in cfg.tiers if t.kind == "lmdb"]
    zarr = [t for t in cfg.tiers if t.kind == "zarr"]
    assert len(lmdb) == 1 and not lmdb[0].sync, "nosync LMDB on eMMC (flushed every second by the store)"
    assert zarr and all(t.sync for t in zarr), "samples demoted off the flash must be durable where they land"
    assert 1000 <= cfg.memory.em_size <= 10000, "a few thousand CIFAR samples"
    assert cfg.swap.adaptive


def test_phone_is_small_and_adaptive():
    cfg = _by_name()["phone"]
    assert [t.kind for t in cfg.tiers] == ["lmdb"]
    assert cfg.tiers[0].capacity_bytes is not None, "a byte budget of the user's flash"
    assert cfg.swap.workers == 1 and cfg.swap.adaptive


def test_workstation_is_the_largest_and_durable():
    cfgs = _by_name()
    ws = cfgs["workstation"]
    assert len(ws.tiers) >= 2 and [t.kind for t in ws.tiers][:2] == ["lmdb", "zarr"]
    assert all(t.sync for t in ws.tiers)
    assert all(t.codec == "zstd" for t in ws.tiers if t.kind == "zarr")
    assert not ws.swap.adaptive, "a fixed swap ratio keeps experiments reproducible"
    order = ["phone", "edge-board", "workstation"]
    for key in (lambda c: c.memory.em_size, lambda c: c.swap.workers, lambda c: c.swap.prefetch_depth,
                lambda c: c.write_behind.queue_samples):
        values = [key(cfgs[name]) for name in order]
        assert values == sorted(values) and values[0] < values[-1], values


# ---- served --------------------------------------------------------------------------------------------
@pytest.fixture
def short_dir():
    """A short folder for the socket: a Unix socket path must stay under ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_serves(path, tmp_path, short_dir):
    original = tomllib.loads(path.read_text())
    if path == USER:  # relative paths: a copy in tmp_path keeps everything in tmp_path/carousel-data
        state, runtime = tmp_path / "carousel-data", tmp_path / "carousel-data" / "run"
        data = original
    else:
        state, runtime = tmp_path / "var-lib-carousel", short_dir / "run-carousel"
        data = move_paths(original, {STATE_ROOT: str(state), RUNTIME_ROOT: str(runtime)})
        moved = [s for s in strings(data) if s.startswith("/")]
        assert moved and all(s.startswith((str(tmp_path), str(short_dir))) for s in moved), \
            f"a path the test does not move: {moved}"
    host = data["daemon"]["metrics"].rpartition(":")[0]
    port = free_port()
    data["daemon"]["metrics"] = f"{host}:{port}"  # the profile's loopback host, a port free here
    # The profile refuses to start without its /dev/shm working set; a CI container may have less.
    free_shm = shm_free_bytes()
    if load_profile(path).daemon.min_free_shm_bytes > free_shm:
        data["daemon"]["min_free_shm_bytes"] = free_shm // 2
    text = dump_toml(data)
    assert tomllib.loads(text) == data, "the TOML writer must round-trip"
    profile_path = tmp_path / path.name
    profile_path.write_text(text)
    profile, cfg, rec = _load(profile_path)
    b = budget(path)

    log_path = tmp_path / "daemon.log"
    sock = str(runtime / "carousel.sock")
    proc = start_serve(profile_path, log_path)
    try:
        wait_for_socket(proc, sock, log_path)
        # Serving, EM allocated, no sample yet: within what the budget assumes the daemon starts at.
        start_rss = rss_bytes(proc.pid)
        print(f"{path.stem}: daemon RSS at start {start_rss / 2**20:.0f} MiB")
        assert start_rss <= b["base_rss"] + cfg.memory.em_size * rec, \
            f"daemon started at {start_rss / 2**20:.0f} MiB RSS, budget.base_rss is {b['base_rss'] / 2**20:.0f} MiB"
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            assert b"carousel_" in resp.read()
        if path == USER:  # the README's way to reach it: the profile itself
            status = subprocess.run([*CAROUSEL, "status", "--config", str(profile_path), "--json",
                                     "--interval", "0.05"], capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["pid"] == proc.pid

        n, classes = 400, 10
        x_of = (np.arange(n) * 7 % 256).astype(np.uint8)  # sample i's pixels are all x_of[i]
        y_of = np.arange(n) % classes
        client = carousel.connect(sock, reconnect_s=0)
        with client:
            ids = []
            for lo, task in ((0, 0), (n // 2, 1)):  # two tasks: swapping begins at start_task = 1
                sel = np.arange(lo, lo + n // 2)
                x = np.broadcast_to(x_of[sel, None, None, None], (sel.size, 3, 32, 32)).copy()
                ids.append(client.add(x, y_of[sel], task=task).numpy())
            ids = np.concatenate(ids)
            assert ids.tolist() == sorted(set(ids.tolist())) and ids.size == n
            index = {int(i): k for k, i in enumerate(ids)}
            for _ in range(3):
                batch = client.sample(min(b["batch"], 64))
                assert 0 < batch.ids.numel() <= min(b["batch"], 64)
                assert tuple(batch.x.shape[1:]) == (3, 32, 32) and str(batch.x.dtype) == "torch.uint8"
                for i, x, y in zip(batch.ids.tolist(), batch.x.numpy(), batch.y.tolist()):
                    k = index[i]
                    assert (x == x_of[k]).all() and y == y_of[k], f"sample {i} came back wrong"
                client.observe(batch.ids, logits=np.random.default_rng(0).standard_normal(
                    (batch.ids.numel(), classes)).astype(np.float32))
            client.flush()
            stats = client.stats()
        assert stats["added"] == n
        assert stats["errors"] == {"write_behind": None, "swap": None}, stats["errors"]
        first = f"0-{cfg.tiers[0].kind}"
        assert stats["tiers"][first]["capacity"] == cfg.tiers[0].capacity_for(rec)
        assert stats["tiers"][first]["samples"] == n
        assert stop(proc) == 0, log_path.read_text(errors="replace")
    finally:
        kill(proc)

    # The samples are where the moved profile put them, every tier was opened where it says, the
    # EM checkpoint and the daemon's lock file are in their folders.
    tier = cfg.tiers[0]
    with open_store(f"{tier.kind}://{tier.path}?mode=ro") as store:
        assert len(store) == n
    assert all(Path(t.path).is_dir() for t in cfg.tiers)
    assert (Path(cfg.memory.state_dir) / "em-state.npz").is_file()
    assert (Path(profile.daemon.data_dir) / "daemon.lock").is_file()
    assert Path(profile.daemon.data_dir) == state
