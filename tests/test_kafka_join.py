"""A consumer that polls briefly, with work between polls, still joins its group.

The embedded broker holds a first JoinGroup for about 5 s, so the join always
finishes between two short polls. kafka-python 3.0.12 then threw the finished
join away and joined again, forever (``consumers/kafka_join.py``).
"""

from __future__ import annotations

import time

from kafka.coordinator.base import BaseCoordinator

from consumers import kafka_join
from consumers.kafka import make_consumer
from engine.topics import Topics


def test_a_join_that_finishes_between_short_polls_is_kept(settings):
    consumer = make_consumer(settings.kafka, f"{settings.kafka.topic_prefix}join")
    consumer.subscribe([Topics(settings.kafka.topic_prefix).name("clicks")])
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=1)
            time.sleep(0.3)  # a batch's work between polls
        assert {tp.partition for tp in consumer.assignment()} == {0, 1}
    finally:
        consumer.close()


def test_the_fix_is_applied_once_and_only_while_the_library_needs_it():
    assert kafka_join.apply() is True  # already applied when consumers.kafka was imported
    patched = BaseCoordinator.join_group_async
    assert kafka_join.apply() is True and BaseCoordinator.join_group_async is patched
    assert kafka_join.needs_fix()  # the pinned kafka-python; an upstream fix retires the patch
