"""deploy/: Prometheus config and rules valid, every metric they use exists, compose sane.

Needs PyYAML, and Debian's `prometheus` package for promtool (the promtool tests skip
without it: `apt-get install -y --no-install-recommends prometheus`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # PyYAML: part of the `test` extra

from engine.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS_YML = DEPLOY / "alerts.yml"
ALERTS_TEST_YML = DEPLOY / "alerts_test.yml"
COMPOSE_YML = DEPLOY / "docker-compose.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

LOOKALIKE_SUBCOMMANDS = {"topics", "worker", "replay", "train", "data", "broker", "run"}
METRIC_RE = re.compile(r"\blookalike_[a-z0-9_]+\b")
# labels Prometheus adds to every scraped series, and a histogram's bucket label
SCRAPE_LABELS = {"job", "instance", "le"}


def _promtool() -> str | None:
    found = shutil.which("promtool")
    if found:
        return found
    if os.access("/usr/bin/promtool", os.X_OK):
        return "/usr/bin/promtool"
    return None


PROMTOOL = _promtool()
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found on PATH nor in /usr/bin "
    "(apt-get install -y --no-install-recommends prometheus)",
)


def _promtool_run(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ what the code exports
def _metric_objects() -> list[object]:
    """The collectors a WorkerMetrics registers (every metric any stage may set)."""
    m = WorkerMetrics("test")
    return [v for v in vars(m).values() if hasattr(v, "_labelnames")]


def exported_sample_names() -> set[str]:
    """Every sample name a WorkerMetrics registry can expose.

    ``registry.collect()`` gives families with their base name (a counter's without
    ``_total``); a labelled metric with no child yet has no samples, so the sample
    names are derived from each family's type.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in WorkerMetrics("test").registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def exported_label_names() -> set[str]:
    labels: set[str] = set()
    for metric in _metric_objects():
        labels.update(metric._labelnames)  # type: ignore[attr-defined]
    return labels


# ------------------------------------------------------------------ what deploy/ uses
def _load_yaml(path: Path) -> dict:
    with path.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def alert_exprs() -> dict[str, str]:
    rules = {}
    for group in _load_yaml(ALERTS_YML)["groups"]:
        for rule in group["rules"]:
            rules[rule.get("alert") or rule["record"]] = rule["expr"]
    return rules


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # collapsed rows hold their panels
    return out


def dashboard_exprs() -> dict[str, str]:
    exprs = {}
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in _panels(dash["panels"]):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    exprs[f"{path.name}: {panel['title']} [{target['refId']}]"] = target["expr"]
    return exprs


def _grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                         expr):
        labels.update(x.strip() for x in m.group(1).split(",") if x.strip())
    for m in re.finditer(r"\{([^}]*)\}", expr):  # selectors: {topic="clicks", job=~"..."}
        labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(1)))
    return labels


