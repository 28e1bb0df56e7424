"""A real embedded broker for the tests, and helpers to talk to it.

One broker per test session (it starts in ~50 ms, but consumer groups take
seconds to form); every test gets its own topic prefix, so tests never see
each other's records. The broker is our own process, stopped by PID.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
from kafka import TopicPartition

from consumers.kafka import make_consumer, make_producer
from consumers.topics_admin import create_topics
from engine.config import Settings, load_settings
from engine.topics import Topics
from lookalike.broker import EmbeddedBroker

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_file=log) as b:
        yield b


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path) -> Settings:
    """Settings for one test: its own topics (prefix) and cache dir."""
    prefix = f"t{next(_counter)}-{uuid.uuid4().hex[:6]}-"
    s = load_settings(None, cache_dir=tmp_path / "cache", **{
        "kafka.bootstrap_servers": broker.bootstrap_servers,
        "kafka.topic_prefix": prefix,
        "kafka.partitions": 2,
    })
    create_topics(s.kafka)
    return s


def produce(s: Settings, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    p = make_producer(s.kafka, linger_ms=2)
    for key, value in records:
        p.send(Topics(s.kafka.topic_prefix).name(topic), key=key, value=value)
    p.flush()
    p.close()


def read_all(s: Settings, topic: str, *, expect: int | None = None, timeout_s: float = 30.0,
             full_name: str | None = None) -> list:
    """Every record of a topic from the beginning (until ``expect`` or quiet)."""
    name = full_name or Topics(s.kafka.topic_prefix).name(topic)
    c = make_consumer(s.kafka, None, fetch_max_wait_ms=50)
    parts = None
    for _ in range(50):
        parts = c.partitions_for_topic(name)
        if parts:
            break
        time.sleep(0.1)
    tps = [TopicPartition(name, p) for p in sorted(parts or [])]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out: list = []
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        got = c.poll(timeout_ms=100)
        for recs in got.values():
            out.extend(recs)
        if got:
            quiet_since = time.monotonic()
        if expect is not None and len(out) >= expect:
            break
        if expect is None and time.monotonic() - quiet_since > 1.5:
            break
    c.close()
    return out


def json_values(records: list) -> list[dict]:
    return [orjson.loads(r.value) for r in records]


def wait_until(pred, timeout_s: float = 60.0, every_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")
