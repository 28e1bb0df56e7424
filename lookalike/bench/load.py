"""The soak's load: clicks and score requests at fixed rates from their own producers,
answers matched by request id, a few bad clicks on demand (``lookalike bench soak``)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import orjson

from consumers.kafka import BatchCounter, make_producer
from engine.codec import encode_json, key_of
from engine.config import Settings
from engine.data import Dataset, profiles_of
from engine.topics import CLICKS, SCORE_REQUESTS, Topics
from lookalike.bench.freshness import _tail

#: the load generators' linger by topic where ``kafka.linger_ms`` names none (on the
#: embedded broker the soak runs with ``broker.LONG_RUN_LINGER_MS``, which does). Latency
#: counts from before the send, so it includes this. Why they batch: the embedded
#: broker's memory storage costs every fetch that returns data time in proportion to the
#: batches the partition holds, and one request per batch at 500/s stalled the third
#: soak's broker after two minutes (docs/bench.md)
PUMP_LINGER_MS = {"clicks": 100, "score-requests": 20}


def pump_linger(s: Settings, topic: str) -> int:
    return s.kafka.linger_ms.get(topic, PUMP_LINGER_MS[topic])


@dataclass
class Pumps:
    """The load: clicks and requests at fixed rates, answers matched by request id."""

    s: Settings
    clicks: list[bytes]  # encoded click values (keys alongside)
    keys: list[bytes]
    users: np.ndarray
    click_rate: float
    request_rate: float
    stop: threading.Event = field(default_factory=threading.Event)
    sent_at: dict[str, float] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (answered at, s)
    clicks_sent: int = 0
    requests_sent: int = 0
    bad_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    drain_until: float = float("inf")  # after stop: how long answers are still awaited
    batches: BatchCounter = field(default_factory=BatchCounter)  # the pumps' own
    started: float = 0.0

    def start(self) -> list[threading.Thread]:
        self.started = time.monotonic()
        threads = [threading.Thread(target=f, daemon=True, name=f"soak-{f.__name__}")
                   for f in (self.run_clicks, self.run_requests, self.run_answers)]
        for t in threads:
            t.start()
        return threads

    def finish(self, threads: list[threading.Thread], drain_s: float) -> None:
        """Stop sending; answers are still awaited for ``drain_s``."""
        self.drain_until = time.monotonic() + drain_s
        self.stop.set()
        for t in threads:
            t.join(60)

    def run_clicks(self) -> None:
        names = Topics(self.s.kafka.topic_prefix)
        producer = make_producer(self.s.kafka, linger_ms=pump_linger(self.s, CLICKS))
        t0, n = time.monotonic(), len(self.clicks)
        try:
            while not self.stop.is_set():
                due = int((time.monotonic() - t0) * self.click_rate)
                while self.clicks_sent < due:
                    j = self.clicks_sent % n
                    f = producer.send(names.clicks, key=self.keys[j], value=self.clicks[j])
                    with self.lock:
                        self.batches.add(CLICKS, f)
                    self.clicks_sent += 1
                time.sleep(0.005)
            producer.flush()
        finally:
            producer.close(timeout=10)

    def run_requests(self) -> None:
        names = Topics(self.s.kafka.topic_prefix)
        producer = make_producer(self.s.kafka,
                                 linger_ms=pump_linger(self.s, SCORE_REQUESTS))
        rng = np.random.default_rng(1)
        t0 = time.monotonic()
        try:
            while not self.stop.is_set():
                due = int((time.monotonic() - t0) * self.request_rate)
                while self.requests_sent < due:
                    user = int(self.users[rng.integers(len(self.users))])
                    rid = f"soak-{self.requests_sent}"
                    with self.lock:
                        self.sent_at[rid] = time.monotonic()
                    f = producer.send(names.score_requests, key=key_of(user),
                                      value=encode_json({"user_id": user, "request_id": rid}))
                    with self.lock:
                        self.batches.add(SCORE_REQUESTS, f)
                    self.requests_sent += 1
                time.sleep(0.002)
            producer.flush()
        finally:
            producer.close(timeout=10)

    def run_answers(self) -> None:
        consumer = _tail(self.s, Topics(self.s.kafka.topic_prefix).recommendations)
        try:
            while not self.stop.is_set() or self.sent_at:
                for records in consumer.poll(timeout_ms=100).values():
                    now = time.monotonic()
                    for r in records:
                        rid = orjson.loads(r.value).get("request_id")
                        with self.lock:
                            sent = self.sent_at.pop(rid, None)
                        if sent is not None:
                            self.latencies.append((now, now - sent))
                if self.stop.is_set() and time.monotonic() > self.drain_until:
                    break
        finally:
            consumer.close(autocommit=False)

    def inject_bad(self, n: int) -> None:
        """Clicks a worker must dead-letter (``not_json``), among the good ones."""
        producer = make_producer(self.s.kafka, linger_ms=0)
        try:
            for _ in range(n):
                producer.send(Topics(self.s.kafka.topic_prefix).clicks, key=b"1",
                              value=b"{not json")
            producer.flush()
        finally:
            producer.close(timeout=10)
        self.bad_sent += n


def click_pool(ds: Dataset, n: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """``n`` clicks of ml-100k's users on its items, popularity as in the data (rows drawn
    with replacement), with profiles, no timestamps (the worker stamps arrival)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(len(ds), size=n)
    profiles = profiles_of(ds)
    values, keys = [], []
    for r in rows.tolist():
        u, i, p = int(ds.users.ids[ds.user[r]]), int(ds.items.ids[ds.item[r]]), profiles[ds.user[r]]
        body = {"user_id": u, "item_id": i}
        if p is not None:
            body["profile"] = {k: v for k, v in asdict(p).items() if v is not None}
        values.append(encode_json(body))
        keys.append(key_of(u))
    return values, keys