# ------------------------------------------------------------------ (a) promtool
@needs_promtool
def test_promtool_check_config() -> None:
    """Also checks the rule files prometheus.yml loads (alerts.yml)."""
    r = _promtool_run("check", "config", str(PROMETHEUS_YML))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    r = _promtool_run("check", "rules", str(ALERTS_YML))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    """deploy/alerts_test.yml: each alert fires on the series it is meant for, at the time
    its `for:` says, with the labels and annotations it renders."""
    r = _promtool_run("test", "rules", str(ALERTS_TEST_YML))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in _load_yaml(ALERTS_TEST_YML)["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert set(alert_exprs()) - tested == set()


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule; Grafana's
    $__rate_interval replaced by a literal range)."""
    exprs = dashboard_exprs()
    assert exprs, "no dashboard queries found"
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(exprs.values())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool_run("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_both_workers() -> None:
    config = _load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for job, service, port in [("lookalike-scoring", "scoring", 9401),
                               ("lookalike-clustering", "clustering", 9402)]:
        sd = jobs[job]["dns_sd_configs"]
        assert sd == [{"names": [service], "type": "A", "port": port, "refresh_interval": "10s"}]


# ------------------------------------------------------------------ (b) metric names
def test_exported_names_are_derived_correctly() -> None:
    names = exported_sample_names()
    for n in ["lookalike_events_consumed_total", "lookalike_build_info",
              "lookalike_scoring_latency_seconds_bucket", "lookalike_consumer_lag_messages"]:
        assert n in names
    assert "lookalike_events_consumed" not in names  # a counter is exposed with _total


@pytest.mark.parametrize("source", ["alerts.yml", "dashboards"])
def test_every_metric_referenced_exists(source: str) -> None:
    exprs = alert_exprs() if source == "alerts.yml" else dashboard_exprs()
    assert exprs
    exported = exported_sample_names()
    missing = {
        f"{where}: {name}"
        for where, expr in exprs.items()
        for name in METRIC_RE.findall(expr)
        if name not in exported
    }
    assert not missing, f"metrics not in engine.metrics.WorkerMetrics: {sorted(missing)}"


@pytest.mark.parametrize("source", ["alerts.yml", "dashboards"])
def test_every_label_referenced_exists(source: str) -> None:
    """Grouping and selector labels must be labels the workers export (or scrape labels)."""
    exprs = alert_exprs() if source == "alerts.yml" else dashboard_exprs()
    known = exported_label_names() | SCRAPE_LABELS
    assert {"stage", "topic", "reason", "partition", "kind"} <= known
    unknown = {
        f"{where}: {label}"
        for where, expr in exprs.items()
        for label in _grouping_labels(expr)
        if label not in known
    }
    assert not unknown, f"labels no metric has: {sorted(unknown)}"


def test_dashboard_covers_the_required_views() -> None:
    used = set()
    for expr in dashboard_exprs().values():
        used.update(METRIC_RE.findall(expr))
    for name in [
        "lookalike_events_consumed_total", "lookalike_events_produced_total",
        "lookalike_dead_letters_total", "lookalike_consumer_lag_messages",
        "lookalike_scoring_latency_seconds_bucket",
        "lookalike_click_to_recommendation_seconds_bucket",
        "lookalike_kmeans_refresh_seconds_bucket", "lookalike_seed_window_items",
        "lookalike_seed_window_seeds", "lookalike_centroid_age_seconds",
    ]:
        assert name in used, f"dashboard has no panel on {name}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    ds = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    uids = {d["uid"] for d in ds}
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in _panels(dash["panels"]):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in uids, panel["title"]
        ids = [p["id"] for p in _panels(dash["panels"])]
        assert len(ids) == len(set(ids)), "duplicate panel ids"


# ------------------------------------------------------------------ (c) compose
def compose() -> dict:
    return _load_yaml(COMPOSE_YML)


def lookalike_services() -> dict[str, dict]:
    """Services that run the image built from deploy/Dockerfile."""
    out = {}
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build:
            assert build == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
            out[name] = svc
    return out


def _argv(svc: dict) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]


def test_compose_services() -> None:
    services = compose()["services"]
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    assert set(lookalike_services()) == {"topics", "data", "train", "clustering", "scoring",
                                         "replay"}
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_kafka_is_kraft_combined() -> None:
    env = compose()["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "CONTROLLER" not in env["KAFKA_ADVERTISED_LISTENERS"]
    listener_names = {x.split("://")[0] for x in env["KAFKA_LISTENERS"].split(",")}
    protocol_map = {x.split(":")[0] for x in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    assert listener_names <= protocol_map
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    # a KRaft cluster id is a base64url-encoded 16-byte UUID
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])


def test_compose_commands_are_lookalike_subcommands() -> None:
    for name, svc in lookalike_services().items():
        argv = _argv(svc)
        assert argv and argv[0] in LOOKALIKE_SUBCOMMANDS, f"{name}: {argv}"
        if "--bootstrap-servers" in argv:
            assert argv[argv.index("--bootstrap-servers") + 1] == "kafka:9092", name


def test_compose_commands_parse_with_the_cli() -> None:
    """Each command line parses against lookalike.cli: an unknown subcommand or option (one
    renamed in the CLI) fails. `--help` is appended so that nothing runs: click parses the
    whole line (unknown options are errors) before the eager --help prints and exits."""
    from typer.testing import CliRunner

    from lookalike.cli import app

    runner = CliRunner()
    for name, svc in lookalike_services().items():
        argv = _argv(svc)
        res = runner.invoke(app, [*argv, "--help"], prog_name="lookalike")
        assert res.exit_code == 0, f"{name}: lookalike {shlex.join(argv)}\n{res.output}"
        usage = next(line for line in res.output.splitlines() if "Usage:" in line)
        assert f"Usage: lookalike {argv[0]}" in usage, usage
        assert "COMMAND" not in usage, f"{name}: {argv} stops at a command group"


def test_compose_workers() -> None:
    services = lookalike_services()
    config = _load_yaml(PROMETHEUS_YML)
    ports = {j["job_name"]: j["dns_sd_configs"][0]["port"] for j in config["scrape_configs"]
             if "dns_sd_configs" in j}
    for kind in ("scoring", "clustering"):
        svc = services[kind]
        argv = _argv(svc)
        assert argv[:2] == ["worker", kind]
        assert argv[argv.index("--metrics-addr") + 1] == "0.0.0.0"
        assert int(argv[argv.index("--metrics-port") + 1]) == ports[f"lookalike-{kind}"]
        assert svc["deploy"]["replicas"] >= 1
        assert "container_name" not in svc and "ports" not in svc, "replicas would collide"
        deps = svc["depends_on"]
        assert deps["train"]["condition"] == "service_completed_successfully"
        assert deps["topics"]["condition"] == "service_completed_successfully"
    assert services["train"]["depends_on"]["data"]["condition"] == (
        "service_completed_successfully")
    assert _argv(services["train"])[:2] == ["train", "ralm"]
    assert _argv(services["replay"])[:2] == ["replay", "ml-100k"]


def test_compose_cache_volume_is_shared() -> None:
    c = compose()
    assert "lookalike-cache" in c["volumes"]
    for name, svc in lookalike_services().items():
        assert "lookalike-cache:/cache" in svc["volumes"], name
        assert svc["environment"]["LOOKALIKE_CACHE_DIR"] == "/cache", name


def test_compose_workers_expect_the_partitions_topics_creates() -> None:
    """A worker checks the topic layout after an outage against kafka.partitions: the
    count it is told must be the one the `topics` service creates, or it stops (exit 3)."""
    services = lookalike_services()
    argv = _argv(services["topics"])
    created = argv[argv.index("--partitions") + 1]
    for name, svc in services.items():
        assert svc["environment"]["LOOKALIKE_KAFKA__PARTITIONS"] == created, name


def test_compose_mounts_exist() -> None:
    """Every bind mount of a file or folder under deploy/ points at something that exists."""
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name}: {src} missing"
    prom = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in prom
    provider = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/lookalike.yml")
    dash_path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{dash_path}:ro" in compose()["services"]["grafana"]["volumes"]


def test_the_image_copies_every_package_the_project_installs():
    """A package missing from the image's COPY lines (or its ignore file) installs
    fine locally and breaks only the image: `lookalike --help` fails at build."""
    import tomllib

    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]
                ["include"]]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "lookalike" in packages
    for p in packages:
        assert f"COPY {p} ./{p}" in dockerfile, p
        assert f"!{p}/" in ignore, p
