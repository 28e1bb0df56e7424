"""Requests before clicks: while score requests wait, the clicks partitions are paused."""

from __future__ import annotations

import threading
import time

import orjson
import torch

from consumers.kafka import make_producer
from consumers.loop import ConsumerLoop
from consumers.scoring import ScoringStage
from engine.codec import key_of
from engine.config import Settings
from engine.data import Dataset
from engine.synthetic import SyntheticSpec, generate
from engine.topics import Topics
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel
from tests.kafka_fixtures import wait_until


def _stage(settings: Settings, max_click_pause_s: float) -> tuple[ScoringStage, Dataset]:
    data = generate(SyntheticSpec(n_users=300, n_items=200, clicks_per_user=10, seed=1))
    torch.manual_seed(0)
    model = RalmModel.new(RalmConfig.tiny(history_len=8), FeatureSpace.build(data, 8), "v")
    s = settings.model_copy(update={"scoring": settings.scoring.model_copy(
        update={"max_click_pause_s": max_click_pause_s})})
    return ScoringStage(s, model), data


def _click(i: int, data: Dataset) -> bytes:
    return orjson.dumps({"user_id": i % 300, "item_id": int(data.items.ids[i % 200])})


def test_waiting_requests_pause_the_clicks_until_they_are_answered(settings):
    names = Topics(settings.kafka.topic_prefix)
    producer = make_producer(settings.kafka)
    stage, data = _stage(settings, max_click_pause_s=600)  # no bound within this test
    stage.max_poll_records = 50  # a poll takes a sliver of the backlogs
    loop = ConsumerLoop(stage)
    loop.open()
    try:
        wait_until(lambda: loop.poll_once() is not None and loop.consumer.assignment(),
                   what="partitions assigned")
        paused_with_requests_waiting = False
        for attempt in range(20):
            for i in range(5_000):  # a click backlog, then a request behind it
                producer.send(names.clicks, key=key_of(i % 300), value=_click(i, data))
            for j in range(300):  # more requests than one poll takes
                producer.send(names.score_requests, key=key_of(j % 300), value=orjson.dumps(
                    {"user_id": j % 300, "request_id": f"r{attempt}-{j}"}))
            producer.flush()
            for _ in range(30):
                loop.poll_once()
                if loop.consumer.paused():  # tick found requests waiting and paused clicks
                    paused_with_requests_waiting = True
                    break
            if paused_with_requests_waiting:
                break
        assert paused_with_requests_waiting
        paused = set(loop.consumer.paused())
        assert paused and {tp.topic for tp in paused} == {names.clicks}
        # while paused, polls bring requests only; once none waits, clicks resume
        before = stage.metrics.registry.get_sample_value(
            "lookalike_events_consumed_total", {"stage": "scoring", "topic": "clicks"})
        wait_until(lambda: loop.poll_once() is not None and not loop.consumer.paused(),
                   timeout_s=30, what="clicks resumed")
        assert stage.metrics.registry.get_sample_value(
            "lookalike_requests_first_total", {"stage": "scoring"}) >= 1
        assert stage.metrics.registry.get_sample_value(
            "lookalike_events_consumed_total", {"stage": "scoring", "topic": "clicks"}
        ) == before  # no click was taken while a request waited
    finally:
        producer.close()
        loop.close()


def test_a_steady_request_stream_does_not_starve_the_clicks(settings):
    """Requests always waiting (a producer thread keeps them coming faster than the
    worker takes them, clicks alongside): clicks are paused for at most
    ``max_click_pause_s`` in a row, so they are still consumed."""
    names = Topics(settings.kafka.topic_prefix)
    producer = make_producer(settings.kafka, linger_ms=0)
    stage, data = _stage(settings, max_click_pause_s=0.2)
    stage.max_poll_records = 5  # at most ~250 requests/s taken: they keep waiting
    loop = ConsumerLoop(stage)
    loop.open()
    stop = threading.Event()

    def feed() -> None:  # ~500 requests/s and ~100 clicks/s
        j = 0
        while not stop.is_set():
            for _ in range(25):
                producer.send(names.score_requests, key=key_of(j % 300),
                              value=orjson.dumps({"user_id": j % 300, "request_id": f"s{j}"}))
                j += 1
            for i in range(j - 5, j):
                producer.send(names.clicks, key=key_of(i % 300), value=_click(i, data))
            producer.flush()
            time.sleep(0.05)

    def consumed(topic: str) -> float:
        return stage.metrics.registry.get_sample_value(
            "lookalike_events_consumed_total", {"stage": "scoring", "topic": topic}) or 0.0

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        wait_until(lambda: loop.poll_once() is not None and loop.consumer.assignment(),
                   what="partitions assigned")
        feeder.start()
        wait_until(lambda: loop.poll_once() is not None and consumed("score-requests") > 100
                   and bool(loop.consumer.paused()),
                   timeout_s=60, every_s=0.02, what="requests first, clicks paused")
        before = consumed("clicks")
        wait_until(lambda: loop.poll_once() is not None and consumed("clicks") > before + 50,
                   timeout_s=60, every_s=0.02, what="clicks consumed while requests keep coming")
        assert stage.metrics.registry.get_sample_value(
            "lookalike_requests_first_total", {"stage": "scoring"}) >= 1
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(10)
        producer.close()
        loop.close()
