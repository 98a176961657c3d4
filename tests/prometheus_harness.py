"""Real Prometheus for tests: `promtool check metrics` and a live `prometheus` server.

A helper module imported by tests, not a test file. Nothing is mocked: the
functions below run the binaries from Debian's ``prometheus`` package
(``/usr/bin/prometheus``, ``/usr/bin/promtool``). Where they are not on PATH,
tests mark themselves with :data:`requires_prometheus` / :data:`requires_promtool`
and are skipped with a reason that ``-ra`` prints.

Typical use::

    from tests.prometheus_harness import requires_prometheus, run_prometheus

    @requires_prometheus
    def test_scraped(tmp_path):
        with run_prometheus(["127.0.0.1:8000"], tmp_path) as prom:
            [sample] = prom.wait_for('my_counter_total{job="carousel"}')
            assert float(sample["value"][1]) == 1.0

Only the standard library and pytest are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

PROMETHEUS: str | None = shutil.which("prometheus")
PROMTOOL: str | None = shutil.which("promtool")

_INSTALL_HINT = "install Debian package 'prometheus' (apt-get install prometheus)"

requires_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason=f"prometheus binary not on PATH: {_INSTALL_HINT}; Prometheus end-to-end test skipped",
)
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason=f"promtool binary not on PATH: {_INSTALL_HINT}; promtool check skipped",
)

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_HTTP_TIMEOUT_S = 5.0


def promtool_check_metrics(text: str | bytes, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Pipe exposition ``text`` to ``promtool check metrics``; return the finished process.

    ``returncode`` is 0 when the text parses and lints clean (promtool 2.42 gives
    1 for a parse error, 3 for lint problems); ``stdout``/``stderr`` are str.
    """
    if PROMTOOL is None:
        raise RuntimeError(f"promtool not on PATH: {_INSTALL_HINT}")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def render_config(targets: Sequence[str], scrape_interval: str = "1s", job: str = "carousel") -> str:
    """The prometheus.yml text scraping ``targets`` (``host:port``) under ``job``.

    Strings are written JSON-quoted, which is valid YAML.

    >>> print(render_config(["127.0.0.1:9"], "2s", "j"))
    global:
      scrape_interval: "2s"
      scrape_timeout: "2s"
      evaluation_interval: "2s"
    scrape_configs:
      - job_name: "j"
        static_configs:
          - targets: ["127.0.0.1:9"]
    <BLANKLINE>
    """
    for target in targets:
        if not isinstance(target, str) or ":" not in target or "/" in target:
            raise ValueError(f"target must be 'host:port', got {target!r}")
    q = json.dumps
    return (
        "global:\n"
        f"  scrape_interval: {q(scrape_interval)}\n"
        # The timeout may not exceed the interval; equal keeps slow scrapes visible as errors.
        f"  scrape_timeout: {q(scrape_interval)}\n"
        f"  evaluation_interval: {q(scrape_interval)}\n"
        "scrape_configs:\n"
        f"  - job_name: {q(job)}\n"
        "    static_configs:\n"
        f"      - targets: [{', '.join(q(t) for t in targets)}]\n"
    )


