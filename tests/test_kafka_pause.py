"""Pausing a partition while its records are in line must not stall it for good.

kafka-python 3.0.12 parks such records and never gives them back once another
partition's batch has been read (``consumers.kafka.poll`` has the details); the
scoring worker pauses its clicks this way whenever requests wait; every worker
polls through ``consumers.kafka.poll``."""

from __future__ import annotations

import time

from kafka import TopicPartition

from consumers.kafka import make_consumer, make_producer, poll
from consumers.topics_admin import create_topic


def test_a_partition_paused_mid_batch_delivers_everything_after_resume(settings):
    topic = f"{settings.kafka.topic_prefix}pause-probe"
    create_topic(settings.kafka, topic, partitions=2)
    a, b = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = make_producer(settings.kafka, linger_ms=0)
    for i in range(200):
        producer.send(topic, value=b"a%d" % i, partition=0)
        producer.send(topic, value=b"b%d" % i, partition=1)
    producer.flush()
    consumer = make_consumer(settings.kafka, None, fetch_max_wait_ms=10, max_poll_records=10)
    consumer.assign([a, b])
    consumer.seek_to_beginning(a, b)
    got: dict[TopicPartition, int] = {a: 0, b: 0}
    try:
        # read until A's batch is in line, part-drained (10 records a poll)
        deadline = time.monotonic() + 20
        while got[a] == 0 and time.monotonic() < deadline:
            for tp, recs in poll(consumer, 200).items():
                got[tp] += len(recs)
        assert 0 < got[a] < 200
        consumer.pause(a)  # A's rest is parked; B goes on and is read to its end
        deadline = time.monotonic() + 20
        while got[b] < 200 and time.monotonic() < deadline:
            for tp, recs in poll(consumer, 200).items():
                got[tp] += len(recs)
        assert got[b] == 200
        consumer.resume(a)
        deadline = time.monotonic() + 20
        while got[a] < 200 and time.monotonic() < deadline:
            for tp, recs in poll(consumer, 200).items():
                got[tp] += len(recs)
        assert got[a] == 200  # with consumer.poll alone: stuck where it was paused
    finally:
        consumer.close(autocommit=False)
        producer.close()
