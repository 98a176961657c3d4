"""The deploy files as an operator uses them: promtool on the Prometheus config and rules, systemd's
own verifier on the unit, the dashboard's and alerts' queries against what a real daemon exports,
and the container files pointing at things that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.daemon.harness import start_daemon
from tests.prometheus_harness import PROMTOOL, requires_promtool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "carousel.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
UNIT = DEPLOY / "systemd" / "carousel.service"
CONTAINER = DEPLOY / "container"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not the daemon

pytestmark = pytest.mark.timeout(180)


def dashboard_queries() -> dict[str, str]:
    """Panel title (and ref) -> PromQL of every panel target and template variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out[f"{panel['title']} [{t['refId']}]"] = t["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out[f"variable {var['name']}"] = var["query"]["query"]
    return out


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (quoted label values and label_values() labels aside)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {n for n in names if n.startswith(("carousel_", "process_")) or n in PROMETHEUS_OWN}


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics page can carry: sample lines, plus the families its TYPE lines
    declare (a labelled counter with no event yet has no sample line)."""
    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",), "untyped": ("",)}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name[:-len("_total")] if kind == "counter" and name.endswith("_total") else name
            names.update(base + s for s in suffixes.get(kind, ("",)))
            names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_and_alerts_query_only_what_the_daemon_exports(tmp_path):
    d = start_daemon(tmp_path)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as resp:
            exported = exported_names(resp.read().decode())
    finally:
        d.stop()
    queries = {**dashboard_queries(), **alert_queries()}
    assert len(queries) > 30
    missing = {}
    for where, expr in queries.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - exported - PROMETHEUS_OWN
        if unknown:
            missing[where] = sorted(unknown)
    assert not missing, f"queries name metrics the daemon does not export: {missing}"


def test_metric_name_parsing_catches_a_typo():
    assert metric_names('sum by (memory) (rate(carousel_swapz_total{memory=~"$m"}[5m]))') == {"carousel_swapz_total"}
    assert "carousel_swapz_total" not in exported_names("# TYPE carousel_swaps counter\ncarousel_swaps_total 1\n")


def test_dashboard_covers_what_an_operator_watches():
    text = " ".join(dashboard_queries().values())
    for metric in ("carousel_samples", "carousel_capacity_samples", "carousel_admissions_total",
                   "carousel_evictions_total", "carousel_swaps_total", "carousel_swap_lag_requests",
                   "carousel_prefetch_requests_total", "carousel_sample_latency_seconds_bucket",
                   "carousel_write_behind_queue_samples", "carousel_bytes", "carousel_errors_total"):
        assert metric in text, f"the dashboard shows nothing of {metric}"
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_alert_has_for_severity_and_summary():
    rules = yaml.safe_load(ALERTS.read_text())
    names = set()
    for group in rules["groups"]:
        for r in group["rules"]:
            names.add(r["alert"])
            assert "for" in r and r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    assert {"CarouselDown", "CarouselSwapFallingBehind", "CarouselStorageNearCapacity", "CarouselWriteErrors",
            "CarouselChecksumErrors", "CarouselSharedMemoryLeak"} <= names


@requires_promtool
def test_promtool_checks_config_and_rules_and_runs_the_rule_tests(tmp_path):
    for args in (["check", "config", str(SCRAPE)], ["check", "rules", str(ALERTS)],
                 ["test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    # The compose file's Prometheus config, with the rules where compose mounts them.
    shutil.copy(CONTAINER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    done = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@requires_promtool
def test_rule_tests_can_fail(tmp_path):
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    wrong = (DEPLOY / "prometheus" / "alerts_test.yml").read_text().replace("severity: critical", "severity: page", 1)
    (tmp_path / "alerts_test.yml").write_text(wrong)
    done = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    # The unit names /opt/carousel; point it at this checkout's carousel for the verifier.
    unit = tmp_path / "carousel.service"
    unit.write_text(UNIT.read_text().replace("/opt/carousel/bin/carousel", str(Path(sys.executable).parent / "carousel")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    text = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=carousel", "StateDirectory=carousel",
                    "RuntimeDirectory=carousel", "ProtectSystem=strict", "NoNewPrivileges=yes", "RemoveIPC=yes"):
        assert setting in text
    assert "PrivateDevices=yes" not in text and "PrivateIPC=yes" not in text  # trainers map the host's /dev/shm


def test_container_files_point_at_what_exists():
    dockerfile = (CONTAINER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(\S+)", dockerfile, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert re.search(r"^USER\s+carousel", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    assert "torch==2.13.0" in dockerfile and "whl/cpu" in dockerfile
    assert "--shm-size" in dockerfile
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    assert set(compose["services"]) == {"carousel", "prometheus", "grafana"}
    assert compose["services"]["carousel"]["shm_size"]
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (CONTAINER / host).exists(), f"compose mounts {host}, which does not exist"
    done = subprocess.run([sys.executable, "-m", "carousel", "check-config", str(CONTAINER / "profile.toml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "carousel.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_container_health_check_passes_on_a_live_daemon_and_fails_without_one(tmp_path):
    dockerfile = (CONTAINER / "Dockerfile").read_text().replace("\\\n", " ")
    cmd = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*?\])", dockerfile).group(1))
    d = start_daemon(tmp_path, metrics=False)
    try:
        live = [d.socket if a == "/run/carousel/carousel.sock" else a for a in cmd]
        assert live != cmd, "the health check names the container's socket"
        live[0] = str(Path(sys.executable).parent / live[0])
        done = subprocess.run(live, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        d.stop()
    done = subprocess.run(live, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # no daemon: unhealthy
