"""Broker outages: a worker survives 30 s without a broker, shows it in its metrics,
and resumes; a broker that lost its topics gets them back; a changed layout stops it."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from kafka import KafkaAdminClient

from consumers.clustering import ClusteringStage
from consumers.loop import ConsumerLoop, TopologyLost
from consumers.runner import start_worker
from consumers.topics_admin import create_topics
from engine.codec import SeedBatch, encode_seeds, key_of
from engine.config import Settings, load_settings
from engine.topics import Topics
from lookalike.broker import EmbeddedBroker
from lookalike.scrape import scrape, total
from tests.kafka_fixtures import produce, wait_until


def _settings(bootstrap: str, partitions: int = 2) -> Settings:
    s = load_settings(None)
    return s.model_copy(update={"kafka": s.kafka.model_copy(update={
        "bootstrap_servers": bootstrap, "topic_prefix": f"out-{uuid.uuid4().hex[:6]}-",
        "partitions": partitions})})


def _broker_topics(s: Settings) -> set[str]:
    admin = KafkaAdminClient(**s.kafka.client_options(), client_id="outage-test")
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def _owns(consumer, topic: str) -> bool:
    try:
        return any(tp.topic == topic for tp in consumer.assignment())
    except Exception:  # noqa: BLE001 - a consumer being replaced (the loop's fallback)
        return False


def _seeds(s: Settings, item: int, users: range) -> None:
    rng = np.random.default_rng(item)
    batch = SeedBatch(np.array(list(users), np.int64), np.full(len(users), 1.7e9),
                      rng.normal(size=(len(users), 16)).astype(np.float32), "v")
    produce(s, "seed-events", [(key_of(item), encode_seeds(batch))])


@pytest.mark.slow
def test_a_worker_rides_out_a_30_s_outage_and_recreates_the_lost_topics(tmp_path):
    """The embedded broker stops for 30 s and comes back empty (memory storage). A worker
    shows the outage in its metrics and does not crash; back, it sees the broker again
    and recreates the dataflow's topics. (Configured for Tansu's default of 4
    partitions, so that the broker's own auto-creation cannot race it into a layout
    mismatch: that path, TopologyLost, is the next test.)"""
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    port = broker.port
    s = _settings(broker.bootstrap_servers, partitions=4)
    create_topics(s.kafka)
    stage = ClusteringStage(s)
    w = start_worker(stage)
    second = None
    try:
        wait_until(lambda: w.loop.ready.is_set(), what="clustering worker ready")
        _seeds(s, 1, range(10))
        wait_until(lambda: stage.state.seeds_held() == 10, what="seeds before the outage")

        broker.stop()
        down_at = time.monotonic()
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_broker_up") == 0,
                   timeout_s=30, what="the outage in the metrics")
        assert total(scrape(w.metrics_url), "lookalike_errors_total",
                     kind="broker_unreachable") >= 1
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert w.thread.is_alive()  # no crash on connection loss

        second = EmbeddedBroker(port=port, log_file=tmp_path / "broker2.log").start()
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_broker_up") == 1,
                   timeout_s=60, what="the broker back in the metrics")
        names = Topics(s.kafka.topic_prefix)
        wait_until(lambda: set(names.all()) <= _broker_topics(s), timeout_s=30,
                   what="topics recreated")
        assert w.thread.is_alive() and w.loop.failure is None
        # processing resumes on the recreated topics: the consumer sees their new
        # partitions and rejoins its group (ConsumerLoop.ensure_topics)
        wait_until(lambda: stage.loop is not None and stage.loop.consumer is not None
                   and _owns(stage.loop.consumer, names.name("seed-events")),
                   timeout_s=150, what="partitions assigned again")
        _seeds(s, 2, range(5))
        wait_until(lambda: 2 in stage.state.items and len(stage.state.items[2].window) == 5,
                   timeout_s=60, what="seeds after the outage")
    finally:
        w.stop()
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
