"""Scoring worker: clicks -> user state -> seed-events; score-requests -> recommendations.

User-partitioned: ``clicks`` and ``score-requests`` are both keyed by user and
have the same partition count, so range assignment gives one worker all of a
user's events. Besides its users, every scoring worker keeps the whole
centroid table (all partitions of ``seed-centroids``, read without a group)
and ranks with the same RALM model that embedded the seeds.

User state recovery (first version): ``clicks`` is the changelog of the user
state. When a partition is assigned, its clicks up to the group's committed
offset are read again (decode and ``UserStore.click`` only: no seeds are
re-emitted, no request is answered twice) before the partition's first new
record is handled. Snapshots with offsets replace this when the log outgrows
a restart budget.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.kafka import make_consumer
from consumers.loop import Event, Stage
from engine import topics as T
from engine.centroid_table import CentroidTable
from engine.codec import (
    BadEvent,
    Click,
    Profile,
    ScoreRequest,
    SeedBatch,
    decode_centroids,
    decode_click,
    decode_key,
    decode_score_request,
    encode_json,
    encode_seeds,
    key_of,
)
from engine.config import Settings
from models.ralm import RalmModel

log = logging.getLogger(__name__)


@dataclass
class UserState:
    """What the worker keeps per user.

    ``history``: the recent clicks the model reads (newest last);
    ``seen``: the items never to recommend again, a longer bounded record
    (an ordered set, oldest first).
    """

    history: deque[int]
    seen: dict[int, None] = field(default_factory=dict)
    profile: Profile | None = None
    clicks: int = 0
    partition: int = -1  # of the clicks topic: the state leaves with it
    last_ts: float = field(default=0.0)


class UserStore:
    """Users of this worker's partitions, least recently active evicted first."""

    def __init__(self, history_len: int, max_users: int, max_seen: int):
        self.history_len, self.max_users, self.max_seen = history_len, max_users, max_seen
        self.users: OrderedDict[int, UserState] = OrderedDict()

    def __len__(self) -> int:
        return len(self.users)

    def get(self, user: int) -> UserState | None:
        return self.users.get(user)

    def drop(self, pred: Callable[[UserState], bool]) -> None:
        """Forget the users for whom ``pred(state)`` (their partition moved away)."""
        for user in [u for u, st in self.users.items() if pred(st)]:
            del self.users[user]

    def click(self, c: Click, partition: int = -1) -> UserState:
        st = self.users.get(c.user_id)
        if st is None:
            st = UserState(deque(maxlen=self.history_len))
            self.users[c.user_id] = st
            if len(self.users) > self.max_users:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(c.user_id)
        st.partition = partition
        st.history.append(c.item_id)
        st.seen.pop(c.item_id, None)
        st.seen[c.item_id] = None
        if len(st.seen) > self.max_seen:
            del st.seen[next(iter(st.seen))]
        st.clicks += 1
        st.last_ts = max(st.last_ts, c.ts)
        if c.profile is not None:
            st.profile = c.profile
        return st


