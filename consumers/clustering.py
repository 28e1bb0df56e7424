"""Clustering worker: seed-events -> seed windows -> centroids -> seed-centroids.

Item-partitioned: the group spreads ``seed-events`` partitions (keyed by item)
over the workers, and each keeps the windows and centroids of its items.

State recovery (first version): ``seed-events`` is the changelog of the
windows. A worker that is assigned a partition replays it from the beginning;
window updates are idempotent and k-means steps deterministic, so the
rebuilt state and the centroids it republishes equal the ones lost. Snapshots
with offsets (bounded replay) replace this when the log outgrows memory.
"""

from __future__ import annotations

import time

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.loop import Event, Stage
from engine import topics as T
from engine.clustering import ItemClusters, decode_poll
from engine.codec import decode_key, encode_centroids, key_of
from engine.config import Settings


class ClusteringStage(Stage):
    name = "clustering"
    topics = (T.SEED_EVENTS,)
    fetch_max_wait_ms = 50

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.state = ItemClusters(settings.window)
        self._partition_of: dict[int, int] = {}

    def decode(self, topic: str, record: ConsumerRecord) -> tuple[int, bytes | None]:
        """The key only: values are checked and decoded a poll at a time (``decode_poll``)."""
        return decode_key(record.key), record.value

    def handle(self, events: list[Event]) -> None:
        produced: dict[int, int] = {}  # item -> newest click produce time (ms) it carries
        items = [ev.value[0] for ev in events]
        t0 = time.perf_counter()
        runs, bad = decode_poll(items, [ev.value[1] for ev in events])
        for i, err in bad:
            assert self.loop is not None
            self.loop.dead_letter(events[i].topic, events[i].record, err)
        for ev, item in zip(events, items):
            self._partition_of[item] = ev.record.partition
            produced[item] = max(produced.get(item, 0), ev.record.timestamp)
        changed: dict[int, None] = {}
        for cols in runs:
            changed.update(dict.fromkeys(self.state.apply_columns(cols)))
        self.metrics.kmeans_seconds.labels(self.name).observe(time.perf_counter() - t0)
        now = time.time()
        for item in changed:
            record = encode_centroids(self.state.record(item, now))
            self.send(T.SEED_CENTROIDS, key_of(item), record, timestamp_ms=produced[item])
        self.metrics.centroids_published.labels(self.name).inc(len(changed))
        self._report_state()

    def _report_state(self) -> None:
        self.metrics.window_items.labels(self.name).set(len(self.state))
        self.metrics.window_seeds.labels(self.name).set(self.state.seeds_held())

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        assert self.loop is not None and self.loop.consumer is not None
        if partitions:
            self.loop.consumer.seek_to_beginning(*partitions)

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        self.state.drop({i for i, p in self._partition_of.items() if p in gone})
        self._partition_of = {i: p for i, p in self._partition_of.items() if p not in gone}
        self._report_state()
