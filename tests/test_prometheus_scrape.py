"""A real Prometheus (Debian's `prometheus` package) scrapes a live WorkerMetrics endpoint.

It then evaluates deploy/alerts.yml and every Grafana dashboard query against what it
scraped: the names, labels and PromQL the deployment uses work on real exposition.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
TIMEOUT_S = 30.0


def _prometheus() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    if os.access("/usr/bin/prometheus", os.X_OK):
        return "/usr/bin/prometheus"
    return None


PROMETHEUS = _prometheus()
pytestmark = [
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus binary not found on PATH nor in /usr/bin "
        "(apt-get install -y --no-install-recommends prometheus)",
    ),
    pytest.mark.slow,  # ~6-8 s, most of it waiting for Prometheus' first scrape
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prom:
    """HTTP API of the Prometheus under test."""

    def __init__(self, base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.base, self.proc, self.log = base, proc, log

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.get("/api/v1/query", query=promql)["result"]

    def wait_for(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check`` until it returns something truthy (connection errors retried)."""
        deadline = time.monotonic() + TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                result = check()
                if result:
                    return result
                last = result
            except (urllib.error.URLError, ConnectionError) as e:
                last = e
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def metrics_endpoint() -> Iterator[tuple[WorkerMetrics, int]]:
    metrics = WorkerMetrics("scoring")
    server, port = metrics.serve(0)
    try:
        yield metrics, port
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory,
         metrics_endpoint: tuple[WorkerMetrics, int]) -> Iterator[Prom]:
    """One Prometheus for the module: it applies new scrape targets only every 5 s
    (hard-wired in 2.42), so the first scrape lands up to ~5 s after start."""
    assert PROMETHEUS is not None
    _, worker_port = metrics_endpoint
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "rule_files:\n"
        f"  - {json.dumps(str(DEPLOY / 'alerts.yml'))}\n"
        "scrape_configs:\n"
        "  - job_name: lookalike-scoring\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{worker_port}']\n"
    )
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    api = Prom(f"http://127.0.0.1:{port}", proc, log)
    try:
        api.wait_for("prometheus ready", lambda: urllib.request.urlopen(
            f"{api.base}/-/ready", timeout=2).status == 200)
        yield api
    finally:
        # stop exactly the process this fixture started
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _value(result: list[dict], **labels: str) -> float | None:
    for sample in result:
        if all(sample["metric"].get(k) == v for k, v in labels.items()):
            return float(sample["value"][1])
    return None


def test_prometheus_scrapes_a_worker(prom: Prom,
                                     metrics_endpoint: tuple[WorkerMetrics, int]) -> None:
    m, _ = metrics_endpoint
    m.consumed.labels("scoring", "clicks").inc(7)
    m.dead_letters.labels("scoring", "clicks", "bad_json").inc(2)
    m.lag.labels("scoring", "clicks", "0").set(40)
    m.centroid_age.labels("scoring").set(301.0)  # stale: > 300 s
    for _ in range(5):
        m.score_seconds.labels("scoring").observe(0.2)  # p99 > 50 ms
        m.freshness.labels("scoring").observe(0.3)

    consumed = prom.wait_for(
        "lookalike_events_consumed_total == 7",
        lambda: _value(prom.query("lookalike_events_consumed_total"),
                       job="lookalike-scoring", stage="scoring", topic="clicks") == 7,
    )
    assert consumed
    up = prom.query('up{job="lookalike-scoring"}')
    assert len(up) == 1 and float(up[0]["value"][1]) == 1.0
    assert _value(prom.query("lookalike_build_info"), stage="scoring") == 1.0

    # a second scrape with more observations: rate() over the histogram is non-zero
    for _ in range(5):
        m.score_seconds.labels("scoring").observe(0.2)
    p99 = prom.wait_for(
        "scoring latency p99 from the histogram",
        lambda: _value(prom.query(
            "histogram_quantile(0.99, sum by (le) "
            "(rate(lookalike_scoring_latency_seconds_bucket[1m])))")),
    )
    assert 0.1 < p99 <= 0.25  # every observation is in the (0.1, 0.25] bucket

    # alerts.yml runs on the scraped series: the stale-centroid and latency alerts
    # become pending (their `for:` keeps them from firing within the test)
    def active_alerts() -> set[str] | None:
        alerts = prom.get("/api/v1/alerts")["alerts"]
        names = {a["labels"]["alertname"] for a in alerts}
        want = {"LookalikeCentroidTableStale", "LookalikeScoringLatencyHigh"}
        return names if want <= names else None

    active = prom.wait_for("alerts pending", active_alerts)
    assert "LookalikeWorkerDown" not in active

    # every rule evaluated without error against real data
    def rules_evaluated() -> list[dict] | None:
        groups = prom.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = all(not r.get("lastEvaluation", "").startswith("0001-") for r in rules)
        return rules if rules and done else None

    rules = prom.wait_for("every rule evaluated", rules_evaluated)
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad


def test_dashboard_queries_run(prom: Prom, metrics_endpoint: tuple[WorkerMetrics, int]) -> None:
    """Every Grafana query is accepted by the real query engine."""
    m, _ = metrics_endpoint
    m.recommendations.labels("scoring").inc(3)
    prom.wait_for(
        "a scrape with data",
        lambda: _value(prom.query("lookalike_recommendations_total")) == 3,
    )
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        stack = list(json.loads(path.read_text())["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    assert exprs
    for expr in exprs:
        prom.query(expr.replace("$__rate_interval", "1m"))  # raises on a bad query
