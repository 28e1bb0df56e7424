"""Client settings for integrators: a request's round trip through the scoring worker
with the producer and consumer settings an integrator would start from, and with the
settings docs/topics.md recommends, for kafka-python and librdkafka (confluent-kafka).

Why a bench: most of an outside client's latency is its own waiting (a consumer's
fetch wait, a producer's linger), and a librdkafka producer with its default
partitioner (CRC32, not murmur2) sends half of the requests to a partition that is not
their user's, where the worker forwards them: one more trip through the broker. Part
of ``lookalike bench score``: the worker and the table are that bench's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
from tqdm import tqdm

from consumers.kafka import assign_all, make_consumer, make_producer
from engine.codec import encode_json, key_of
from engine.config import Settings
from engine.topics import Topics


@dataclass(frozen=True)
class Setting:
    client: str
    label: str
    producer: dict
    consumer: dict


#: kafka-python: its defaults (fetch_max_wait_ms 500, linger_ms 0) and the recommended
#: fetch wait; librdkafka: its defaults (consistent_random partitioner, fetch.wait.max.ms
#: 500, linger.ms 5) and the recommended ones
SETTINGS = (
    Setting("kafka-python", "defaults", {"linger_ms": 0}, {"fetch_max_wait_ms": 500}),
    Setting("kafka-python", "fetch_max_wait_ms=10", {"linger_ms": 0},
            {"fetch_max_wait_ms": 10}),
    Setting("librdkafka", "defaults", {}, {}),
    Setting("librdkafka", "partitioner=murmur2_random, linger.ms=0, fetch.wait.max.ms=10",
            {"partitioner": "murmur2_random", "linger.ms": 0}, {"fetch.wait.max.ms": 10}),
)

Ask = Callable[[int, int], None]  # (user, i): send request i for user
Wait = Callable[[str], bool]  # request id: whether its answer arrived (polls a little)


def round_trips(s: Settings, users: list[int], progress: bool) -> list[tuple[Setting,
                                                                            np.ndarray]]:
    """Seconds per request, produced -> its answer consumed, one in flight, per setting
    (librdkafka's only when confluent-kafka is installed)."""
    out = []
    for setting in SETTINGS:
        run = kafka_python_round_trips if setting.client == "kafka-python" else _librdkafka
        got = run(s, setting, users, progress)
        if got is not None:
            out.append((setting, got))
    return out


def _ping(ask: Ask, wait: Wait, users: list[int], desc: str, progress: bool,
          timeout_s: float = 30.0) -> np.ndarray:
    ask(users[0], -1)  # warm-up: connections, metadata, the reader's position
    deadline = time.monotonic() + timeout_s
    while not wait("clients--1"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{desc}: no answer to the warm-up request")
    out = []
    for i, u in enumerate(tqdm(users, desc=desc, unit="req", disable=not progress,
                               mininterval=0.5)):
        t0 = time.perf_counter()
        ask(u, i)
        while not wait(f"clients-{i}"):
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"{desc}: no answer to request {i} in {timeout_s:.0f} s")
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def _request(user: int, i: int) -> bytes:
    return encode_json({"user_id": user, "k": 10, "request_id": f"clients-{i}"})


def kafka_python_round_trips(s: Settings, setting: Setting, users: list[int],
                             progress: bool, topics: tuple[str, str] | None = None
                             ) -> np.ndarray:
    """Round trips with a kafka-python client; ``topics``: (requests, answers), full
    names (default: the dataflow's score-requests and recommendations)."""
    names = Topics(s.kafka.topic_prefix)
    requests, answers = topics or (names.score_requests, names.recommendations)
    producer = make_producer(s.kafka, **setting.producer)
    consumer = make_consumer(s.kafka, None, **setting.consumer)
    seen: set[str] = set()
    try:
        assign_all(consumer, answers)

        def ask(user: int, i: int) -> None:
            producer.send(requests, key=key_of(user), value=_request(user, i))
            producer.flush()

        def wait(rid: str) -> bool:
            for records in consumer.poll(timeout_ms=100, max_records=1).values():
                seen.update(orjson.loads(r.value).get("request_id") for r in records)
            return rid in seen

        return _ping(ask, wait, users, f"kafka-python {setting.label}", progress)
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=5)


def _librdkafka(s: Settings, setting: Setting, users: list[int], progress: bool
                ) -> np.ndarray | None:
    try:
        from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
    except ImportError:
        return None
    if s.kafka.security_protocol != "PLAINTEXT":
        return None  # the rows are for the embedded broker's plain listener
    names = Topics(s.kafka.topic_prefix)
    common = {"bootstrap.servers": s.kafka.bootstrap_servers}
    producer = Producer({**common, **setting.producer})
    consumer = Consumer({**common, "group.id": f"bench-clients-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, **setting.consumer})
    seen: set[str] = set()
    try:
        topic = names.recommendations
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])

        def ask(user: int, i: int) -> None:
            producer.produce(names.score_requests, key=key_of(user), value=_request(user, i))
            producer.flush()

        def wait(rid: str) -> bool:
            msg = consumer.poll(0.1)
            if msg is not None and not msg.error():
                seen.add(orjson.loads(msg.value()).get("request_id"))
            return rid in seen

        return _ping(ask, wait, users, f"librdkafka {setting.label}", progress)
    finally:
        consumer.close()
