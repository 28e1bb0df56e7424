"""Clustering worker: seed-events -> seed windows -> centroids -> seed-centroids.

Item-partitioned: the group spreads ``seed-events`` partitions (keyed by item)
over the workers, and each keeps the windows and centroids of its items.

Centroids are published coalesced: an item that changes many times within
``window.publish_interval_s`` is published once, with its latest centroids.
A popular item gets a seed in nearly every poll, and one ~10 KB message per
changed item per poll is more than kafka-python's producer can send (the
worker ran at ~3k seeds/s that way); the interval bounds the messages by the
number of distinct items that change, at a freshness cost of at most the
interval.

A budget (``window.publish_items_per_s``) caps the records per second. Under
more load than that, changed items wait in first-changed order, so every
change is published after a delay the backlog gauges show, and the seed
windows keep up with the stream instead of the producer setting the pace.

State recovery: ``seed-events`` is the changelog of the windows. Every
``snapshots.every_s`` the worker writes each partition's windows, centroids
and not-yet-published items with the offset they reflect
(``consumers/snapshots.py``); a worker assigned a partition loads its
snapshot and replays only what came after it, or, without a valid snapshot,
replays the partition from the beginning. Window updates are idempotent, so
records replayed twice change nothing; items that were waiting to be
published when the snapshot was written are published after the restore.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.kafka import assign_all, make_consumer
from consumers.loop import Event, Stage
from consumers.snapshots import Snapshot
from engine import topics as T
from engine.clustering import ItemClusters, SeedColumns, decode_records
from engine.codec import (
    FUTURE_SLACK_S,
    MAX_ABS,
    PACK_MAGIC,
    BadEvent,
    decode_key,
    decode_model_announcement,
    decode_seed_message,
    key_of,
)
from engine.config import Settings
from engine.token_bucket import TokenBucket
from engine.topics import KeyPartitions

log = logging.getLogger(__name__)

#: largest |component| a seed vector may have. Why: k-means squares them (float32
#: overflows to inf), and one inf or huge centroid poisons its item's centroids for good
MAX_SEED_ABS = MAX_ABS
WINDOW_BYTES_EVERY_S = 5.0  # how often lookalike_seed_window_bytes is recomputed
#: how often the ``models`` topic is read. Why not every tick: an empty poll of its reader
#: cost ~1 ms, 5% of the worker loop (bench cluster); announcements come once per deploy
MODELS_EVERY_S = 1.0


class ClusteringStage(Stage):
    name = "clustering"
    topics = (T.SEED_EVENTS,)
    snapshot_topics = (T.SEED_EVENTS,)
    fetch_max_wait_ms = 50

    def __init__(self, settings: Settings):
        super().__init__(settings)
        # the refresh's torch ops on one thread: a one-item refresh took 0.6-1.0 ms
        # there and 2-9 ms on two threads, with the other core busy (bench cluster)
        torch.set_num_threads(1)
        self.state = ItemClusters(settings.window)
        self._partition_of: dict[int, int] = {}
        # changed, unpublished item -> newest click time (ms); insertion order = first change
        self._dirty: dict[int, int] = {}
        self._dirty_since: dict[int, float] = {}  # item -> when it first changed unpublished
        self._next_publish = 0.0
        self._next_bytes = 0.0  # when the window-bytes gauge is due again (a scan of all items)
        self._next_models = 0.0  # when the models topic is read again
        self._tokens = 0.0  # centroid records the publish budget allows now
        self._publish_budget = TokenBucket(settings.window.publish_items_per_s)
        self._refresh_budget = TokenBucket(settings.window.refresh_items_per_s)
        self._refreshes_reported = 0
        self._stale_reported = 0
        self._key_partitions = KeyPartitions()
        self.models_reader: KafkaConsumer | None = None  # set by ``start``

    def decode(self, topic: str, record: ConsumerRecord) -> tuple[int | None, bytes | None]:
        """The key only (None for an ``S2`` pack, which names its items inside): values
        are checked and decoded a poll at a time (``decode_records``)."""
        if record.value is not None and record.value[:2] == PACK_MAGIC:
            return None, record.value
        return decode_key(record.key), record.value

    def handle(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        self._top_up_refresh()
        runs, bad = decode_records([ev.value[0] for ev in events],
                                   [ev.value[1] for ev in events])
        horizon = time.time() + FUTURE_SLACK_S
        if not all(_sane(cols.ts, cols.vectors, horizon) for cols, _ in runs):  # rare path
            runs, bad = _decode_sane(events, horizon)
        for i, err in bad:
            assert self.loop is not None
            self.loop.dead_letter(events[i].topic, events[i].record, err)
        for cols, idx in runs:
            self.metrics.seed_events.labels(self.name).inc(len(cols.users))
            produced_ms, partitions = _produced(cols, [events[i] for i in idx])
            self._changed(self.state.apply_columns(cols), produced_ms)
            self._partition_of.update(partitions)
        self._evict()
        self.metrics.kmeans_seconds.labels(self.name).observe(time.perf_counter() - t0)
        self._report_state()

    def _evict(self) -> None:
        for item in self.state.evict_over(self.settings.window.max_items):
            # out of serving too; a later seed starts the item afresh
            self.send(T.SEED_CENTROIDS, key_of(item), None)
            self._dirty.pop(item, None)
            self._dirty_since.pop(item, None)
            self._partition_of.pop(item, None)

    def _changed(self, items: list[int], produced_ms: dict[int, int]) -> None:
        """Items whose centroids changed wait for the next publish (with the newest produce
        time of the clicks behind them); one that waits already keeps its place."""
        dirty, since, ms_of = self._dirty, self._dirty_since, produced_ms.get
        for item in items:
            ms = ms_of(item, 0)
            if dirty.get(item, -1) < ms:
                dirty[item] = ms
        since.update(dict.fromkeys([i for i in items if i not in since], time.time()))

    def _top_up_refresh(self) -> None:
        """Refreshes the budget allows now (``window.refresh_items_per_s``)."""
        self.state.refresh_tokens = self._refresh_budget.fill(self.state.refresh_tokens)

    def start(self) -> None:
        """A reader of the ``models`` topic from its beginning: the last announcement names
        the current model version (``ItemClusters.supersedes``). First, a few seeds through
        a scratch state, so that the compiled steps are compiled (or loaded from numba's
        cache) now, not in the first poll."""
        scratch = ItemClusters(self.settings.window.model_copy(update={"refresh_every": 2}))
        scratch.apply_columns(SeedColumns([0, 0], [0, 2, 4], np.arange(4), np.arange(4.0),
                                          np.ones((4, 2), np.float32)))
        self.models_reader = make_consumer(self.settings.kafka, None, fetch_max_wait_ms=10,
                                           max_poll_records=100)
        assign_all(self.models_reader, self.names.name(T.MODELS), at="beginning", timeout_s=2.0)

    def close(self) -> None:
        if self.models_reader is not None:
            self.models_reader.close(autocommit=False)

    def _read_models(self) -> None:
        if self.models_reader is None or not self.models_reader.assignment():
            return
        for records in self.models_reader.poll(timeout_ms=0).values():
            for rec in records:
                try:
                    ann = decode_model_announcement(rec.value,
                                                    self.settings.kafka.max_message_bytes)
                except BadEvent:
                    continue  # the scoring workers dead-letter it
                if ann.version:
                    self.state.current_version = ann.version
                    log.info("current model version: %s", ann.version)

    def tick(self, now: float) -> None:
        if now >= self._next_models:
            self._read_models()
            self._next_models = now + MODELS_EVERY_S
        if self.state.due:  # refreshes the budget held back, while the stream is quiet
            self._top_up_refresh()
            self._changed(self.state.refresh_due(), {})
            self._report_state()
        if now >= self._next_bytes:  # every few seconds: it walks every window
            self.metrics.window_bytes.labels(self.name).set(self.state.window_bytes())
            self._next_bytes = now + WINDOW_BYTES_EVERY_S
        if self._dirty and now >= self._next_publish:
            self.publish(now)
            self._next_publish = now + self.settings.window.publish_interval_s

    def drain(self) -> None:
        if self._dirty:
            self.publish(time.time(), budget=False)

    def publish(self, now: float, budget: bool = True) -> None:
        """The latest centroids of the items changed since they were last published,
        first-changed first, as many as the budget allows (all: ``budget=False``)."""
        wire = self.settings.window.centroid_wire_dtype
        if budget:
            self._tokens = self._publish_budget.fill(self._tokens)
        n = len(self._dirty) if not budget else min(len(self._dirty), int(self._tokens))
        done = list(itertools.islice(self._dirty.items(), n))
        held = [(item, ms) for item, ms in done if item in self.state.items]  # not dropped
        if held:  # by a rebalance meanwhile
            items = [item for item, _ in held]
            parts = self._partitions_of(items).tolist()
            for (item, produced_ms), record, p in zip(
                    held, self.state.records(items, now, wire), parts, strict=True):
                self.send(T.SEED_CENTROIDS, key_of(item), record, timestamp_ms=produced_ms,
                          partition=p)
        for item, _ in done:
            del self._dirty[item]
            self._dirty_since.pop(item, None)
        self._tokens -= len(done)
        self.metrics.centroids_published.labels(self.name).inc(len(done))
        self.metrics.centroid_backlog.labels(self.name).set(len(self._dirty))
        oldest = next(iter(self._dirty_since.values()), now)
        self.metrics.centroid_backlog_age.labels(self.name).set(max(0.0, now - oldest))

    def _partitions_of(self, items: list[int]) -> np.ndarray:
        """The ``seed-centroids`` partition of each item's key, as kafka-python's default
        partitioner puts it (compaction keeps an item's records in one partition); once
        per publish, not per record (murmur2 in Python per send)."""
        assert self.loop is not None and self.loop.producer is not None
        n = len(self.loop.producer.partitions_for(self.names.seed_centroids))
        return self._key_partitions.of(np.asarray(items, np.int64), n)

    def _report_state(self) -> None:
        done = self.state.refreshes - self._refreshes_reported
        if done:
            self.metrics.refreshes.labels(self.name).inc(done)
            self._refreshes_reported = self.state.refreshes
        stale = self.state.stale_seeds - self._stale_reported
        if stale:
            self.metrics.stale_seeds.labels(self.name).inc(stale)
            self._stale_reported = self.state.stale_seeds
        self.metrics.refresh_backlog.labels(self.name).set(len(self.state.due))
        self.metrics.window_items.labels(self.name).set(len(self.state))
        self.metrics.window_seeds.labels(self.name).set(self.state.seeds_held())

    def restore(self, tp: TopicPartition, snap: Snapshot | None,
                committed: int | None) -> int | None:
        """The partition's items from its snapshot, then the log from the snapshot's
        offset; without one, the whole log (offset 0)."""
        if snap is None:
            return 0
        items = self.state.restore(snap.arrays)
        self._partition_of.update(dict.fromkeys(items, tp.partition))
        now = time.time()
        for item, ms in zip(snap.arrays["dirty"].tolist(), snap.arrays["dirty_ms"].tolist(),
                            strict=True):
            self._dirty[item] = max(self._dirty.get(item, 0), ms)
            self._dirty_since.setdefault(item, now)
        self._report_state()
        return snap.offset

    def snapshot(self, tp: TopicPartition, offset: int) -> Snapshot:
        items = [i for i, p in self._partition_of.items() if p == tp.partition]
        dirty = [i for i in self._dirty if self._partition_of.get(i) == tp.partition]
        arrays = self.state.export(items)
        arrays["dirty"] = np.array(dirty, np.int64)
        arrays["dirty_ms"] = np.array([self._dirty[i] for i in dirty], np.int64)
        return Snapshot(offset, arrays, {"items": len(arrays["item"]), "dirty": len(dirty)})

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        lost = {i for i, p in self._partition_of.items() if p in gone}
        self.state.drop(lost)
        for item in lost & self._dirty.keys():  # their new owner replays and publishes them
            del self._dirty[item]
            self._dirty_since.pop(item, None)
        self._partition_of = {i: p for i, p in self._partition_of.items() if p not in gone}
        self._report_state()


def _sane(ts: np.ndarray, vectors: np.ndarray, horizon: float) -> bool:
    """Seed times in [0, horizon] and vectors within ``MAX_SEED_ABS``. Why: a far-future
    seed, once its window's oldest, makes the window refuse every newer seed (the
    window's replay guard) and keeps its item from eviction; a huge vector poisons k-means."""
    if not len(ts):
        return True
    return bool(ts.min() >= 0 and ts.max() <= horizon and vectors.max() <= MAX_SEED_ABS
                and vectors.min() >= -MAX_SEED_ABS)


def _decode_sane(events: list[Event], horizon: float,
                 ) -> tuple[list[tuple[SeedColumns, list[int]]], list[tuple[int, BadEvent]]]:
    """``decode_records`` without the records that hold an insane seed (``_sane``),
    which are reported bad: the rare path, record by record through the codec."""
    keep: list[int] = []
    bad: list[tuple[int, BadEvent]] = []
    for i, ev in enumerate(events):
        try:
            batches = decode_seed_message(ev.record.key, ev.value[1])
        except BadEvent:
            keep.append(i)  # decode_records reports it with the codec's reason
            continue
        if all(_sane(b.ts, b.vectors, horizon) for _, b in batches):
            keep.append(i)
        else:
            bad.append((i, BadEvent("bad_binary", "seed time negative or over a day ahead, "
                                    f"or a vector component beyond {MAX_SEED_ABS:g}")))
    runs, bad_kept = decode_records([events[i].value[0] for i in keep],
                                    [events[i].value[1] for i in keep])
    bad.extend((keep[j], err) for j, err in bad_kept)
    return ([(cols, [keep[j] for j in idx]) for cols, idx in runs],
            sorted(bad, key=lambda e: e[0]))


def _produced(cols: SeedColumns, evs: list[Event]) -> tuple[dict[int, int], dict[int, int]]:
    """Item -> newest produce time (ms) of the clicks behind its seeds, and item -> its
    ``seed-events`` partition."""
    if len(evs) == 1 and evs[0].value[0] is None:  # an S2 pack: one record, many items
        rec = evs[0].record
        return (dict.fromkeys(cols.items, rec.timestamp),
                dict.fromkeys(cols.items, rec.partition))
    ms: dict[int, int] = {}
    parts: dict[int, int] = {}
    for ev in evs:
        item = ev.value[0]
        ms[item] = max(ms.get(item, 0), ev.record.timestamp)
        parts[item] = ev.record.partition
    return ms, parts
