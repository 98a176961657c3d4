"""Self-test of tests/prometheus_harness.py against the real prometheus and promtool binaries.

Nothing is mocked: a prometheus_client exposition is served over HTTP on
127.0.0.1, a real Prometheus scrapes it, and the series is read back through
the HTTP query API. Skipped (visibly, with -ra) where the Debian ``prometheus``
package is not installed.
"""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server

from tests.prometheus_harness import (
    free_port,
    promtool_check_metrics,
    requires_prometheus,
    requires_promtool,
    run_prometheus,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def exposition():
    """A prometheus_client HTTP exposition on 127.0.0.1 with one counter at 3."""
    registry = CollectorRegistry()
    counter = Counter("harness_selftest", "Harness self-test counter.", registry=registry)
    counter.inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}", counter
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@requires_prometheus
def test_real_prometheus_scrapes_a_counter(tmp_path, exposition):
    target, counter = exposition
    started = time.monotonic()
    with run_prometheus([target], tmp_path) as prom:
        assert prom.url.startswith("http://127.0.0.1:")
        [sample] = prom.wait_for('harness_selftest_total{job="carousel"}', timeout=20)
        assert sample["metric"]["instance"] == target
        assert float(sample["value"][1]) == 3.0

        # A later change reaches Prometheus on a later scrape: the data is live, not stale.
        counter.inc(2)
        [sample] = prom.wait_for('harness_selftest_total{job="carousel"} == 5', timeout=20)
        assert float(sample["value"][1]) == 5.0

        [active] = prom.targets()["activeTargets"]  # scraped above, so present and up
        assert active["scrapeUrl"] == f"http://{target}/metrics"
        assert active["health"] == "up", active.get("lastError")
        assert active["labels"]["job"] == "carousel"

        # A query matching nothing is an empty result, not an error.
        assert prom.query("no_such_metric_anywhere") == []
        process = prom.process
    assert process.poll() is not None, "prometheus still running after the with block"
    assert time.monotonic() - started < 30


@requires_prometheus
def test_bad_promql_is_a_clear_error(tmp_path, exposition):
    target, _ = exposition
    with run_prometheus([target], tmp_path) as prom:
        with pytest.raises(RuntimeError, match="HTTP 400"):
            prom.query("sum(")


@requires_prometheus
def test_wait_for_timeout_names_the_down_target(tmp_path):
    # Nothing listens at the target: the timeout error says why there is no data.
    dead = f"127.0.0.1:{free_port()}"
    with run_prometheus([dead], tmp_path) as prom:
        [target] = prom.wait_for_targets(health="down", timeout=20)
        assert "connection refused" in target["lastError"]
        with pytest.raises(TimeoutError, match=rf"{dead}/metrics health=down lastError=.*connection refused"):
            prom.wait_for("harness_selftest_total", timeout=1)


@requires_prometheus
def test_failed_start_names_prometheus_output(tmp_path):
    # An unknown flag makes prometheus exit at once; the error carries its own message.
    with pytest.raises(RuntimeError, match=r"(?s)exited with rc=.*no-such-flag"):
        with run_prometheus(["127.0.0.1:9"], tmp_path, extra_args=["--no-such-flag"]):
            pytest.fail("body must not run when prometheus did not start")


@requires_prometheus
def test_process_stopped_when_body_raises(tmp_path):
    with pytest.raises(KeyError):
        with run_prometheus(["127.0.0.1:9"], tmp_path) as prom:
            process = prom.process
            raise KeyError("boom")
    assert process.poll() is not None


@requires_promtool
def test_promtool_accepts_prometheus_client_output():
    registry = CollectorRegistry()
    Counter("harness_selftest", "Harness self-test counter.", ["kind"], registry=registry).labels("a").inc()
    result = promtool_check_metrics(generate_latest(registry).decode())
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("harness_selftest_total{kind=\"a\" 1\n", id="parse-error"),
        pytest.param("# TYPE harness_selftest counter\nharness_selftest 1\n", id="lint-no-help-no-total"),
    ],
)
def test_promtool_rejects_broken_exposition(text):
    result = promtool_check_metrics(text)
    assert result.returncode != 0, f"promtool accepted:\n{text}"
