"""Broker outages: a worker survives 30 s without a broker, shows it in its metrics,
and resumes; a broker that lost its topics gets them back; a changed layout stops it."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from consumers.clustering import ClusteringStage
from consumers.loop import ConsumerLoop, TopologyLost
from consumers.runner import start_worker
from engine.broker import EmbeddedBroker
from engine.codec import SeedBatch, encode_seeds, key_of
from engine.config import Settings, load_settings
from engine.pipeline import spawn_worker, wait_ready
from engine.scrape import scrape, total
from engine.topics import Topics, create_topics
from tests.kafka_fixtures import produce, wait_until


def _settings(bootstrap: str, partitions: int = 2) -> Settings:
    s = load_settings(None)
    return s.model_copy(update={"kafka": s.kafka.model_copy(update={
        "bootstrap_servers": bootstrap, "topic_prefix": f"out-{uuid.uuid4().hex[:6]}-",
        "partitions": partitions})})


def _seeds(s: Settings, item: int, users: range) -> None:
    rng = np.random.default_rng(item)
    batch = SeedBatch(np.array(list(users), np.int64), np.full(len(users), 1.7e9),
                      rng.normal(size=(len(users), 16)).astype(np.float32), "v")
    produce(s, "seed-events", [(key_of(item), encode_seeds(batch))])


@pytest.mark.slow
def test_workers_ride_out_a_30_s_outage_then_resume_or_stop_clearly(tmp_path):
    """The embedded broker stops for 30 s and comes back empty (memory storage). A worker
    shows the outage in its metrics and does not crash. Back, the broker auto-creates
    the subscribed topic with its own default of 4 partitions: a worker configured for 4
    recreates the other topics and resumes; a `lookalike worker` configured for 2 stops
    with the reason and exit status 3 (its keys would otherwise move between workers)."""
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    port = broker.port
    s = _settings(broker.bootstrap_servers, partitions=4)
    two = _settings(broker.bootstrap_servers, partitions=2)
    for x in (s, two):
        create_topics(x.kafka)
    stage = ClusteringStage(s)
    w = start_worker(stage)
    proc = spawn_worker("clustering", two, tmp_path / "unused.pt", tmp_path, 0)
    second = None
    try:
        wait_until(lambda: w.loop.ready.is_set(), what="clustering worker ready")
        wait_ready([proc])
        _seeds(s, 1, range(10))
        wait_until(lambda: stage.state.seeds_held() == 10, what="seeds before the outage")

        broker.stop()
        down_at = time.monotonic()
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_broker_up") == 0,
                   timeout_s=30, what="the outage in the metrics")
        assert total(scrape(w.metrics_url), "lookalike_errors_total",
                     kind="broker_unreachable") >= 1
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert w.thread.is_alive() and proc.proc.poll() is None  # no crash on connection loss

        second = EmbeddedBroker(port=port, log_file=tmp_path / "broker2.log").start()
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_broker_up") == 1,
                   timeout_s=60, what="the broker back in the metrics")
        names = Topics(s.kafka.topic_prefix)
        wait_until(lambda: set(names.all()) <= set(w.loop.consumer.topics()), timeout_s=30,
                   what="topics recreated")
        wait_until(lambda: len(w.loop.consumer.assignment()) == 4, timeout_s=90,
                   what="the worker rejoined its group on the new topics")
        _seeds(s, 2, range(100, 105))
        wait_until(lambda: 2 in stage.state.items and set(stage.state.items[2].window.users())
                   == set(range(100, 105)), timeout_s=90, what="seeds after the outage")
        assert w.thread.is_alive() and w.loop.failure is None

        # the 2-partition worker: which comes first after the outage, the broker's
        # auto-created topic (4 partitions) or the worker's own (2), is a race; either
        # it stops clearly, or it recreated the layout and processes again
        _seeds(two, 3, range(200, 203))

        def settled() -> bool:
            if proc.proc.poll() is not None:
                return True
            try:
                return total(scrape(proc.metrics_url), "lookalike_seed_window_seeds") == 3
            except OSError:
                return False
        wait_until(settled, timeout_s=60, what="the 2-partition worker stopped or resumed")
        if proc.proc.poll() is not None:
            assert proc.proc.returncode == 3
            assert "other partition counts than kafka.partitions = 2" in proc.log_path.read_text()
    finally:
        w.stop()
        proc.stop()
        for b in (broker, second):
            if b is not None:
                b.stop()


def test_topics_with_another_partition_count_stop_the_loop_with_a_clear_error(settings):
    create_topics(settings.kafka)  # 2 partitions each (the fixture's settings)
    more = settings.model_copy(update={"kafka": settings.kafka.model_copy(
        update={"partitions": 3})})
    loop = ConsumerLoop(ClusteringStage(more))
    loop.open()
    try:
        with pytest.raises(TopologyLost, match="kafka.partitions = 3"):
            loop.ensure_topics()
    finally:
        loop.close()
