"""End to end: a real daemon, a client in another process, a real Prometheus scraping ``/metrics``.

The client is a separate Python process (``python -c``) that adds, samples (through the
shared-memory ring and, seeded, over the socket) and observes. Prometheus then scrapes the daemon
and its HTTP API must return the carousel series labelled ``memory="default"`` with the values the
client caused. The raw exposition must pass ``promtool check metrics``, and every label must come
from a small closed set: no sample ids, pids or other unbounded values as labels.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import carousel
from tests.daemon.harness import start_daemon
from tests.prometheus_harness import promtool_check_metrics, requires_prometheus, requires_promtool

REPO = Path(__file__).resolve().parents[2]
EM_SIZE = 64
N_ADD = 300  # 200 inline + 100 more: more than em_size, so the EM is full

CLIENT = r"""
import json, os, sys
import torch, carousel
sock = sys.argv[1]
c = carousel.connect(sock)
g = torch.Generator().manual_seed(0)
ids = []
for n in (200, 100):
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    ids += c.add(x, torch.arange(n) % 10, task=0).tolist()
c.flush()
sampled = observed = 0
for i in range(20):
    b = c.sample(16)
    sampled += len(b)
    c.observe(b.ids, logits=torch.randn(len(b), 10, generator=g), loss=torch.rand(len(b), generator=g))
    observed += 1
b = c.sample(8, seed=3)  # over the socket
sampled += len(b)
st = c.stats()
c.close()
print(json.dumps({"pid": os.getpid(), "ids": ids, "sampled": sampled, "observed": observed, "stats": st},
                 default=str))
"""

# Every label name the daemon may expose (Prometheus adds job and instance; histograms add le).
ALLOWED_LABELS = {"__name__", "job", "instance", "memory", "tier", "direction", "result", "op", "reason", "kind",
                  "le", "version", "python"}
MAX_VALUES_PER_LABEL = 24  # a closed set is small; ids or pids would blow through this


def _run_client(sock: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT, sock], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, f"client process failed (rc={proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.fixture
def daemon(tmp_path):
    with start_daemon(tmp_path, memory={"em_size": EM_SIZE, "sample_shape": [3, 8, 8]}) as d:
        yield d
    assert not d.shm_segments(), "the daemon left shared-memory segments behind"


def _check_labels(series: list[dict[str, str]], forbidden_values: set[str]) -> None:
    values: dict[str, set[str]] = {}
    for labels in series:
        extra = set(labels) - ALLOWED_LABELS
        assert not extra, f"unexpected label(s) {sorted(extra)} on {labels}"
        for k, v in labels.items():
            values.setdefault(k, set()).add(v)
            if k not in ("__name__", "instance"):
                assert v not in forbidden_values, f"label {k}={v!r} carries a pid or sample id: {labels}"
    for k, vs in values.items():
        if k not in ("__name__", "le"):
            assert len(vs) <= MAX_VALUES_PER_LABEL, f"label {k} has {len(vs)} values: {sorted(vs)[:40]}"


def _exposition_value(text: str, name: str) -> float:
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def _parse_exposition(text: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        assert m, f"unparsable exposition line: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        labels["__name__"] = m.group(1)
        out.append(labels)
    return out


@requires_promtool
def test_promtool_accepts_exposition(daemon):
    _run_client(daemon.socket)
    text = daemon.metrics_text()
    result = promtool_check_metrics(text)
    assert result.returncode == 0, f"promtool check metrics rc={result.returncode}\nstdout:\n{result.stdout}\n" \
                                   f"stderr:\n{result.stderr}"
    series = _parse_exposition(text)
    names = {s["__name__"] for s in series}
    for want in ("carousel_added_total", "carousel_samples", "carousel_build_info", "carousel_requests_total",
                 "carousel_request_latency_seconds_bucket", "carousel_sample_latency_seconds_bucket",
                 "carousel_shm_segments", "carousel_ring_batches_total", "process_resident_memory_bytes"):
        assert want in names, f"{want} missing from /metrics"
    for s in series:
        if s["__name__"].startswith("carousel_") and s["__name__"] in (
                "carousel_added_total", "carousel_samples", "carousel_bytes", "carousel_sample_latency_seconds_count"):
            assert s.get("memory") == "default", s


@requires_prometheus
def test_prometheus_scrapes_daemon(daemon, tmp_path):
    from tests.prometheus_harness import run_prometheus

    own_segments = _exposition_value(daemon.metrics_text(), "carousel_shm_segments")  # before any client
    out = _run_client(daemon.socket)
    assert len(out["ids"]) == N_ADD and len(set(out["ids"])) == N_ADD
    assert out["stats"]["added"] == N_ADD

    with run_prometheus([f"127.0.0.1:{daemon.metrics_port}"], tmp_path) as prom:
        assert _value(prom.wait_for('up{job="carousel"}', timeout=30)) == 1.0
        added = prom.wait_for('carousel_added_total{job="carousel",memory="default"}', timeout=30)
        assert _value(added) == N_ADD
        assert _value(prom.query('carousel_samples{memory="default",tier="ram"}')) == EM_SIZE
        assert _value(prom.query('carousel_samples{memory="default",tier="0-lmdb"}')) == N_ADD  # flushed
        assert _value(prom.query('carousel_capacity_samples{memory="default",tier="ram"}')) == EM_SIZE
        build = prom.query("carousel_build_info")
        assert _value(build) == 1.0 and build[0]["metric"]["version"] == carousel.__version__
        assert _value(prom.query('process_resident_memory_bytes{job="carousel"}')) > 10e6
        assert _value(prom.query('process_open_fds{job="carousel"}')) > 0
        # Every sample() the client made was counted by the memory (ring fills and seeded draws).
        assert _value(prom.query('carousel_sample_latency_seconds_count{memory="default"}')) >= 21
        assert _value(prom.query('sum(carousel_requests_total{op="observe",result="ok"})')) == out["observed"]
        assert _value(prom.query('sum(carousel_requests_total{op="add",result="ok"})')) == 2
        assert _value(prom.query('sum(carousel_requests_total{result!="ok"}) or vector(0)')) == 0
        # The client process has gone: its connection and its shared memory with it.
        assert _value(prom.query("carousel_clients")) == 0
        assert _value(prom.query("carousel_shm_segments")) == own_segments
        assert _value(prom.query('count(carousel_samples{memory="default"})')) == 2  # ram + 0-lmdb

        every = [r["metric"] for r in prom.query('{job="carousel"}')]
        assert len(every) > 30
        forbidden = {str(out["pid"]), str(daemon.pid)} | {str(i) for i in out["ids"] if i >= 100}
        _check_labels(every, forbidden)
    _check_labels(_parse_exposition(daemon.metrics_text()), {str(out["pid"]), str(daemon.pid)})
