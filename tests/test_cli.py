"""The `lookalike` command as a user runs it: real processes, real exit codes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient

from lookalike.broker import free_port

CLI = [sys.executable, "-m", "lookalike.cli"]


def test_broker_command_serves_creates_topics_and_stops_on_sigterm(tmp_path):
    port = free_port()
    proc = subprocess.Popen(CLI + ["broker", "--port", str(port), "--partitions", "3",
                                   "--topic-prefix", "cli-"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "broker ready" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "broker command exited early"
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        topics = set(admin.list_topics())
        meta = admin.describe_topics(["cli-clicks"])
        admin.close()
        assert {"cli-clicks", "cli-seed-events", "cli-seed-centroids", "cli-score-requests",
                "cli-recommendations", "cli-clicks.dlq"} <= topics
        assert len(meta[0]["partitions"]) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_command_on_a_taken_port_fails_and_touches_nothing(broker):
    """Another broker already listens there: a clear error and status 1, not "broker
    ready" with the dataflow's topics created on the other broker."""
    r = subprocess.run(CLI + ["broker", "--port", str(broker.port), "--topic-prefix",
                              "taken-"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "already in use" in r.stderr and "broker ready" not in r.stdout
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert not any(t.startswith("taken-") for t in admin.list_topics())
    finally:
        admin.close()


def test_a_broker_that_exits_at_start_reports_its_own_output(broker, monkeypatch):
    """The race the port check cannot close (the port taken between the check and the
    broker's bind): the broker's own error reaches the message (it was discarded)."""
    import lookalike.broker as eb

    monkeypatch.setattr(eb, "port_in_use", lambda host, port: False)
    with pytest.raises(eb.BrokerError, match="(?s)exited with code.*Address in use"):
        eb.EmbeddedBroker(port=broker.port).start(timeout_s=10)


def test_listening_ports_names_only_what_a_process_listens_on():
    """A listening socket of ours is named; a client's connected socket is not."""
    import lookalike.broker as eb

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            ours = eb.listening_ports(os.getpid())
            assert ours is not None and port in ours
            assert client.getsockname()[1] not in ours


def test_a_slow_loser_of_the_bind_race_is_not_reported_ready():
    """Another process answers on the port while ours, which never listens, takes a
    second to exit: the wait reports our exit, not readiness (a fixed grace after the
    port answered missed this on a loaded host)."""
    import lookalike.broker as eb

    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); exit(3)"])
        try:
            with pytest.raises(eb.BrokerError, match="exited with code 3"):
                eb.wait_for_port("127.0.0.1", port, 10, proc)
        finally:
            proc.kill()
            proc.wait()


def test_scoring_worker_without_checkpoint_fails_clearly(tmp_path):
    r = subprocess.run(CLI + ["worker", "scoring", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "no RALM checkpoint" in r.stderr and "lookalike train ralm" in r.stderr


def test_unknown_worker_kind_is_a_usage_error():
    r = subprocess.run(CLI + ["worker", "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "scoring, clustering" in r.stderr


def test_data_info_on_a_missing_folder_fails_clearly(tmp_path):
    r = subprocess.run(CLI + ["data", "info", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "error:" in r.stderr


def test_an_unknown_or_invalid_ralm_setting_is_a_usage_error(tmp_path):
    """`--set` names RalmConfig fields: a typo must not run an hour of evaluation with the
    defaults, and a bad value says which."""
    for cmd, pair, says in ((["evaluate", "audience", "--models", "random"], "bogus=1",
                             "unknown RalmConfig field(s) bogus"),
                            (["evaluate", "default-pipeline"], "k=0", "greater than or equal")):
        r = subprocess.run(CLI + cmd + ["--set", pair, "--cache-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in " ".join(r.stderr.split()), r.stderr


def test_study_tables_are_built_from_the_committed_runs():
    """The docs' tables come from their run folders through one CLI (no module mains)."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(CLI + ["study", "zoo-table", str(root / "docs" / "models" / "runs")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "**ours, Mult-VAE**" in r.stdout and "recall@10" in r.stdout
    r = subprocess.run(CLI + ["study", "ctr-table", str(root / "docs" / "ctr" / "runs")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dlrm" in r.stdout and "test AUC" in r.stdout
    r = subprocess.run(CLI + ["study", "lfm-compare"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "--run and --out" in r.stderr


def test_recommend_without_workers_says_so_and_exits_3(settings):
    """No scoring worker answers: a clear error naming the broker, exit 3, no traceback."""
    r = subprocess.run(CLI + ["recommend", "196", "-b", settings.kafka.bootstrap_servers,
                              "--topic-prefix", settings.kafka.topic_prefix, "--timeout", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "no answer within 1.0 s" in r.stderr and "Traceback" not in r.stderr


def test_tuning_studies_refuse_bad_settings_before_training(tmp_path):
    """The tuners are `lookalike study` commands (no scripts under docs/): a setting that
    is not JSON, or an unknown protocol, is a usage error before any training."""
    log = str(tmp_path / "tuning.jsonl")
    r = subprocess.run(CLI + ["study", "zoo-tune", "multvae", "{not json", "--log", log],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "JSON" in r.stderr
    r = subprocess.run(CLI + ["study", "ctr-tune", "--protocol", "later", "--log", log],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "ctx or time" in " ".join(r.stderr.split())
    assert not (tmp_path / "tuning.jsonl").exists()
