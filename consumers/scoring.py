"""Scoring worker: clicks -> user state -> seed-events; score-requests -> recommendations.

User-partitioned: ``clicks`` and ``score-requests`` are both keyed by user and
have the same partition count, so range assignment gives one worker all of a
user's events. Besides its users, every scoring worker keeps the whole
centroid table (all partitions of ``seed-centroids``, read without a group)
and ranks with the same RALM model that embedded the seeds.

User state recovery: ``clicks`` is the changelog of the user state. When a
partition is assigned, its users come from its snapshot (consumers/snapshots.py)
and its clicks from the snapshot's offset (or the beginning, without one) up to
the group's committed offset are read again (decode and ``UserStore.click``
only: no seeds are re-emitted, no request is answered twice) before the
partition's first new record is handled.

Why this module is still long: it is the stage's own work (decoding, routing, clicks
into state and seeds, requests into answers, the centroid table reader, audiences
and request priority); ranking, model swaps and restores are already its parts in
``consumers/ranking.py``, ``consumers/model_swap.py`` and ``consumers/user_restore.py``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from threadpoolctl import threadpool_limits

from consumers.audience import look_alike_users, refresh_vectors
from consumers.kafka import make_consumer, reader_start, record_time
from consumers.loop import Event, Stage
from consumers.model_swap import ModelSwap
from consumers.pipelines import (
    Ranked,
    load_rankers,
    load_zoo,
)
from consumers.ranking import Ranking, first_occurrences, unseen
from consumers.user_restore import REFRESH_PER_TICK, ClickReplay, UserRestore
from engine import topics as T
from engine.centroid_table import CentroidTable
from engine.codec import (
    AudienceRequest,
    BadEvent,
    Click,
    Profile,
    ScoreRequest,
    SeedBatch,
    SeedPack,
    decode_audience_request,
    decode_centroids,
    decode_click,
    decode_key,
    decode_score_request,
    encode_json,
    encode_seed_pack,
    encode_seeds,
    key_of,
)
from engine.config import Settings
from engine.topics import KeyPartitions
from engine.user_store import UserState, UserStore
from models.ralm import RalmModel

if TYPE_CHECKING:
    from pathlib import Path

    from consumers.model_reload import ModelReloader

log = logging.getLogger(__name__)


class ScoringStage(Ranking, ModelSwap, UserRestore, Stage):
    """The stage itself: decoding, routing, clicks into user state and seeds, requests
    into answers, the table reader, audiences and request priority. Ranking, model
    swaps and restores are its parts in ``consumers/ranking.py``,
    ``consumers/model_swap.py`` and ``consumers/user_restore.py``."""

    name = "scoring"
    topics = (T.CLICKS, T.SCORE_REQUESTS)
    snapshot_topics = (T.CLICKS,)
    fetch_max_wait_ms = 10  # requests are latency-sensitive (see CONVENTIONS.md)
    seed_pack_bytes = 512 * 1024  # under Kafka's default 1 MB message limit
    refresh_per_tick = REFRESH_PER_TICK  # users re-embedded or re-seeded per poll

    def __init__(self, settings: Settings, model: RalmModel, checkpoint: Path | None = None,
                 explicit_checkpoint: bool = False):
        """``checkpoint``: the file ``model`` came from, watched for hot reloads (with
        ``explicit_checkpoint`` False, ``checkpoint_dir``'s latest is watched instead)."""
        super().__init__(settings)
        self.checkpoint, self.explicit_checkpoint = checkpoint, explicit_checkpoint
        self.reloader: ModelReloader | None = None
        cfg = settings.scoring
        self.zoo = load_zoo(cfg.models)
        self.rankers = load_rankers(cfg.rankers)
        self.pack_seeds = cfg.pack_seeds
        # numpy's OpenBLAS defaults to one thread per core: on 2 busy cores a
        # [5000, 128] x [128, 2] product then took 16 ms instead of 0.4 ms
        torch.set_num_threads(cfg.threads)
        faiss.omp_set_num_threads(cfg.threads)
        threadpool_limits(cfg.threads)
        self.model = model
        ring = min(cfg.history_len, model.features.history_len)
        self.users = UserStore(cfg.history_len, cfg.max_users, cfg.max_seen, ring)
        #: clicks partition -> the offset after the last click whose seed was sent
        self._seeded: dict[int, int] = {}
        self._replays: dict[TopicPartition, ClickReplay] = {}  # restores in progress
        self._stale_users = False  # users to re-embed a slice per tick (after a swap)
        self._field_index: tuple[dict, dict, dict] = ({}, {}, {})  # gender, occupation, zip
        self._item_partitions = KeyPartitions()  # seed-events packs, by item
        self._user_partitions_of = KeyPartitions()  # clicks and requests, by user
        self._clicks_paused_at: float | None = None  # since when requests went first
        self._clicks_owed = False  # the pause bound was hit: clicks stay on until polled
        # attention is over however many centroid slots an item has: the
        # clustering workers' k (settings.window.k) sets it, not training's k
        self.table = CentroidTable(settings.window.k, model.dim, cfg.min_seeds,
                                   ann_min_items=cfg.ann_min_items, ann_nprobe=cfg.ann_nprobe,
                                   ann_lists=cfg.ann_lists)
        self.table.serve_version(model.version)
        self.table_reader: KafkaConsumer | None = None
        self.audience_reader: KafkaConsumer | None = None
        self._audience_since = 0.0  # audience requests created before it are not answered
        #: a loaded model waiting for its centroids before it serves (``begin_swap``)
        self.pending: RalmModel | None = None
        self._pending_since = 0.0
        self._cover_target = 0
        self._reseed: list[int] = []  # held users whose seeds the pending model re-sends
        self.swap_coverage_s: float | None = None  # the last swap's wait for its centroids
        self._audience_due: OrderedDict[int, None] = OrderedDict()  # periodic mode's queue
        self._next_audiences = 0.0
        self._next_refresh = 0.0
        self._pending_fresh: list[float] = []  # produce times of clicks not yet served
        self._caught_up = False
        self.seed_messages = 0  # Kafka messages sent on seed-events (each packs seeds)
        self._searches = 0  # index searches, for sampling their recall
        self.metrics.build_info.labels(self.name).info(
            {"model_version": model.version, "version": __import__("engine").__version__}
        )

    # ------------------------------------------------------------- decode
    def decode(self, topic: str, record: ConsumerRecord) -> Click | ScoreRequest:
        max_bytes = self.settings.kafka.max_message_bytes
        if topic == T.CLICKS:
            # an item the model was not trained on is still a click: its seed starts the
            # item's window, so it is servable from its first seeds (min_seeds); to the
            # user tower it is padding, as any item it has no embedding for
            return decode_click(record.value, time.time(), max_bytes, record_time(record))
        req = decode_score_request(record.value, self.settings.scoring.max_k, max_bytes)
        if req.pipeline is not None and req.pipeline not in self.settings.scoring.pipelines:
            raise BadEvent("schema", f"unknown pipeline {req.pipeline!r:.40}; configured: "
                           f"{', '.join(sorted(self.settings.scoring.pipelines))}")
        return req

    # ------------------------------------------------------------- handle
    def handle(self, events: list[Event]) -> None:
        seen_at = time.time()
        events = self._route(events)
        clicks = [ev for ev in events if ev.topic == T.CLICKS]
        requests = [ev for ev in events if ev.topic == T.SCORE_REQUESTS]
        if clicks:
            self._clicks_owed = False
            self._clicks(clicks)
        if requests:
            self._requests(requests, seen_at)
        self.metrics.users.labels(self.name).set(len(self.users))

    def _embed(self, states: list[UserState | None], profiles: list[Profile | None]) -> np.ndarray:
        """[B, h] user embeddings; equals ``model.embed_users`` on the states'
        histories and click counts (tested)."""
        rows, clicks = self.users.model_rows(states)
        cat, age = self._profile_features(profiles)
        return self.model.embed_rows(cat, self.model.features.continuous(age, clicks), rows)

    def _user_vectors(self, states: list[UserState | None],
                      profiles: list[Profile | None]) -> np.ndarray:
        """[B, h] what ``_embed`` gives, read from the store where the click path left it
        current (``UserStore.fresh``: no click, restore or swap since) and the request
        names no other profile; the tower runs for the rest. Why: a known user's
        embedding was computed when their last click was seeded, and running the tower
        again was a fifth of a batch-1 request (0.5 ms, bench score)."""
        fresh = self.users.fresh
        slot = np.array([s.slot if s is not None and fresh[s.slot] and
                         (p is s.profile or p == s.profile) else -1
                         for s, p in zip(states, profiles, strict=True)], np.int64)
        if (slot < 0).all():
            return self._embed(states, profiles)
        out = np.empty((len(states), self.users.vecs.shape[1]), np.float32)
        out[slot >= 0] = self.users.vecs[slot[slot >= 0]]
        rest = np.flatnonzero(slot < 0).tolist()
        if rest:
            out[rest] = self._embed([states[i] for i in rest], [profiles[i] for i in rest])
        return out

    def _profile_features(self, profiles: list[Profile | None]) -> tuple[np.ndarray, np.ndarray]:
        """Categorical indices [B, 3] and raw ages [B] (NaN: unknown).

        Each field's index is cached by its value (few distinct genders,
        occupations, zip codes; millions of distinct profiles).
        """
        n = len(profiles)
        cat = np.zeros((n, 3), np.int64)
        age = np.full(n, np.nan, np.float32)
        if not n:
            return cat, age
        g_of, o_of, z_of = self._field_index
        cols: list[tuple[int, int, int]] = []
        for b, p in enumerate(profiles):
            if p is None:
                cols.append((0, 0, 0))
                continue
            g, o, z = g_of.get(p.gender), o_of.get(p.occupation), z_of.get(p.zip_code)
            if g is None or o is None or z is None:
                g, o, z = self._index_fields(p)
            cols.append((g, o, z))
            if p.age is not None:
                age[b] = p.age
        cat[:] = cols
        return cat, age

    def _index_fields(self, p: Profile) -> tuple[int, int, int]:
        """The model's indices of one profile's fields, cached per field value."""
        fs, (g_of, o_of, z_of) = self.model.features, self._field_index
        for cache in (g_of, o_of, z_of):  # unbounded input must not grow memory forever
            if len(cache) > 1_000_000:
                cache.clear()
        g = g_of[p.gender] = int(fs.categorical([Profile(gender=p.gender)])[0, 0])
        o = o_of[p.occupation] = int(fs.categorical([Profile(occupation=p.occupation)])[0, 1])
        z = z_of[p.zip_code] = int(fs.categorical([Profile(zip_code=p.zip_code)])[0, 2])
        return g, o, z

    def _apply_clicks(self, clicks: list[Click], partitions: list[int],
                      offsets: list[int] | None = None) -> dict[int, UserState]:
        """Clicks into user state, each at most once when ``offsets`` are given
        (``UserStore.applied``; None: apply all, untracked, as warm-ups do); the state
        of each user after the last click applied."""
        applied = self.users.applied
        new = (range(len(clicks)) if offsets is None else
               [j for j, (p, o) in enumerate(zip(partitions, offsets, strict=True))
                if o >= applied.get(p, 0)])
        items = np.fromiter((clicks[j].item_id for j in new), np.int64, len(new))
        rows = self.model.features.catalog_rows(items).tolist()
        last: dict[int, UserState] = {}
        for j, row in zip(new, rows, strict=True):
            last[clicks[j].user_id] = self.users.click(clicks[j], partitions[j], row)
            if offsets is not None:
                applied[partitions[j]] = offsets[j] + 1
        return last

    def _clicks(self, events: list[Event]) -> None:
        """Update user state, then emit the seed (the user's new embedding) of each click
        whose seed is not sent yet. Both steps skip what they did before, so a batch
        retried after a failure (``ConsumerLoop._handle``) or read again changes nothing."""
        self._apply_clicks([ev.value for ev in events], [ev.record.partition for ev in events],
                           [ev.record.offset for ev in events])
        owed = [ev for ev in events if ev.record.offset >= self._seeded.get(ev.record.partition, 0)]
        last = {ev.value.user_id: st for ev in owed
                if (st := self.users.get(ev.value.user_id)) is not None}
        owed = [ev for ev in owed if ev.value.user_id in last]  # unless evicted meanwhile
        if not owed:
            return
        states = list(last.values())
        vecs = self._embed(states, [s.profile for s in states])
        self.users.set_vectors(states, vecs)
        if self.pending is None:
            self._emit_click_seeds(owed, last, vecs)
        else:  # the windows are moving to the pending model: its seeds, not the old one's
            self._emit_click_seeds(owed, last, self._embed_with(self.pending, states),
                                   self.pending.version)
        for ev in owed:
            p = ev.record.partition
            self._seeded[p] = max(self._seeded.get(p, 0), ev.record.offset + 1)

    def _emit_click_seeds(self, events: list[Event], last: dict[int, UserState],
                          vecs: np.ndarray, version: str | None = None) -> None:
        """Each click's seed: its user's new embedding (``vecs`` rows in ``last``'s order)."""
        clicks: list[Click] = [ev.value for ev in events]
        n = len(clicks)
        at = {u: i for i, u in enumerate(last)}
        self._emit_seeds(
            items=np.fromiter((c.item_id for c in clicks), np.int64, n),
            users=np.fromiter((c.user_id for c in clicks), np.int64, n),
            ts=np.fromiter((c.ts for c in clicks), np.float64, n),
            vectors=vecs[np.fromiter((at[c.user_id] for c in clicks), np.int64, n)],
            produced_ms=np.fromiter((ev.record.timestamp for ev in events), np.int64, n),
            version=version,
        )

    def _seed_partitions(self, items: np.ndarray) -> np.ndarray:
        """The seed-events partition each item's key hashes to (kafka-python's default)."""
        assert self.loop is not None and self.loop.producer is not None
        n = len(self.loop.producer.partitions_for(self.names.seed_events))
        return self._item_partitions.of(items, n)

    def _route(self, events: list[Event]) -> list[Event]:
        """The events whose partition is their user's; the others are forwarded there.

        Why: a user's clicks and requests must meet in one worker, the owner of the
        user's partition (murmur2 of the user id, ``KeyPartitions``). A producer with
        another partitioner (librdkafka's default is CRC32), a null key or a key that
        is not the ``user_id`` would split a user over workers, each answering from half
        a history. The forwarded copy is keyed by the user id, keeps the record's
        timestamp (a click without ``ts`` keeps its time) and its headers, and is
        delivered before this batch is committed (``ConsumerLoop``)."""
        assert self.loop is not None and self.loop.producer is not None
        n = len(self.loop.producer.partitions_for(self.names.clicks))
        want = self._user_partitions_of.of(
            np.fromiter((ev.value.user_id for ev in events), np.int64, len(events)), n)
        if (want == np.fromiter((ev.record.partition for ev in events), np.int64,
                                len(events))).all():
            return events
        mine = []
        for ev, p in zip(events, want.tolist(), strict=True):
            if ev.record.partition == p:
                mine.append(ev)
                continue
            rec = ev.record
            self.send(ev.topic, key_of(ev.value.user_id), rec.value, headers=list(rec.headers
                      or []), timestamp_ms=rec.timestamp if rec.timestamp >= 0 else None,
                      partition=p)
            self.metrics.misrouted.labels(self.name, ev.topic).inc()
        return mine

    def _emit_seeds(self, items: np.ndarray, users: np.ndarray, ts: np.ndarray,
                    vectors: np.ndarray, produced_ms: np.ndarray,
                    version: str | None = None) -> None:
        """Seeds grouped by item (click order kept): S1 per item, or S2 per partition;
        of the serving model's version unless ``version`` says otherwise."""
        version = version or self.model.version
        parts = self._seed_partitions(items) if self.pack_seeds else np.zeros_like(items)
        order = np.lexsort((items, parts))  # stable: click order within an item
        items_s, parts_s = items[order], parts[order]
        n = len(order)
        starts = np.flatnonzero(np.r_[True, items_s[1:] != items_s[:-1]])
        if not self.pack_seeds:
            for a, b in zip(starts.tolist(), [*starts[1:].tolist(), n], strict=True):
                sel = order[a:b]
                batch = SeedBatch(users[sel], ts[sel], vectors[sel], version)
                self.send(T.SEED_EVENTS, key_of(int(items_s[a])), encode_seeds(batch),
                          count=b - a, timestamp_ms=int(produced_ms[sel].max()))
                self.seed_messages += 1
            return
        per_seed = 16 + 4 * vectors.shape[1]
        max_seeds = max(1, self.seed_pack_bytes // per_seed)
        bounds = np.r_[np.flatnonzero(np.r_[True, parts_s[1:] != parts_s[:-1]]), n].tolist()
        for pa, pb in zip(bounds[:-1], bounds[1:]):
            item_starts = starts[(starts >= pa) & (starts < pb)]
            for a, b in _chunks(item_starts, pb, max_seeds):
                sel = order[a:b]
                mine = item_starts[(item_starts >= a) & (item_starts < b)]
                pack = SeedPack(items_s[mine], np.r_[mine - a, b - a], users[sel], ts[sel],
                                vectors[sel], version)
                self.send(T.SEED_EVENTS, None, encode_seed_pack(pack), count=b - a,
                          timestamp_ms=int(produced_ms[sel].max()), partition=int(parts_s[pa]))
                self.seed_messages += 1

    def _requests(self, events: list[Event], seen_at: float) -> None:
        reqs: list[ScoreRequest] = [ev.value for ev in events]
        states = [self.users.get(r.user_id) for r in reqs]
        profiles = [r.profile or (s.profile if s else None) for r, s in zip(reqs, states)]
        vecs = self._user_vectors(states, profiles)
        cfg = self.settings.scoring
        # each answer's partition, once per batch: kafka-python's own choice per send
        # (the topic's available partitions, every time) cost 0.1 ms an answer
        assert self.loop is not None and self.loop.producer is not None
        n = len(self.loop.producer.partitions_for(self.names.recommendations))
        homes = self._user_partitions_of.of(np.fromiter(
            (r.user_id for r in reqs), np.int64, len(reqs)), n).tolist()
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.pipeline or cfg.default_pipeline, []).append(i)
        for name, idx in groups.items():
            p = cfg.pipelines[name]
            sub = [states[i] for i in idx]
            ks, explain = [reqs[i].k for i in idx], any(reqs[i].explain for i in idx)
            who = [(reqs[i].user_id, profiles[i]) for i in idx]
            ranked = self.ranked(p, vecs[idx], sub, ks, explain, who)
            for i, got in zip(idx, ranked, strict=True):
                self._emit(reqs[i], states[i], got, seen_at, name, homes[i])

    def _emit(self, r: ScoreRequest, s: UserState | None, ranked: Ranked, seen_at: float,
              pipeline: str, partition: int | None = None) -> None:
        items = [{"item_id": i, "score": round(sc, 6)} for i, sc in ranked.items]
        if r.explain and ranked.why is not None:
            for it, why in zip(items, ranked.why, strict=True):
                it["why"] = why
        rec = {
            "user_id": r.user_id,
            "request_id": r.request_id,
            "items": items,
            "pipeline": pipeline,
            "model_version": self.model.version,
            "request_seen_at": seen_at,
            "emitted_at": time.time(),
            "cold": s is None,
        }
        self.send(T.RECOMMENDATIONS, key_of(r.user_id), encode_json(rec), partition=partition)
        self.metrics.recommendations.labels(self.name).inc()
        self.metrics.score_seconds.labels(self.name).observe(rec["emitted_at"] - seen_at)

    # ------------------------------------------------------------- centroid table
    def start(self) -> None:
        """Read every partition of the centroid table from the beginning, without a group."""
        self._compile()
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
        self._start_audience_reader()
        from consumers.model_reload import ModelReloader

        rejected = self.metrics.model_reloads.labels(self.name, "rejected")
        self.reloader = ModelReloader(self.settings, self.table.dim, self.checkpoint,
                                      self.explicit_checkpoint, rejected.inc)
        self.reloader.start()

    def _compile(self) -> None:
        """Run each compiled step once on empty input, with the types serving passes, so
        numba compiles it (or loads it from its cache) now: on a fresh install the first
        click poll and the first request each paid seconds of compiling (`make demo`'s
        first run: answers 7 s late)."""
        one = np.zeros((1, 1), np.int64)
        unseen(one, np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([0, 1]), 1)
        first_occurrences(one)
        k, h = self.table.k, self.model.dim
        self.model.score_table(np.zeros((1, h), np.float32), one, np.zeros((1, 1), bool),
                               np.zeros((1, k, h), np.float32), np.zeros((1, k), np.float32),
                               np.zeros((1, h), np.float32), np.zeros((1, k, k), np.float32))
        self.model.embed_rows(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.float32),
                              np.zeros((1, self.users.ring_len), self.users.rows.dtype))

    def _start_audience_reader(self) -> None:
        """Every worker reads every audience request (each answers for its own users),
        without a group, from the end: a request made while no worker ran is not
        answered (the answer is a function of the moment's state; ask again)."""
        topic = self.names.audience_requests
        self.audience_reader = make_consumer(self.settings.kafka, None, fetch_max_wait_ms=10,
                                             max_poll_records=100)
        parts = self.audience_reader.partitions_for_topic(topic)
        if not parts:
            log.warning("no topic %r: audiences only in periodic mode", topic)
            return
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.audience_reader.assign(tps)
        self._audience_since = reader_start()  # what seek_to_end may re-read is older
        self.audience_reader.seek_to_end(*tps)
        for tp in tps:  # resolve the end now, not lazily at the first poll
            self.audience_reader.position(tp)

    # ------------------------------------------------------------- user state recovery
    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions & self._replays.keys():
            self._replays.pop(tp).close()
        lost = {tp.partition for tp in partitions if tp.topic == self.names.clicks}
        if lost:
            self.users.drop(lambda st: st.partition in lost)
            for p in lost:  # a partition that comes back is restored afresh
                self.users.applied.pop(p, None)
                self._seeded.pop(p, None)

    def tick(self, now: float) -> None:
        self.refresh_stale()
        self.prioritise_requests()
        self.read_table()
        if self.reloader is not None:
            new = self.reloader.poll(now, self._dead_letter_model)
            if new is not None:
                self.begin_swap(new, now)
        if self.pending is not None:
            self._advance_swap(now)
        self._audiences(now)
        if self.table.dirty and now >= self._next_refresh:
            self.table.refresh(self.model.item_global)
            self._next_refresh = now + self.settings.scoring.index_refresh_s
            self.metrics.centroid_items.labels(self.name).set(len(self.table))
            served = time.time()
            for produced in self._pending_fresh:
                self.metrics.freshness.labels(self.name).observe(max(0.0, served - produced))
            self._pending_fresh.clear()
        elif not self.table.dirty:
            self._pending_fresh.clear()  # records that changed nothing (a tombstone of an
            # unknown item) serve nothing: no freshness sample, and no growing list
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
                    item = decode_key(rec.key)
                    self.table.upsert(item, decode_centroids(rec.value))
                    if self.settings.scoring.audience_every_s and rec.value is not None:
                        self._audience_due[item] = None
                        self._audience_due.move_to_end(item)
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
        for replay in self._replays.values():
            replay.close()
        self._replays.clear()
        for reader in (self.table_reader, self.audience_reader):
            if reader is not None:
                reader.close(autocommit=False)
        if self.reloader is not None:
            self.reloader.close()

    # ------------------------------------------------------------- hot reload

    def _audiences(self, now: float) -> None:
        """Answer audience requests; in periodic mode, publish changed items' audiences."""
        if self.audience_reader is not None:
            for records in self.audience_reader.poll(timeout_ms=0).values():
                for rec in records:
                    created = record_time(rec)
                    if created is not None and created < self._audience_since:
                        continue  # from before this worker: not its to answer (docstring)
                    self.metrics.consumed.labels(self.name, T.AUDIENCE_REQUESTS).inc()
                    try:
                        req = decode_audience_request(
                            rec.value, self.settings.scoring.audience_max_k,
                            self.settings.kafka.max_message_bytes)
                    except BadEvent as e:
                        assert self.loop is not None
                        self.loop.dead_letter(T.AUDIENCE_REQUESTS, rec, e)
                        continue
                    self.answer_audience(req, "request")
        every = self.settings.scoring.audience_every_s
        if every and now >= self._next_audiences and self._audience_due:
            budget = max(1, int(self.settings.scoring.audience_items_per_s * every))
            for _ in range(min(budget, len(self._audience_due))):
                item, _ = self._audience_due.popitem(last=False)
                self.answer_audience(AudienceRequest(item), "periodic")
            self._next_audiences = now + every

    def answer_audience(self, req: AudienceRequest, kind: str) -> dict:
        """This worker's partial audience for ``req.item_id``, sent on ``audiences``."""
        cfg = self.settings.scoring
        t0 = time.perf_counter()
        refresh_vectors(self.users, lambda sts: self._embed(sts, [s.profile for s in sts]))
        k = req.k or cfg.audience_k
        got = look_alike_users(self.model, self.table, self.users, req.item_id, k,
                               cfg.audience_candidates)
        slot = self.table.slot_of.get(req.item_id)
        mine, total = self._user_partitions()
        rec = {
            "item_id": req.item_id,
            "request_id": req.request_id,
            "kind": kind,
            "users": [{"user_id": u, "score": round(sc, 6)} for u, sc in got.users],
            "reason": got.reason,
            "seeds_dropped": got.seeds_dropped,
            "partitions": mine,
            "partitions_total": total,
            "model_version": self.model.version,
            "centroids_updated_at": None if slot is None else float(self.table.updated_at[slot]),
            "emitted_at": time.time(),
        }
        self.send(T.AUDIENCES, key_of(req.item_id), encode_json(rec))
        self.metrics.audiences.labels(self.name, kind).inc()
        self.metrics.audience_seconds.labels(self.name).observe(time.perf_counter() - t0)
        return rec

    def prioritise_requests(self) -> bool:
        """Requests before clicks: while score requests wait in this worker's partitions,
        its clicks partitions are paused, so the next poll returns requests only.

        Why: clicks and requests share one poll loop, and a click backlog (a burst,
        or more clicks than the worker sustains) would otherwise make every request
        wait behind it (``bench soak``: p99 19 s). Bounded: after
        ``scoring.max_click_pause_s`` of pause in a row the clicks get one poll even
        though requests wait (a steady stream of requests always has one waiting, and
        starved the clicks for good in the second soak). Returns whether clicks are
        paused.
        """
        consumer = getattr(self.loop, "consumer", None)
        if consumer is None:
            return False
        assigned = consumer.assignment()
        clicks = [tp for tp in assigned if tp.topic == self.names.clicks]
        now = time.monotonic()
        if clicks and not self._clicks_owed and self._requests_waiting(consumer, assigned):
            if self._clicks_paused_at is None:
                self._clicks_paused_at = now
            if now - self._clicks_paused_at < self.settings.scoring.max_click_pause_s:
                consumer.pause(*clicks)
                self.metrics.requests_first.labels(self.name).inc()
                return True
            # resumed until a poll brings clicks: the first polls after a resume return
            # requests already fetched, before the clicks' fetch comes back
            self._clicks_owed = True
        self._clicks_paused_at = None
        paused = consumer.paused()
        if paused:
            consumer.resume(*[tp for tp in paused if tp.topic == self.names.clicks])
        return False

    def _requests_waiting(self, consumer: KafkaConsumer,
                          assigned: set[TopicPartition]) -> int:
        """Score requests fetched by the broker's last answer but not yet polled."""
        waiting = 0
        for tp in assigned:
            if tp.topic != self.names.score_requests:
                continue
            hw = consumer.highwater(tp)  # from the last fetch: no broker round trip
            if hw is None:
                continue
            try:
                pos = consumer.position(tp, timeout_ms=0)
            except (KafkaError, ValueError):
                continue
            waiting += max(0, hw - (pos or 0))
        return waiting

    def _user_partitions(self) -> tuple[list[int], int | None]:
        """The clicks partitions whose users this worker holds, and how many there are."""
        consumer = getattr(self.loop, "consumer", None)
        if consumer is None:
            return [], None
        topic = self.names.clicks
        mine = sorted(tp.partition for tp in consumer.assignment() if tp.topic == topic)
        parts = consumer.partitions_for_topic(topic)
        return mine, None if parts is None else len(parts)


def _chunks(item_starts: np.ndarray, end: int, max_seeds: int) -> list[tuple[int, int]]:
    """[a, b) runs of whole items (they start at ``item_starts``, the last ends at
    ``end``) of at most ``max_seeds`` seeds, except an item that alone is larger."""
    out: list[tuple[int, int]] = []
    a = cur = int(item_starts[0])
    for e in [*item_starts[1:].tolist(), end]:
        if e - a > max_seeds and cur > a:
            out.append((a, cur))
            a = cur
        cur = e
    out.append((a, cur))
    return out