class ScoringStage(Stage):
    name = "scoring"
    topics = (T.CLICKS, T.SCORE_REQUESTS)
    fetch_max_wait_ms = 10  # requests are latency-sensitive (see CONVENTIONS.md)
    score_chunk = 8  # users ranked at once: bounds the [B, C, k, d] gather

    def __init__(self, settings: Settings, model: RalmModel):
        super().__init__(settings)
        cfg = settings.scoring
        torch.set_num_threads(cfg.threads)
        faiss.omp_set_num_threads(cfg.threads)
        self.model = model
        self.catalogue = {int(i) for i in model.features.catalog_ids}
        self.users = UserStore(cfg.history_len, cfg.max_users, cfg.max_seen)
        # attention is over however many centroid slots an item has: the
        # clustering workers' k (settings.window.k) sets it, not training's k
        self.table = CentroidTable(settings.window.k, model.dim, cfg.min_seeds)
        self.table_reader: KafkaConsumer | None = None
        self._next_refresh = 0.0
        self._pending_fresh: list[float] = []  # produce times of clicks not yet served
        self._to_restore: set[TopicPartition] = set()
        self._caught_up = False
        self.metrics.build_info.labels(self.name).info(
            {"model_version": model.version, "version": __import__("engine").__version__}
        )

    # ------------------------------------------------------------- decode
    def decode(self, topic: str, record: ConsumerRecord) -> Click | ScoreRequest:
        max_bytes = self.settings.kafka.max_message_bytes
        if topic == T.CLICKS:
            c = decode_click(record.value, time.time(), max_bytes)
            if c.item_id not in self.catalogue:
                raise BadEvent("unknown_id", f"item {c.item_id} is not in the model's catalogue")
            return c
        return decode_score_request(record.value, self.settings.scoring.max_k, max_bytes)

    # ------------------------------------------------------------- handle
    def handle(self, events: list[Event]) -> None:
        seen_at = time.time()
        self._restore_pending()
        clicks = [ev for ev in events if ev.topic == T.CLICKS]
        requests = [ev for ev in events if ev.topic == T.SCORE_REQUESTS]
        if clicks:
            self._clicks(clicks)
        if requests:
            self._requests(requests, seen_at)
        self.metrics.users.labels(self.name).set(len(self.users))

    def _embed(self, states: list[UserState | None], profiles: list[Profile | None]) -> np.ndarray:
        histories = [list(s.history) if s else [] for s in states]
        activity = [s.clicks if s else 0 for s in states]
        return self.model.embed_users(profiles, histories, activity)

    def _clicks(self, events: list[Event]) -> None:
        """Update user state, then emit each click's seed, batched per item."""
        last_state: dict[int, UserState] = {}
        for ev in events:
            last_state[ev.value.user_id] = self.users.click(ev.value, ev.record.partition)
        users = list(last_state)
        states = [last_state[u] for u in users]
        vecs = self._embed(states, [s.profile for s in states])
        row = {u: i for i, u in enumerate(users)}
        per_item: dict[int, list[Event]] = defaultdict(list)
        for ev in events:
            per_item[ev.value.item_id].append(ev)
        for item, evs in per_item.items():
            batch = SeedBatch(
                users=np.array([e.value.user_id for e in evs], np.int64),
                ts=np.array([e.value.ts for e in evs], np.float64),
                vectors=vecs[[row[e.value.user_id] for e in evs]],
                model_version=self.model.version,
            )
            produced_ms = max(e.record.timestamp for e in evs)
            self.send(T.SEED_EVENTS, key_of(item), encode_seeds(batch), count=len(evs),
                      timestamp_ms=produced_ms)

    def _requests(self, events: list[Event], seen_at: float) -> None:
        reqs: list[ScoreRequest] = [ev.value for ev in events]
        states = [self.users.get(r.user_id) for r in reqs]
        profiles = [r.profile or (s.profile if s else None) for r, s in zip(reqs, states)]
        vecs = self._embed(states, profiles)
        for lo in range(0, len(reqs), self.score_chunk):
            hi = lo + self.score_chunk
            ranked = self.rank(vecs[lo:hi], states[lo:hi], [r.k for r in reqs[lo:hi]])
            for r, s, items in zip(reqs[lo:hi], states[lo:hi], ranked):
                self._emit(r, s, items, seen_at)

    def rank(self, users: np.ndarray, states: list[UserState | None],
             ks: list[int | None]) -> list[list[tuple[int, float]]]:
        """Faiss candidates by cos(global), re-ranked by the full RALM score."""
        cfg = self.settings.scoring
        seen = [s.seen.keys() if s else set() for s in states]
        want = max(cfg.candidates, *(k or cfg.top_k for k in ks))  # a large K widens the shortlist
        n_cand = want + max(len(s) for s in seen)
        slots = self.table.search(users, n_cand)
        out: list[list[tuple[int, float]]] = []
        if slots.shape[1] == 0:
            return [[] for _ in states]
        safe = np.maximum(slots, 0)
        scores = self.model.score(
            users, self.table.centroids[safe], self.table.counts[safe], self.table.global_vec[safe]
        )
        for b in range(len(states)):
            k = ks[b] or self.settings.scoring.top_k
            items = self.table.item_ids[safe[b]]
            ok = slots[b] >= 0
            keep = np.flatnonzero(ok & ~np.isin(items, list(seen[b])))
            order = keep[np.argsort(-scores[b, keep], kind="stable")][:k]
            out.append([(int(items[i]), float(scores[b, i])) for i in order])
        return out

    def _emit(self, r: ScoreRequest, s: UserState | None, items: list[tuple[int, float]],
              seen_at: float) -> None:
        rec = {
            "user_id": r.user_id,
            "request_id": r.request_id,
            "items": [{"item_id": i, "score": round(sc, 6)} for i, sc in items],
            "model_version": self.model.version,
            "request_seen_at": seen_at,
            "emitted_at": time.time(),
            "cold": s is None,
        }
        self.send(T.RECOMMENDATIONS, key_of(r.user_id), encode_json(rec))
        self.metrics.recommendations.labels(self.name).inc()
        self.metrics.score_seconds.labels(self.name).observe(rec["emitted_at"] - seen_at)

    # ------------------------------------------------------------- centroid table
    def start(self) -> None:
        """Read every partition of the centroid table from the beginning, without a group."""
        self.table_reader = make_consumer(
            self.settings.kafka, None, fetch_max_wait_ms=10, max_poll_records=10_000
        )
        topic = self.names.seed_centroids
        parts = None
        for _ in range(100):
            parts = self.table_reader.partitions_for_topic(topic)
            if parts:
                break
            time.sleep(0.1)
        if not parts:
            raise RuntimeError(f"topic {topic!r} not found: create the topics first "
                               "(`lookalike topics create`)")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.table_reader.assign(tps)
        self.table_reader.seek_to_beginning(*tps)

    # ------------------------------------------------------------- user state recovery
    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        # runs on kafka-python's IO thread, where blocking calls are refused: defer
        self._to_restore |= {tp for tp in partitions if tp.topic == self.names.clicks}

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.topic == self.names.clicks}
        self._to_restore -= set(partitions)
        if lost:
            self.users.drop(lambda st: st.partition in lost)

    def _restore_pending(self) -> None:
        """Re-read the assigned clicks partitions up to the committed offsets."""
        if not self._to_restore:
            return
        assert self.loop is not None and self.loop.consumer is not None
        todo, self._to_restore = self._to_restore, set()
        ends = {tp: self.loop.consumer.committed(tp) or 0 for tp in todo}
        ends = {tp: off for tp, off in ends.items() if off > 0}
        if not ends:
            return
        reader = make_consumer(self.settings.kafka, None, fetch_max_wait_ms=50,
                               max_poll_records=10_000)
        try:
            reader.assign(list(ends))
            reader.seek_to_beginning(*ends)
            restored, left = 0, dict(ends)
            deadline = time.monotonic() + 300
            while left and time.monotonic() < deadline:
                for tp, records in reader.poll(timeout_ms=500).items():
                    for rec in records:
                        if rec.offset >= ends[tp]:
                            break
                        try:
                            self.users.click(self.decode(T.CLICKS, rec), tp.partition)
                            restored += 1
                        except BadEvent:
                            pass  # dead-lettered the first time round
                for tp in list(left):
                    if reader.position(tp) >= ends[tp]:
                        left.pop(tp)
            if left:
                log.error("user state of %s not fully restored in time", sorted(left))
            log.info("restored %d clicks of %d partitions into user state", restored, len(ends))
        finally:
            reader.close(autocommit=False)

    def tick(self, now: float) -> None:
        self._restore_pending()
        self.read_table()
        if self.table.dirty and now >= self._next_refresh:
            self.table.refresh(self.model.item_global)
            self._next_refresh = now + self.settings.scoring.index_refresh_s
            self.metrics.centroid_items.labels(self.name).set(len(self.table))
            served = time.time()
            for produced in self._pending_fresh:
                self.metrics.freshness.labels(self.name).observe(max(0.0, served - produced))
            self._pending_fresh.clear()
        newest = self.table.newest_update()
        if newest:
            self.metrics.centroid_age.labels(self.name).set(max(0.0, now - newest))

    def read_table(self) -> int:
        assert self.table_reader is not None
        polled = self.table_reader.poll(timeout_ms=0, max_records=10_000)
        n = 0
        for records in polled.values():
            for rec in records:
                n += 1
                try:
                    self.table.upsert(decode_key(rec.key), decode_centroids(rec.value))
                    if self._caught_up:  # history read at start-up is not a freshness figure
                        self._pending_fresh.append(rec.timestamp / 1000)
                except (BadEvent, ValueError) as e:
                    # the table is written by our own workers: a bad row is a bug, not input
                    err = e if isinstance(e, BadEvent) else BadEvent("bad_binary", str(e))
                    assert self.loop is not None
                    self.loop.dead_letter(T.SEED_CENTROIDS, rec, err)
        if n:
            self.metrics.consumed.labels(self.name, T.SEED_CENTROIDS).inc(n)
        else:
            self._caught_up = True
        return n

    def close(self) -> None:
        if self.table_reader is not None:
            self.table_reader.close(autocommit=False)
