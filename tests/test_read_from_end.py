"""A reader placed at a topic's end takes only what comes after it, even where the broker
reports too low an end: the embedded broker's ListOffsets answers the last batch's base
offset after multi-record batches, so "the end" re-reads that batch."""

from __future__ import annotations

import time

import torch
from kafka import TopicPartition

from consumers.kafka import make_consumer, make_producer
from consumers.runner import start_worker
from consumers.scoring import ScoringStage
from engine.codec import encode_json, key_of
from engine.synthetic import SyntheticSpec, generate
from engine.topics import Topics
from lookalike.scrape import scrape, total
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel
from tests.kafka_fixtures import wait_until


def _batches(s, topic: str, n_batches: int, per_batch: int) -> int:
    """Multi-record batches (a linger, a flush after each): the shape that shows it."""
    p = make_producer(s.kafka, linger_ms=20)
    for _ in range(n_batches):
        for _ in range(per_batch):
            p.send(topic, key=key_of(1), value=encode_json({"item_id": 1, "k": 3}))
        p.flush()
    p.close()
    return n_batches * per_batch


def test_a_worker_answers_only_audience_requests_made_after_it_started(settings):
    topic = Topics(settings.kafka.topic_prefix).audience_requests
    sent = _batches(settings, topic, 5, 37)
    c = make_consumer(settings.kafka, None)
    ends = c.end_offsets([TopicPartition(topic, p) for p in (0, 1)])
    c.close()
    print(f"{sent} requests written, ListOffsets says {sum(ends.values())}")
    time.sleep(1.5)  # the old requests are older than the reader by more than its slack
    data = generate(SyntheticSpec(n_users=100, n_items=50, clicks_per_user=5, seed=1))
    torch.manual_seed(0)
    model = RalmModel.new(RalmConfig.tiny(history_len=8), FeatureSpace.build(data, 8), "v")
    stage = ScoringStage(settings, model)
    w = start_worker(stage)
    try:
        wait_until(lambda: w.loop.ready.is_set() and stage.audience_reader is not None,
                   what="worker ready")
        p = make_producer(settings.kafka, linger_ms=0)
        p.send(topic, key=key_of(2), value=encode_json({"item_id": 2, "k": 3}))
        p.flush()
        p.close()

        def answered() -> float:
            return total(scrape(w.metrics_url), "lookalike_audiences_total", kind="request")

        wait_until(lambda: answered() >= 1, what="the new request answered")
        time.sleep(2.0)  # re-read old requests would be answered by now
        assert answered() == 1
        assert total(scrape(w.metrics_url), "lookalike_events_consumed_total",
                     topic="audience-requests") == 1
    finally:
        w.stop()
