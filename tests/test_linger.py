"""``kafka.linger_ms`` on the embedded broker: a worker holds a topic's outputs for its
linger, so the broker gets one batch per partition per linger instead of one per poll,
and the inputs are still committed only once those outputs are acknowledged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kafka import TopicPartition

from consumers.clustering import ClusteringStage
from consumers.kafka import make_consumer, make_producer
from consumers.runner import start_worker
from consumers.topics_admin import create_topics
from engine.config import KafkaConfig, Settings, load_settings
from engine.metrics import WorkerMetrics
from engine.topics import SEED_EVENTS, Topics
from lookalike.broker import LONG_RUN_BATCH_BYTES, LONG_RUN_LINGER_MS, long_run_settings
from lookalike.pipeline import WorkerProcess, broker_curve, freshness_line
from lookalike.scrape import scrape, total
from tests.kafka_fixtures import read_all, wait_until

BAD = 40  # records a worker must dead-letter, produced one poll apart
GAP_S = 0.025


def _trickle_bad_seeds(s: Settings) -> float:
    """``BAD`` undecodable seed-event records, each in its own batch, ``GAP_S`` apart:
    the clustering worker reads most of them in polls of their own. How long it took."""
    t0 = time.monotonic()
    p = make_producer(s.kafka, linger_ms=0)
    topic = Topics(s.kafka.topic_prefix).seed_events
    try:
        for j in range(BAD):
            p.send(topic, key=b"k", value=b"\x00not a seed %d" % j, partition=j % 2)
            p.flush()
            time.sleep(GAP_S)
    finally:
        p.close()
    return time.monotonic() - t0


def _committed(s: Settings, stage: str, topic: str) -> dict[int, int]:
    name = Topics(s.kafka.topic_prefix).name(topic)
    c = make_consumer(s.kafka, f"{s.kafka.topic_prefix}lookalike-{stage}")
    try:
        tps = [TopicPartition(name, p) for p in range(s.kafka.partitions)]
        return {tp.partition: c.committed(tp) or 0 for tp in tps}
    finally:
        c.close(autocommit=False)


def _dead_letter_batches(s: Settings, linger_ms: int
                         ) -> tuple[float, float, dict[int, int], list]:
    """Run a clustering worker over the trickle; its dlq batches, the trickle's length,
    the group's commits read while it runs, and the dead letters on the broker after."""
    s = s.model_copy(update={"kafka": s.kafka.model_copy(
        update={"linger_ms": {"dlq": linger_ms}})})
    w = start_worker(ClusteringStage(s))
    try:
        wait_until(lambda: w.loop.ready.is_set(), what="partitions assigned")
        trickle_s = _trickle_bad_seeds(s)
        committed = _committed(s, "clustering", SEED_EVENTS)  # while it may still hold some
        dead = read_all(s, "", full_name=Topics(s.kafka.topic_prefix).dlq(SEED_EVENTS),
                        expect=BAD, timeout_s=20)
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_batches_produced_total",
                                 topic="seed-events.dlq") > 0, what="batches counted")
        batches = total(scrape(w.metrics_url), "lookalike_batches_produced_total",
                        topic="seed-events.dlq")
    finally:
        w.stop()
    return batches, trickle_s, committed, dead


@pytest.mark.slow
def test_linger_bounds_batches_and_commits_follow_delivery(settings: Settings) -> None:
    prefix = settings.kafka.topic_prefix
    at_once, _, _, dead_now = _dead_letter_batches(settings, 0)
    held_s = 0.4
    lingered_settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(
        update={"topic_prefix": prefix + "l-"})})
    create_topics(lingered_settings.kafka)
    held, trickle_s, committed, dead = _dead_letter_batches(lingered_settings,
                                                            int(held_s * 1000))

    assert len(dead_now) == BAD and len(dead) == BAD  # nothing held is lost
    assert held <= trickle_s / held_s + 3, (held, at_once)  # one batch per partition per linger
    assert at_once >= 3 * held, (held, at_once)
    # every record below the group's commit has its dead letter on the broker: the commit
    # came after their delivery, however long they were held
    letters = {(int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"]))
               for r in dead}
    for p, upto in committed.items():
        assert all((p, o) in letters for o in range(upto)), (p, upto)


def test_linger_settings_are_checked() -> None:
    assert KafkaConfig(linger_ms={"dlq": 100, "seed-events": 0}).linger_ms["dlq"] == 100
    with pytest.raises(ValueError, match="unknown topics"):
        KafkaConfig(linger_ms={"seed-event": 50})
    with pytest.raises(ValueError, match=">= 0"):
        KafkaConfig(linger_ms={"recommendations": -1})


def test_long_runs_on_the_embedded_broker_linger_unless_told_otherwise() -> None:
    s = load_settings(None)
    long = long_run_settings(s)
    assert long.kafka.linger_ms == LONG_RUN_LINGER_MS
    assert long.kafka.batch_bytes == LONG_RUN_BATCH_BYTES
    assert min(long.kafka.linger_ms.values()) >= 100  # every topic, answers included
    own = s.model_copy(update={"kafka": s.kafka.model_copy(
        update={"linger_ms": {"seed-events": 5}, "batch_bytes": 64 * 1024})})
    kept = long_run_settings(own)
    assert kept.kafka.linger_ms == {"seed-events": 5} and kept.kafka.batch_bytes == 64 * 1024


def test_the_demo_writes_the_broker_cpu_curve(tmp_path, capsys) -> None:
    samples = [(10.0 * (j + 1), 0.1 + 0.01 * j) for j in range(12)]
    broker_curve(samples, tmp_path)
    curve = json.loads((tmp_path / "broker_cpu.json").read_text())
    assert [c["cores"] for c in curve] == pytest.approx([c for _, c in samples], abs=1e-4)
    assert (tmp_path / "broker_cpu.png").stat().st_size > 5_000
    out = capsys.readouterr().out
    assert "0.105 cores in the first sixth" in out and "0.205 in the last" in out


def test_the_demo_reports_freshness_scraped_from_its_scoring_workers() -> None:
    """Two workers' histograms merged: the mean from their sums, p99 as a bucket bound."""
    servers, workers = [], []
    try:
        for seconds in ([0.3] * 60, [0.7] * 39 + [3.0]):
            m = WorkerMetrics("scoring")
            for x in seconds:
                m.freshness.labels("scoring").observe(x)
            server, port = m.serve(0)
            servers.append(server)
            workers.append(WorkerProcess("scoring", None, f"http://127.0.0.1:{port}/metrics",
                                         Path("unused")))  # type: ignore[arg-type]
        line = freshness_line(workers)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    mean = (60 * 0.3 + 39 * 0.7 + 3.0) / 100
    assert f"100 clicks): mean {mean:.2f} s, p99 <= 1 s" in line
    assert "no click" in freshness_line(workers[:0])
