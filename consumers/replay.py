"""Replay a dataset's clicks onto ``clicks`` in timestamp order, keyed by user.

Speed is either a fixed rate (events per second), a time compression of the
dataset's own clock (``speedup=3600``: an hour of clicks per second), or as
fast as the producer goes (neither). Each click carries the user's profile so
that the scoring worker needs no side table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from consumers.kafka import make_producer
from engine.codec import Click, encode_click, key_of
from engine.config import KafkaConfig
from engine.data import Dataset, profiles_of
from engine.topics import CLICKS, Topics


@dataclass(frozen=True)
class ReplayReport:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


class Pacer:
    """Sleeps so that event i goes out at its scheduled wall time."""

    def __init__(self, ts: np.ndarray, rate: float | None, speedup: float | None):
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 events/s")
        if speedup is not None and speedup <= 0:
            raise ValueError("speedup must be > 0")
        if rate:
            self.offsets = np.arange(len(ts)) / rate
        elif speedup:
            self.offsets = (ts - ts[0]) / speedup if len(ts) else ts
        else:
            self.offsets = None
        self.t0 = time.monotonic()

    def wait(self, i: int) -> None:
        if self.offsets is None:
            return
        delay = self.t0 + self.offsets[i] - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)


def replay(
    ds: Dataset,
    kafka: KafkaConfig,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    progress: bool = True,
    skip: int = 0,
) -> ReplayReport:
    """Produce the dataset's clicks ``skip`` to ``limit``; returns how many and how long
    it took (``skip``: continue an earlier replay where it stopped)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    topic = Topics(kafka.topic_prefix).clicks
    profiles = profiles_of(ds)
    users, items, ts = ds.users.ids[ds.user[:n]], ds.items.ids[ds.item[:n]], ds.ts[:n]
    prof_idx = ds.user[:n]
    pacer = Pacer(ts[skip:], rate, speedup)
    producer = make_producer(kafka, linger_ms=kafka.linger_ms.get(CLICKS, 10))
    t0 = time.perf_counter()
    try:
        for i in tqdm(range(skip, n), desc="replay", unit="click", disable=not progress,
                      mininterval=0.5, smoothing=0.1):
            pacer.wait(i - skip)
            u = int(users[i])
            click = Click(u, int(items[i]), float(ts[i]), profiles[prof_idx[i]])
            producer.send(topic, key=key_of(u), value=encode_click(click))
        producer.flush()
    finally:
        producer.close(timeout=10)
    return ReplayReport(max(0, n - skip), time.perf_counter() - t0)