def _tail(path: Path, max_lines: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(lines[-max_lines:]) or "<empty>"


def _load_prctl():
    # Resolved here, in the parent: no dlopen/dlsym between fork and exec.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _kill_with_parent() -> None:
    """Child-side (preexec_fn): SIGKILL this process if the test process dies first.

    Linux only, best effort; the ``finally`` in :func:`run_prometheus` is the
    normal way the server stops. Note PR_SET_PDEATHSIG fires when the *thread*
    that started the child exits, so start the server from a thread that
    outlives it (pytest's main thread does).
    """
    PR_SET_PDEATHSIG = 1
    _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class PrometheusServer:
    """A running ``prometheus`` subprocess; use through :func:`run_prometheus`."""

    def __init__(
        self, process: subprocess.Popen, url: str, workdir: Path, config_path: Path, log_path: Path, n_targets: int
    ):
        self.process = process
        self.url = url  # e.g. "http://127.0.0.1:41234", no trailing slash
        self.workdir = workdir
        self.config_path = config_path
        self.log_path = log_path  # prometheus's stdout+stderr
        self.n_targets = n_targets

    def __repr__(self) -> str:
        return f"PrometheusServer(url={self.url!r}, pid={self.process.pid})"

    def log_tail(self, max_lines: int = 30) -> str:
        """The last lines prometheus wrote (stdout and stderr together)."""
        return _tail(self.log_path, max_lines)

    def _get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            # The API answers errors (bad PromQL: 400, ...) with a JSON body naming the problem.
            detail = exc.read().decode("utf-8", errors="replace")
            raise RuntimeError(f"GET {url} -> HTTP {exc.code}: {detail}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"GET {url} -> {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query via ``/api/v1/query``; the ``result`` list.

        For a vector expression each item is ``{"metric": {labels}, "value": [ts, "str"]}``
        (the value is a string: use ``float(item["value"][1])``). For a scalar or
        string expression the ``[ts, "str"]`` pair itself is returned.
        """
        return self._get_json("/api/v1/query", {"query": expr})["result"]

    def wait_for(self, expr: str, timeout: float = 30.0, interval: float = 0.25) -> list[dict]:
        """Poll :meth:`query` until it returns a non-empty result; return that result.

        Raises ``TimeoutError`` naming the targets' health and last scrape errors.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited (rc={self.process.returncode}) while waiting for {expr!r}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no result for {expr!r} from {self.url} within {timeout}s; targets: {self._targets_summary()}"
                )
            time.sleep(interval)

    def targets(self) -> dict:
        """``/api/v1/targets`` data: ``{"activeTargets": [...], "droppedTargets": [...]}``.

        Each active target has ``scrapeUrl``, ``health`` ("up"/"down"/"unknown"),
        ``lastError``, ``labels``, ... .
        """
        return self._get_json("/api/v1/targets")

    def wait_for_targets(self, health: str | None = "up", timeout: float = 30.0, interval: float = 0.25) -> list[dict]:
        """Poll until every configured target is active and (unless ``health`` is None)
        has that health ("up", "down"); return the active targets.

        Prometheus hands discovered targets to its scrapers about 5 s after start
        (a fixed throttle in 2.x), so the first scrape comes no sooner than that.
        """
        deadline = time.monotonic() + timeout
        while True:
            active = self.targets()["activeTargets"]
            if len(active) >= self.n_targets and all(health is None or t.get("health") == health for t in active):
                return active
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited (rc={self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"targets not all {health or 'active'} within {timeout}s; targets: {self._targets_summary()}"
                )
            time.sleep(interval)

    def _targets_summary(self) -> str:
        try:
            active = self.targets()["activeTargets"]
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"<could not list targets: {exc}>"
        return "; ".join(
            f"{t.get('scrapeUrl')} health={t.get('health')} lastError={t.get('lastError')!r}" for t in active
        ) or "<no active targets>"


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt yet"
    while True:
        rc = server.process.poll()
        if rc is not None:
            raise RuntimeError(
                f"prometheus exited with rc={rc} before becoming ready "
                f"(config {server.config_path}); output tail:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:  # 503 while starting up
            last_error = f"HTTP {exc.code}"
        except OSError as exc:  # not listening yet
            last_error = repr(exc)
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"prometheus at {server.url} not ready within {timeout}s (last: {last_error}); "
                f"output tail:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, wait, then SIGKILL; always reaps the process."""
    if process.poll() is not None:
        return
    try:
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    except BaseException:
        # Interrupted (e.g. KeyboardInterrupt) while waiting: still do not leak it.
        process.kill()
        process.wait()
        raise


@contextlib.contextmanager
def run_prometheus(
    targets: Sequence[str],
    tmp_path: str | os.PathLike,
    scrape_interval: str = "1s",
    job: str = "carousel",
    *,
    ready_timeout: float = READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
    config: str | None = None,
    files: dict[str, str] | None = None,
) -> Iterator[PrometheusServer]:
    """Run a real ``prometheus`` scraping ``targets`` (``"host:port"``) as ``job``.

    Config, TSDB and log go to a fresh directory under ``tmp_path``. The server
    listens on 127.0.0.1 at a free port and is ready (``/-/ready`` answered 200)
    when the body starts; it is stopped (SIGTERM, then SIGKILL) on exit, also
    when the body raises. ``extra_args`` are appended to the command line. ``config`` replaces
    the generated prometheus.yml (a shipped config, say); ``files`` (name -> text) are written
    beside it (its rule files).

    Ready is not scraped: Prometheus 2.x starts scraping about 5 s after start,
    so give :meth:`PrometheusServer.wait_for` a timeout well above that.
    """
    if PROMETHEUS is None:
        raise RuntimeError(f"prometheus not on PATH: {_INSTALL_HINT}")
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-", dir=os.fspath(tmp_path)))
    config_path = workdir / "prometheus.yml"
    config_path.write_text(config if config is not None else render_config(targets, scrape_interval, job))
    for name, text in (files or {}).items():
        (workdir / name).write_text(text)
    log_path = workdir / "prometheus.log"
    port = free_port()
    cmd = [
        PROMETHEUS,
        f"--config.file={config_path}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={workdir / 'data'}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=info",
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            preexec_fn=_kill_with_parent if _PRCTL is not None else None,
        )
    try:
        server = PrometheusServer(process, f"http://127.0.0.1:{port}", workdir, config_path, log_path, len(targets))
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        _stop(process)
