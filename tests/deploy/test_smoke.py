"""Deployment smoke test: a shipped profile served by a real daemon, scraped by a real Prometheus
running the shipped scrape config and alert rules; a short client workload; then every dashboard
and alert query goes through Prometheus's HTTP API."""

from __future__ import annotations

import re
import time
import tomllib

import numpy as np
import pytest
import torch

import carousel
from tests.daemon.harness import free_port
from tests.prometheus_harness import requires_prometheus, run_prometheus

from .profiles import dump_toml, move_paths, start_serve, stop, wait_for_socket
from .test_deploy_files import ALERTS, DEPLOY, SCRAPE, alert_queries, dashboard_queries

pytestmark = pytest.mark.timeout(240)

# Panels that show only what the workload below does not cause: faults, demotion past a full
# tier, eviction (every sample is stored), refused connections. They must parse, not return data.
QUIET = ("Errors /s", "Demotions between tiers /s", "Swap lag and skipped swaps [B]",
         "Admissions and evictions /s [B]",
         "Byte budget in use")  # only tiers of variable-size records (saliency memories) have byte budgets


def promql(expr: str) -> str:
    """A dashboard query as Grafana would send it, its variables at 'All'."""
    return (expr.replace("$__rate_interval", "30s").replace('=~"$instance"', '=~".*"')
            .replace('=~"$memory"', '=~".*"'))


@requires_prometheus
def test_shipped_profile_scrape_config_dashboard_and_alerts_work_together(tmp_path):
    profile = tomllib.loads((DEPLOY / "configs" / "edge-board.toml").read_text())
    profile = move_paths(profile, {"/var/lib/carousel": str(tmp_path / "state"), "/run/carousel": str(tmp_path / "run")})
    port = free_port()
    profile["daemon"]["metrics"] = f"127.0.0.1:{port}"
    profile["memory"]["em_size"] = 200
    path = tmp_path / "edge-board.toml"
    path.write_text(dump_toml(profile))
    log = tmp_path / "daemon.log"
    proc = start_serve(path, log)
    try:
        sock = profile["daemon"]["socket_dir"] + "/carousel.sock"
        wait_for_socket(proc, sock, log)
        # The shipped scrape config, pointed at this daemon and sped up for a test.
        scrape = SCRAPE.read_text().replace("127.0.0.1:9464", f"127.0.0.1:{port}")
        scrape = re.sub(r"(scrape_interval|evaluation_interval): \d+s", r"\1: 1s", scrape)
        with run_prometheus([f"127.0.0.1:{port}"], tmp_path, config=scrape,
                            files={"alerts.yml": ALERTS.read_text()}) as prom:
            client = carousel.connect(sock)
            g = torch.Generator().manual_seed(0)
            end = time.monotonic() + 12
            task = 0
            while time.monotonic() < end:  # two tasks so that CarM swaps run, then replay
                client.add(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                           torch.randint(0, 10, (64,), generator=g), task=task)
                task = min(task + 1, 1)
                for _ in range(5):
                    b = client.sample(32)
                    client.observe(b.ids, logits=torch.randn(len(b), 10, generator=g))
                    del b
            client.flush()
            prom.wait_for('carousel_swaps_total{job="carousel"}', timeout=30)
            time.sleep(3)  # a few scrapes after the last swaps, so rates over 30 s see them
            empty, failed = [], {}
            for where, expr in dashboard_queries().items():
                if where.startswith("variable"):
                    continue
                try:
                    result = prom.query(promql(expr))
                except RuntimeError as exc:  # the API's 400 for PromQL that does not parse
                    failed[where] = str(exc)
                    continue
                values = [float(r["value"][1]) for r in result]
                if not values or all(np.isnan(values)):
                    empty.append(where)
            assert not failed, failed
            assert [w for w in empty if not w.startswith(QUIET)] == [], f"dashboard panels without data: {empty}"
            for name, expr in alert_queries().items():
                prom.query(expr)  # parses and evaluates; raises otherwise
            rules = prom._get_json("/api/v1/rules")
            loaded = {r["name"]: r for g in rules["groups"] for r in g["rules"]}
            assert set(loaded) == set(alert_queries())
            assert all(r["health"] == "ok" for r in loaded.values()), {n: r.get("lastError") for n, r in loaded.items()}
            assert loaded["CarouselDown"]["state"] == "inactive"  # the daemon is up
            client.close()
    finally:
        assert stop(proc) == 0, log.read_text()
