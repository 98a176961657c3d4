"""``carousel tune``: the plan's rules, a profile measured on this machine that check-config accepts
and serve runs, and ``--check`` naming the tier a throttled device makes lag."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import carousel
from carousel.config import CarouselConfig
from carousel.toml_write import dump_toml
from carousel.tune.check import check
from carousel.tune.measure import HostMeasurement, TierMeasurement
from carousel.tune.plan import TuneRequest, make_plan
from tests.carousel.slow_tier import drop_caches, slow_tier_or_skip
from tests.daemon.harness import DaemonProc, free_port

GiB = 1 << 30
HOST = HostMeasurement(mem_available_bytes=8 * GiB, shm_free_bytes=4 * GiB, cores=4)


def measured(path: str, read_us: float, *, fs: str = "ext4", free: int = 100 * GiB, p99_factor: float = 2.0,
             write_us: dict | None = None, fsync_ms: float = 1.0, scale: dict | None = None) -> TierMeasurement:
    """A tier measurement with reads of ``read_us`` per sample from one reader (``scale``: how the
    rate grows with readers)."""
    scale = scale or {1: 1.0, 2: 1.8, 4: 3.0}
    rate = {t: 1e6 / read_us * f for t, f in scale.items()}
    p50 = {t: 16 * t / rate[t] for t in scale}
    return TierMeasurement(path=path, kind="lmdb", fs=fs, free_bytes=free, sync=True, cache="dropped", records=3072,
                           disk_bytes_per_record=4096.0, write_s_per_sample={b: v * 1e-6 for b, v in
                                                                               (write_us or {16: 40, 64: 12, 256: 8}).items()},
                           fsync_p50_s=fsync_ms * 1e-3, fsync_p99_s=2 * fsync_ms * 1e-3, read_batch=16, read_p50_s=p50,
                           read_p99_s={t: v * p99_factor for t, v in p50.items()}, read_samples_per_s=rate)


def request(**kw) -> TuneRequest:
    return TuneRequest(**{"record_nbytes": 3082, "step_s": 0.010, **kw})


# ---- the plan's rules (pure: measurements in, settings out) -----------------------------------------
def test_tiers_fastest_first_and_sized_from_free_space():
    plan = make_plan(request(), HOST, [measured("/hdd", 500, free=400 * GiB), measured("/nvme", 20, free=40 * GiB)])
    assert [t["path"] for t in plan.tiers] == ["/nvme", "/hdd"]
    # half the free space, in record bytes at 4,096 B on disk per 3,082 B record
    assert plan.tiers[0]["capacity"] == f"{int(20 * GiB * 3082 / 4096) >> 20}MiB"
    assert plan.expect["tiers"] == {"0-lmdb": "/nvme", "1-lmdb": "/hdd"}


def test_a_fast_slowest_tier_keeps_the_wanted_ratio_with_one_worker():
    plan = make_plan(request(), HOST, [measured("/a", 10), measured("/b", 50)])
    # demand 0.5 x 32 / 10 ms = 1,600/s; one reader of 50 us/sample gives 20,000/s
    assert plan.swap["ratio"] == 0.5 and plan.swap["workers"] == 1 and plan.swap["adaptive"] is False


def test_a_slow_tier_gets_more_readers_then_a_lower_ratio():
    # 400 us/sample: 2,500/s from one reader, 4,500/s from two: two cover 2 x 1,600/s
    plan = make_plan(request(), HOST, [measured("/a", 10), measured("/sd", 400)])
    assert plan.swap["workers"] == 2 and plan.swap["ratio"] == 0.5
    # 2,000 us/sample: 900/s at best (2 readers on 4 cores); ratio = 900 x 0.01 / (32 x 2) = 0.14 -> 0.10
    plan = make_plan(request(), HOST, [measured("/a", 10), measured("/sd", 2000)])
    assert plan.swap["workers"] == 2 and plan.swap["ratio"] == 0.10 and plan.swap["adaptive"] is True
    assert "lowered from 0.5" in next(c.why for c in plan.choices if c.key == "swap.ratio")
    # a tier too slow for any swapping says so
    plan = make_plan(request(), HOST, [measured("/a", 10), measured("/tape", 200_000)])
    assert plan.swap["ratio"] == 0 and any("swapping is off" in w for w in plan.warnings)


def test_prefetch_covers_a_read_stall_and_stalls_make_it_adaptive():
    steady = make_plan(request(), HOST, [measured("/a", 10), measured("/b", 50)])
    assert steady.swap["prefetch_depth"] == 16 * 4 * 2  # 16 swaps x 4 lag steps x margin 2
    stalling = make_plan(request(), HOST, [measured("/a", 10), measured("/b", 50, p99_factor=400)])
    p99 = 16 / 20_000 * 400  # 0.32 s: 32 steps of 10 ms
    assert stalling.swap["prefetch_depth"] == int(np.ceil(16 * p99 / 0.010 * 2 / 32) * 32)
    assert stalling.swap["adaptive"] is True


def test_write_behind_batch_amortises_the_commit_and_must_keep_up():
    plan = make_plan(request(), HOST, [measured("/a", 10, write_us={16: 40, 64: 12, 256: 11})])
    assert plan.write_behind["batch"] == 64  # within 25 % of the best, and 3,200/s x 2 fits 1 / 12 us
    assert plan.write_behind["queue_samples"] >= 1024
    slow = make_plan(request(), HOST, [measured("/a", 10, write_us={16: 900, 64: 600, 256: 400})])
    assert slow.write_behind["batch"] == 256 and any("add() will block" in w for w in slow.warnings)


def test_a_files_tier_reads_at_its_fastest_inflight():
    nfs = measured("/mnt/nfs", 300)
    nfs.kind, nfs.inflight_samples_per_s = "files", {1: 3_000.0, 8: 19_000.0, 32: 17_000.0}
    plan = make_plan(request(), HOST, [measured("/a", 10), nfs])
    assert plan.tiers[1]["inflight"] == 8 and "inflight" not in plan.tiers[0]
    assert "8: 19,000/s" in next(c.why for c in plan.choices if c.key == "tiers[1].inflight")
    assert TierMeasurement.from_json(json.loads(json.dumps(nfs.to_json()))) == nfs  # as the plan file keeps it


def test_em_fits_the_ram_budget_and_tmpfs_is_ram():
    plan = make_plan(request(em_size=10_000_000, ram_budget_bytes=1 * GiB), HOST, [measured("/a", 10)])
    assert plan.memory["em_size"] == int(0.6 * (GiB - (320 << 20)) // 3082)
    assert "lowered from 10,000,000" in next(c.why for c in plan.choices if c.key == "memory.em_size")
    plan = make_plan(request(ram_budget_bytes=1 * GiB), HOST, [measured("/dev/shm/t", 1, fs="tmpfs", free=4 * GiB)])
    assert plan.tiers[0]["capacity"] == f"{int((GiB - (320 << 20)) // 4 * 3082 / 4096) >> 20}MiB"
    assert any("RAM, emptied at every reboot" in w for w in plan.warnings)
    with pytest.raises(ValueError, match="too little"):
        make_plan(request(ram_budget_bytes=300 << 20), HOST, [measured("/a", 10)])
    with pytest.raises(ValueError, match="step time"):
        request(step_s=0)


def test_check_names_the_tier_whose_reads_cost_more_than_planned():
    plan = make_plan(request(), HOST, [measured("/a", 10), measured("/b", 50)]).to_json()

    def scrape(read_s: dict, read_n: dict, hits: float, misses: float) -> dict:
        out = {}
        for tier in ("0-lmdb", "1-lmdb"):
            out[("carousel_storage_read_seconds_total", frozenset({("tier", tier)}))] = read_s[tier]
            out[("carousel_storage_read_samples_total", frozenset({("tier", tier)}))] = read_n[tier]
        out[("carousel_prefetch_requests_total", frozenset({("result", "hit")}))] = hits
        out[("carousel_prefetch_requests_total", frozenset({("result", "miss")}))] = misses
        return out

    zero = scrape({"0-lmdb": 0, "1-lmdb": 0}, {"0-lmdb": 0, "1-lmdb": 0}, 0, 0)
    fine = check(plan, zero, scrape({"0-lmdb": 0.01, "1-lmdb": 0.05}, {"0-lmdb": 1000, "1-lmdb": 1000}, 100, 2), 5)
    assert fine.ok and not fine.lagging_tiers
    slow = check(plan, zero, scrape({"0-lmdb": 0.01, "1-lmdb": 5.0}, {"0-lmdb": 1000, "1-lmdb": 1000}, 50, 50), 5)
    assert not slow.ok and slow.lagging_tiers == ["1-lmdb"]
    text = "\n".join(slow.lines())
    # 5 ms a sample is 200/s from one reader, for 0.5 x 32 swaps every 10 ms = 1,600/s, x 2 margin
    assert "tier 1-lmdb (/b) reads at 5,000 us/sample (100.0x what tune measured there): 200 samples/s for a " \
           "swap rate of 1,600/s" in text
    assert "swap.ratio = 0.00" in text and "prefetch_depth to 256" in text  # the 50 % hit rate is flagged too
    # Ten times slower than measured but still 3x the demand: shown, not a lag.
    slower = check(plan, zero, scrape({"0-lmdb": 0.1, "1-lmdb": 0.05}, {"0-lmdb": 1000, "1-lmdb": 1000}, 100, 2), 5)
    assert slower.ok and "(10.0x)" in "\n".join(slower.lines())


# ---- on this machine's tiers ------------------------------------------------------------------------
def _base_profile(tmp_path: Path, shape=(3, 16, 16), em: int = 64) -> tuple[Path, int]:
    port = free_port()
    base = tmp_path / "base.toml"
    base.write_text(dump_toml({
        "daemon": {"socket_dir": str(tmp_path / "sock"), "data_dir": str(tmp_path / "data"),
                   "metrics": f"127.0.0.1:{port}"},
        "memory": {"em_size": em, "sample_shape": list(shape), "state_dir": str(tmp_path / "state")},
        "swap": {"ratio": 0.5}}))
    return base, port


def _tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carousel", "tune", *args], capture_output=True, text=True,
                          timeout=300)


def _serve(profile: Path, tmp_path: Path, port: int, wrap=lambda argv: argv) -> DaemonProc:
    log_path = tmp_path / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(wrap([sys.executable, "-m", "carousel", "serve", "--config", str(profile)]),
                                stdout=log, stderr=subprocess.STDOUT)
    d = DaemonProc(proc, str(tmp_path / "sock" / "carousel.sock"), port, log_path, profile)
    deadline = time.monotonic() + 60
    while b'"msg": "serving"' not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            d.kill()
            raise RuntimeError(f"daemon did not start:\n{d.log()}")
        time.sleep(0.05)
    return d


@pytest.fixture
def shm_dir():
    path = Path("/dev/shm") / f"carousel-tune-test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_tune_on_this_machine_writes_a_profile_check_config_accepts_and_serve_runs(tmp_path, shm_dir):
    base, port = _base_profile(tmp_path)
    out = tmp_path / "tuned.toml"
    r = _tune("--profile", str(base), "--tier", str(tmp_path / "disk"), "--tier", str(shm_dir),
              "--tier", f"files:{tmp_path / 'files'}", "--step-ms", "5", "--records", "1024", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "cache: tmpfs: RAM" in r.stdout and "cache: dropped" in r.stdout and "swap.prefetch_depth" in r.stdout
    data = tomllib.loads(out.read_text())
    assert [t["path"] for t in data["tiers"]][0] == str(shm_dir)  # RAM first
    files = next(t for t in data["tiers"] if t["kind"] == "files")
    assert files["inflight"] in (1, 8, 32) and "cold reads from one reader by file reads in flight: 1: " in r.stdout
    assert data["daemon"]["metrics"] == f"127.0.0.1:{port}" and data["memory"]["em_size"] == 64
    plan = json.loads((tmp_path / "tuned.plan.json").read_text())
    assert plan["expect"]["tiers"]["0-lmdb"] == str(shm_dir) and len(plan["expect"]["tiers"]) == 3
    for folder in (shm_dir, tmp_path / "disk", tmp_path / "files"):
        assert list(folder.iterdir()) == []  # the probes cleaned up
    check = subprocess.run([sys.executable, "-m", "carousel", "check-config", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with _serve(out, tmp_path, port) as d, carousel.connect(d.socket) as c:
        ids = c.add(torch.zeros(40, 3, 16, 16, dtype=torch.uint8), torch.arange(40) % 4, task=0)
        c.flush()
        assert len(c.sample(8, seed=0)) == 8 and ids.numel() == 40
        # The step time read off the daemon beside a running trainer (one observe() a step, ~20 ms).
        stop = threading.Event()

        def trainer() -> None:
            while not stop.is_set():
                b = c.sample(8)
                c.observe(b.ids, loss=torch.rand(len(b)))
                time.sleep(0.02)

        th = threading.Thread(target=trainer)
        th.start()
        try:
            r = _tune("--profile", str(base), "--tier", str(tmp_path / "disk"), "--from-metrics", f"127.0.0.1:{port}",
                      "--window", "2", "--records", "256", "--out", str(tmp_path / "again.toml"))
        finally:
            stop.set()
            th.join(30)
        assert r.returncode == 0, r.stderr
        step_ms = float(r.stdout.split("trainer step: ")[1].split(" ms")[0])
        assert 20 <= step_ms < 200, r.stdout  # 20 ms of sleep plus the calls, on a loaded machine
        planned = json.loads((tmp_path / "again.plan.json").read_text())
        assert planned["request"]["step_s"] == pytest.approx(step_ms / 1e3, rel=0.01)  # the plan used it


def test_tune_refuses_bad_input_clearly(tmp_path):
    r = _tune("--tier", str(tmp_path / "t"), "--step-ms", "5")
    assert r.returncode == 2 and "--sample-shape" in r.stderr
    r = _tune("--tier", str(tmp_path / "t"), "--sample-shape", "3,8,8")
    assert r.returncode == 2 and "--step-ms" in r.stderr
    r = _tune("--check", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "run carousel tune first" in r.stderr


def test_check_names_the_tier_a_throttled_device_makes_lag(tmp_path, shm_dir):
    with slow_tier_or_skip(tmp_path) as slow:
        base, port = _base_profile(tmp_path)
        out = tmp_path / "tuned.toml"
        # Measured at full speed: the plan expects the loop device to read like the disk under it.
        r = _tune("--profile", str(base), "--tier", str(shm_dir), "--tier", str(slow.mount / "tier"),
                  "--step-ms", "10", "--records", "1024", "--out", str(out))
        assert r.returncode == 0, r.stderr
        data = tomllib.loads(out.read_text())
        assert data["tiers"][1]["path"] == str(slow.mount / "tier")
        data["tiers"][0]["capacity"] = 128  # most samples then live on the slow tier, as on a real device
        out.write_text(dump_toml(data))
        CarouselConfig.from_dict({k: v for k, v in data.items() if k != "daemon"})
        slow.throttle(read_iops=20, write_iops=40)  # an SD card having a bad day
        d = _serve(out, tmp_path, port, wrap=slow.command)
        stop = threading.Event()
        errors: list[BaseException] = []

        def trainer() -> None:  # a 10 ms step: add 32, replay 32, observe their losses
            try:
                with carousel.connect(d.socket) as c:
                    rng = np.random.default_rng(0)
                    for task in (0, 1):
                        for step in range(10_000):
                            if stop.is_set() or (task == 0 and step == 40):
                                break
                            x = torch.from_numpy(rng.integers(0, 256, (32, 3, 16, 16), dtype=np.uint8))
                            c.add(x, torch.from_numpy(rng.integers(0, 4, 32) + 4 * task), task=task)
                            b = c.sample(32)
                            c.observe(b.ids, loss=torch.rand(len(b)))
                            if step % 20 == 0:
                                drop_caches()  # reads of stored samples come from the device
                            time.sleep(0.01)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        th = threading.Thread(target=trainer)
        th.start()
        try:
            time.sleep(2)  # task 0 stored, task 1 swapping
            r = _tune("--check", str(out), "--window", "3")
        finally:
            stop.set()
            th.join(60)
            slow.throttle(0, 0)
            d.close()
        print(r.stdout)  # what a user sees (pytest -s)
        assert not errors, errors
        assert r.returncode == 1, r.stdout + r.stderr
        assert "lagging tier(s): 1-lmdb" in r.stdout, r.stdout
        assert f"tier 1-lmdb ({slow.mount / 'tier'})" in r.stdout
        lag_line = next(line for line in r.stdout.splitlines() if line.startswith("lagging tier(s)"))
        assert "0-lmdb" not in lag_line
