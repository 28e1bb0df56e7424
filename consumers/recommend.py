"""A client of the scoring workers: score requests out, their recommendations back."""

from __future__ import annotations

import time

import orjson
from kafka import TopicPartition

from consumers.kafka import make_consumer, make_producer
from engine.codec import encode_json, key_of
from engine.config import Settings
from engine.topics import Topics


def request_recommendations(s: Settings, requests: list[dict], timeout_s: float = 60.0
                            ) -> dict[str, dict]:
    """Send score requests (each with a ``request_id``) and collect the matching
    recommendation records by request id; those not answered in time are missing."""
    names = Topics(s.kafka.topic_prefix)
    reader = make_consumer(s.kafka, None, fetch_max_wait_ms=10)
    parts = reader.partitions_for_topic(names.recommendations) or {0}
    tps = [TopicPartition(names.recommendations, p) for p in parts]
    reader.assign(tps)
    reader.seek_to_end(*tps)
    for tp in tps:
        reader.position(tp)
    producer = make_producer(s.kafka, linger_ms=0)
    for r in requests:
        producer.send(names.score_requests, key=key_of(r["user_id"]), value=encode_json(r))
    producer.flush()
    producer.close()
    wanted = {r["request_id"] for r in requests}
    got: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while wanted - got.keys() and time.monotonic() < deadline:
        for records in reader.poll(timeout_ms=200).values():
            for rec in records:
                obj = orjson.loads(rec.value)
                obj["received_at"] = time.time()
                if obj.get("request_id") in wanted:
                    got[obj["request_id"]] = obj
    reader.close()
    return got
