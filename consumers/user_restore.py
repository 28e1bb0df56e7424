"""A scoring worker's users when a clicks partition is assigned: its snapshot, then the
clicks after it (up to the committed offset) applied without emitting, a chunk per
poll, and stale embeddings refreshed a slice per poll. A part of ``ScoringStage``
(``consumers/scoring.py``); the loop drives it (``Stage.restore``/``catch_up``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.audience import refresh_vectors
from consumers.kafka import make_consumer
from consumers.snapshots import Snapshot
from engine import topics as T
from engine.codec import BadEvent
from engine.config import Settings

log = logging.getLogger(__name__)

#: stale user embeddings re-embedded per poll (after a swap or a restore): ~30 ms here
REFRESH_PER_TICK = 1024
#: a restore's replay of the clicks log gives up after this long (logged as an error)
REPLAY_LIMIT_S = 300.0


class ClickReplay:
    """The clicks [start, end) of one partition, read by a group-less consumer a chunk at
    a time (``UserRestore.catch_up``)."""

    chunk = 2000  # records per read: a few milliseconds of work each

    def __init__(self, settings: Settings, tp: TopicPartition, start: int, end: int):
        self.tp, self.end, self.applied = tp, end, 0
        self.started = time.monotonic()
        self.reader = make_consumer(settings.kafka, None, fetch_max_wait_ms=50,
                                    max_poll_records=self.chunk)
        self.reader.assign([tp])
        if start:
            self.reader.seek(tp, start)
        else:
            self.reader.seek_to_beginning(tp)
        self.partitions = len(self.reader.partitions_for_topic(tp.topic) or ())
        self._at = start

    def next_chunk(self) -> list[ConsumerRecord]:
        recs = [r for r in self.reader.poll(timeout_ms=100).get(self.tp, [])
                if r.offset < self.end]
        self._at = self.reader.position(self.tp)
        return recs

    def timed_out(self) -> bool:
        return time.monotonic() - self.started > REPLAY_LIMIT_S

    def done(self) -> bool:
        return self._at >= self.end or self.timed_out()

    def close(self) -> None:
        self.reader.close(autocommit=False)


class UserRestore:
    """Restore and snapshot methods of ``ScoringStage``."""

    def restore(self, tp: TopicPartition, snap: Snapshot | None,
                committed: int | None) -> int | None:
        """A clicks partition's users: from its snapshot, then the clicks after the
        snapshot's offset (or all, without one) up to the committed offset, applied
        without emitting (their seeds were sent before) a chunk per poll
        (:meth:`catch_up`); polling goes on from there."""
        start = 0
        if snap is not None:
            try:
                n = self.users.restore(snap.arrays, tp.partition)
                start = snap.offset
                log.info("%s: %d users from a snapshot at offset %d", tp, n, start)
            except (ValueError, KeyError) as e:
                log.warning("snapshot of %s not used (%s): rebuilding from the log", tp, e)
        self.users.applied[tp.partition] = start
        if committed and committed > start:  # applied a chunk per poll (catch_up)
            self._replays[tp] = ClickReplay(self.settings, tp, start, committed)
        self._seeded[tp.partition] = committed or 0  # seeds before the commit were sent
        return None

    def snapshot(self, tp: TopicPartition, offset: int) -> Snapshot:
        arrays = self.users.export(tp.partition)
        return Snapshot(offset, arrays, {"users": len(arrays["user"])})

    def catching_up(self, tp: TopicPartition) -> bool:
        return tp in self._replays

    def catch_up(self, tp: TopicPartition, deadline: float) -> bool:
        """Apply the partition's replayed clicks until ``deadline`` (monotonic); whether
        its replay is done. A chunk at a time between polls, so that a long restore
        never holds the loop past ``max_poll_interval_ms`` (the member would be dropped
        from its group and the restore start over)."""
        replay = self._replays[tp]
        while time.monotonic() < deadline and not replay.done():
            recs = replay.next_chunk()
            clicks, offsets = [], []
            for rec in recs:
                try:
                    clicks.append(self.decode(T.CLICKS, rec))
                    offsets.append(rec.offset)
                except BadEvent:
                    pass  # dead-lettered the first time round
            if clicks:  # misrouted ones were forwarded: their user's partition has them
                ok = self._user_partitions_of.of(np.fromiter(
                    (c.user_id for c in clicks), np.int64, len(clicks)), replay.partitions
                ) == tp.partition
                keep = ok.tolist()
                clicks = [c for c, k in zip(clicks, keep, strict=True) if k]
                offsets = [o for o, k in zip(offsets, keep, strict=True) if k]
                self._apply_clicks(clicks, [tp.partition] * len(clicks), offsets)
                replay.applied += len(clicks)
        if not replay.done():
            return False
        self._end_replay(tp)
        return True

    def refresh_stale(self) -> int:
        """Re-embed up to ``refresh_per_tick`` users whose stored embedding is stale (after
        a swap or a restore), once per poll: the whole store in one go would hold the loop
        past ``max_poll_interval_ms`` at a million users. How many were embedded."""
        if not self._stale_users:
            return 0
        done = refresh_vectors(self.users, lambda sts: self._embed(
            sts, [s.profile for s in sts]), limit=self.refresh_per_tick)
        self._stale_users = done == self.refresh_per_tick
        return done

    def _end_replay(self, tp: TopicPartition) -> None:
        self._stale_users = True  # restored users carry no embedding yet
        replay = self._replays.pop(tp)
        replay.close()
        if replay.timed_out():
            log.error("user state of %s not fully restored in %.0f s", tp, REPLAY_LIMIT_S)
        log.info("replayed %d clicks of %s into user state", replay.applied, tp)
