"""The one consumer loop every worker runs.

A stage (clustering, scoring, ...) says what its records mean and what they
do to its state; this loop does everything else the same way for all of them.
One iteration, in this order — the only place the order is written:

1. poll a batch from the stage's topics (consumer group of the stage);
2. decode and validate each record; a bad one is dead-lettered to
   ``<topic>.dlq`` with its reason and counted, and the batch goes on (a
   decoder that fails with anything but BadEvent dead-letters the record as
   ``processing_error``: a decoder bug never stops a worker either);
3. ``stage.handle(events)``: update state and send outputs. If it raises, each
   event is retried alone and the one that fails again is dead-lettered
   (``processing_error``): one bad event never stops a worker;
4. ``stage.tick(now)``: periodic work (index refresh, table reads);
5. flush the producer and check every record's delivery: outputs and dead
   letters are durable in Kafka. A record that failed (an outage past
   ``kafka.delivery_timeout_ms``, any error the producer gave up on) is sent
   again with every record sent after it, in order, until all are
   acknowledged; meanwhile nothing is committed;
6. commit the consumed offsets.
   Outputs to a topic named in ``kafka.linger_ms`` are held that long first
   (one batch per partition per linger rather than per poll: a broker's cost
   grows with the batches it gets); while any are held and none is due, 5 and 6
   wait, and the input of the polls in between is committed with them;
7. every ``snapshots.every_s``: write each assigned partition's state with
   the offset it reflects (``consumers/snapshots.py`` has the whole order).

Newly assigned partitions of the topics a stage snapshots are paused in the
rebalance listener and restored right after the poll, before any record is
handled: the stage loads the partition's snapshot (if valid) and says where
to read from (the snapshot's offset, the beginning, or the committed offset).
A restore that re-reads a log goes a slice per poll (``Stage.catch_up``), the
partition paused until it is done, so that no poll comes later than
``kafka.max_poll_interval_ms`` allows.

Offsets are committed only after what they produced is durable (5 before 6),
so a crash replays at most the last batch: at-least-once. Stage state updates
are idempotent (seed windows ignore replays) or rebuilt from the log.

Broker outages: kafka-python reconnects by itself and the loop keeps polling
(nothing is lost: offsets are only committed after outputs are durable);
``lookalike_broker_up`` drops to 0 and ``lookalike_errors_total{kind=
"broker_unreachable"}`` counts the checks that found it down. When it is back
the loop makes sure the dataflow's topics exist as ``create_topics`` makes
them: a broker that lost its storage (the embedded one keeps topics in
memory) gets them again. If a topic came back with another partition count
(auto-created by the broker), key ownership would silently change: the loop
stops with :class:`TopologyLost`, and ``lookalike worker`` exits with status 3.

Rebalances happen inside step 1 (``poll``), so by then the previous batch has
been through 5 and 6, or its outputs are held (``kafka.linger_ms``): then its
input is uncommitted and the partitions' next owner reads it again (state
updates are idempotent), while the held outputs are still sent; the stage is
told which partitions it lost and drops their state. The range assignor is eager
(every rebalance revokes every partition): restored partitions keep their state
until the new assignment is known, and those that come back are used as they are
(``_kept_state_stands``). (kafka-python 3 runs the
rebalance listener on its IO thread, where a blocking commit is refused: this
order is what makes committing there unnecessary.) Assigned partitions are
announced to the stage before their first record. Transient broker faults are
retried with backoff, never dead-lettered.

Why one module of this size: the seven steps and their failure paths (hold, re-send,
seek back, restore, rejoin) interlock; the order of flush, check, commit and snapshot
is the delivery guarantee, and it is read in one place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

from consumers.kafka import BatchCounter, make_consumer, make_producer, on_rebalance, poll
from consumers.snapshots import Snapshot, SnapshotStore
from consumers.topics_admin import create_topics
from engine.codec import BadEvent
from engine.config import Settings
from engine.metrics import WorkerMetrics
from engine.topics import ALL, Topics

log = logging.getLogger(__name__)

#: after a broker outage, how long a member may stay without partitions before it joins
#: its group again, and how many times (``ConsumerLoop._retry_rejoin``)
REJOIN_AFTER_S = 45.0  # well over a join (a fresh consumer joins in ~6-11 s here)
REJOIN_TRIES = 3
#: how long step 5 waits for the producer before the loop holds its input and polls on
#: (paused) while the outputs are delivered; and each wait while held
FLUSH_S, HELD_FLUSH_S = 5.0, 0.5
#: how long a clean stop waits for its outputs to be delivered before it gives up
#: committing (they are read again by the next owner)
CLOSE_FLUSH_S = 120.0
#: the share of ``max_poll_interval_ms`` a poll may spend catching a restore up
RESTORE_SHARE = 0.25


class TopologyLost(RuntimeError):
    """The broker came back with the dataflow's topics laid out differently."""


@dataclass(slots=True)  # one per output record: on the hot path
class Sent:
    """An output record not yet confirmed: what it was, to send it again if it fails."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None
    partition: int | None
    future: Any


@dataclass(frozen=True)
class Event:
    """A decoded record with where it came from."""

    topic: str  # base topic name (without prefix)
    record: ConsumerRecord
    value: Any


class Stage:
    """What a worker does with its records. Subclasses override what applies."""

    name: str = "stage"
    #: base names of the topics the stage's group consumes
    topics: Sequence[str] = ()
    poll_timeout_ms: int = 100
    max_poll_records: int = 2000
    fetch_max_wait_ms: int = 100

    def __init__(self, settings: Settings):
        self.settings = settings
        self.names = Topics(settings.kafka.topic_prefix)
        self.metrics = WorkerMetrics(self.name)
        self.loop: ConsumerLoop | None = None  # set by the loop

    def decode(self, topic: str, record: ConsumerRecord) -> Any:
        """Validated value of one record; raise BadEvent to dead-letter it."""
        return record.value

    def handle(self, events: list[Event]) -> None:
        """Apply a batch of valid events to state and send outputs."""

    def tick(self, now: float) -> None:
        """Periodic work, called after every poll (also when it was empty)."""

    def drain(self) -> None:
        """On a clean stop, before the last flush: send what ``tick`` was holding back."""

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        """New partitions: load or start their state."""

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions leaving: their outputs are already flushed and committed."""

    #: base names of the consumed topics whose partitions carry state the stage
    #: snapshots and restores (``restore`` / ``snapshot``)
    snapshot_topics: Sequence[str] = ()

    def restore(self, tp: TopicPartition, snap: Snapshot | None,
                committed: int | None) -> int | None:
        """Load a newly assigned partition's state (``snap``: its valid snapshot, if
        any); the offset to read from (0: the beginning), or None for the committed one.
        Runs on the loop's thread before the partition's first record."""
        return None

    def snapshot(self, tp: TopicPartition, offset: int) -> Snapshot | None:
        """The partition's state now, reflecting every record before ``offset``."""
        return None

    def catching_up(self, tp: TopicPartition) -> bool:
        """Whether ``restore`` left work for :meth:`catch_up` (the partition stays paused)."""
        return False

    def catch_up(self, tp: TopicPartition, deadline: float) -> bool:
        """Go on restoring ``tp`` until ``deadline`` (``time.monotonic``); whether done.
        Called once per poll: a restore longer than the poll interval is spread over
        polls, so the member stays in its group."""
        return True

    def start(self) -> None:
        """Resources that need the loop's producer (called once before polling)."""

    def close(self) -> None:
        """Release the stage's own resources."""

    # ------------------------------------------------------------- helpers
    def send(self, topic: str, key: bytes | None, value: bytes | None, count: int = 1,
             headers: list[tuple[str, bytes]] | None = None,
             timestamp_ms: int | None = None, partition: int | None = None) -> None:
        """Send one message on a base topic; ``count`` logical records it carries.

        ``partition``: for packed messages, which hold many keys' records (the
        sender picks the partition those keys hash to); None: by ``key``.
        """
        assert self.loop is not None
        self.loop.send(self.names.name(topic), key, value, headers, timestamp_ms, partition)
        self.metrics.produced.labels(self.name, topic).inc(count)


class ConsumerLoop:
    """Runs one stage until ``stop`` is set. See the module docstring for the order."""

    def __init__(self, stage: Stage, stop: threading.Event | None = None,
                 lag_interval_s: float = 2.0):
        self.stage = stage
        self.settings = stage.settings
        self.stop = stop or threading.Event()
        self.lag_interval_s = lag_interval_s
        self.metrics = stage.metrics
        self.names = stage.names
        self.group_id = f"{self.settings.kafka.topic_prefix}lookalike-{stage.name}"
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.ready = threading.Event()  # set once partitions are assigned
        self._next_lag = 0.0
        self._down_since: float | None = None  # when the broker was first found unreachable
        self._rejoin: tuple[float, int] | None = None  # after an outage: (next try, tries left)
        self.failure: BaseException | None = None  # what stopped the loop, if not ``stop``
        self._next_dlq_log: dict[str, float] = {}
        self._restoring: set[TopicPartition] = set()  # assigned, paused, not yet restored
        self._catching_up: set[TopicPartition] = set()  # restoring a slice per poll
        # stateful partitions: the offset their state reflects (the next to apply)
        self._next: dict[TopicPartition, int | None] = {}
        # revoked by a rebalance, state kept until the assignment says whether they return
        self._kept: dict[TopicPartition, int | None] = {}
        # returned to this member: their state stands if it covers the group's commit
        self._verify: dict[TopicPartition, int | None] = {}
        self._lag_labels: set[TopicPartition] = set()  # partitions whose lag is exported
        snap = self.settings.snapshots
        self.snapshots = SnapshotStore(snap.dir or self.settings.cache_dir / "snapshots",
                                       self.group_id, snap.every_s)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="snapshots")
        self._writing: Future[None] | None = None
        self._unconfirmed: list[Sent] = []  # sent since the last delivered flush, in order
        self._held = False  # outputs undelivered: input paused until they are (_poll_held)
        # outputs held back by ``kafka.linger_ms``, by topic, in the order sent; sent,
        # flushed and committed together once the first of them is due
        self._lingering: dict[str, list[tuple[Any, ...]]] = {}
        self._linger_s: dict[str, float] = {}  # full topic name -> seconds it may wait
        self._linger_due = float("inf")
        self._batches = BatchCounter()
        self._next_delivery_log = 0.0
        stage.loop = self

    # ------------------------------------------------------------- kafka io
    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None,
             timestamp_ms: int | None = None, partition: int | None = None) -> None:
        """An output: sent now, or held for its topic's ``kafka.linger_ms`` (then sent with
        everything else held, flushed and committed: ``poll_once``)."""
        linger = self._linger_s.get(topic)
        if linger is None:
            linger = self._linger_s[topic] = self._linger_of(topic)
        if linger <= 0:
            self._send(topic, key, value, headers or [], timestamp_ms, partition)
            return
        held = self._lingering.get(topic)
        if held is None:
            held = self._lingering[topic] = []
            self._linger_due = min(self._linger_due, time.monotonic() + linger)
        held.append((key, value, headers or [], timestamp_ms, partition))

    def _linger_of(self, topic: str) -> float:
        base = self.names.base(topic)
        key = "dlq" if base.endswith(".dlq") else base
        return self.settings.kafka.linger_ms.get(key, 0) / 1000.0

    def _release(self) -> None:
        """Send every held output, topic by topic in the order each was sent."""
        held = list(self._lingering.items())
        self._lingering, self._linger_due = {}, float("inf")
        for t, (topic, records) in enumerate(held):
            for j, (key, value, headers, ts, partition) in enumerate(records):
                try:
                    self._send(topic, key, value, headers, ts, partition)
                except KafkaError:  # no metadata or buffer yet: the rest wait for the next try
                    self._lingering = {topic: records[j:], **dict(held[t + 1:])}
                    self._linger_due = time.monotonic()
                    raise

    def _send(self, topic: str, key: bytes | None, value: bytes | None,
              headers: list[tuple[str, bytes]], timestamp_ms: int | None,
              partition: int | None) -> None:
        assert self.producer is not None
        future = self.producer.send(topic, key=key, value=value, headers=headers,
                                    timestamp_ms=timestamp_ms, partition=partition)
        self._unconfirmed.append(Sent(topic, key, value, headers, timestamp_ms, partition,
                                      future))

    def dead_letter(self, topic: str, record: ConsumerRecord, err: BadEvent) -> None:
        headers = [
            ("reason", err.reason.encode()),
            ("detail", err.detail[:500].encode("utf-8", "replace")),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
            ("dead_lettered_at", repr(time.time()).encode()),
        ]
        self.send(self.names.dlq(topic), record.key, record.value, headers)
        self.metrics.dead_letters.labels(self.stage.name, topic, err.reason).inc()
        now = time.monotonic()
        if now >= self._next_dlq_log.get(err.reason, 0.0):  # at most one line/s per reason
            self._next_dlq_log[err.reason] = now + 1.0
            log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition,
                        record.offset, err)

    def _flush_and_commit(self, flush_s: float = FLUSH_S) -> bool:
        """Steps 5 and 6: every output acknowledged first, then the offsets. Whether it
        committed; if not, the loop holds its input until the outputs are delivered."""
        assert self.consumer is not None
        if not self._delivered(flush_s):
            self._hold()
            return False
        try:
            self.consumer.commit()
        except (CommitFailedError, RebalanceInProgressError) as e:
            # the group moves on (a rebalance, joined at the next poll, at once: not a
            # broker fault to back off from): whoever owns the partitions next re-reads
            # the batch, and state updates are idempotent
            self.metrics.errors.labels(self.stage.name, "commit").inc()
            log.warning("offset commit failed, batch will be replayed: %s", e)
        return True

    def _delivered(self, flush_s: float) -> bool:
        """Flush (up to ``flush_s``); whether every record sent since the last delivery
        is acknowledged by the broker.

        Why each record is checked: ``flush`` returns once every record has
        *completed*, failed ones included (kafka-python logs them and moves on), so
        committing after a bare flush would commit inputs whose outputs never reached
        the broker. Once nothing is in flight, a failed record is sent again together
        with every record sent after it, in the order they were sent: per key the last
        record stays the newest (latest-wins topics such as ``seed-centroids``), and a
        record that arrives twice is a replay its readers drop (seed windows, the
        centroid table)."""
        assert self.producer is not None
        self._release()
        try:
            self.producer.flush(timeout=flush_s)
        except KafkaError:  # timed out: records still in flight, not failed
            pass
        pending = self._unconfirmed
        waiting = sum(not r.future.is_done for r in pending)
        first = next((i for i, r in enumerate(pending)
                      if r.future.is_done and r.future.failed()), None)
        if first is None and not waiting:
            self._count_batches(pending)
            self._unconfirmed = []
            self.metrics.undelivered.labels(self.stage.name).set(0)
            return True
        self.metrics.undelivered.labels(self.stage.name).set(len(pending) - first
                                                              if first is not None else waiting)
        if first is None or waiting:
            return False  # wait for the producer's own retries to end either way
        again = pending[first:]
        self._hold()  # before sending again, which may raise (no metadata yet)
        self.metrics.errors.labels(self.stage.name, "delivery").inc()
        now = time.monotonic()
        if now >= self._next_delivery_log:  # at most one line per 5 s
            self._next_delivery_log = now + 5.0
            log.warning("%s worker: output to %s not acknowledged (%s); sending it and the "
                        "%d records after it again, committing nothing meanwhile",
                        self.stage.name, again[0].topic, again[0].future.exception,
                        len(again) - 1)
        self._renew_producer()
        self._unconfirmed = pending[:first]
        for j, r in enumerate(again):
            try:
                self._send(r.topic, r.key, r.value, r.headers, r.timestamp_ms, r.partition)
            except KafkaError:  # e.g. no metadata yet: the rest keep their failed futures
                self._unconfirmed.extend(again[j:])
                raise
            self.metrics.resent.labels(self.stage.name).inc()
        return False

    def _count_batches(self, sent: list[Sent]) -> None:
        """``lookalike_batches_produced_total``: the distinct batches the records went in."""
        counter = self._batches
        for r in sent:
            counter.add(r.topic, r.future)
        for topic, n in counter.take().items():
            self.metrics.batches.labels(self.stage.name, self.names.base(topic)).inc(n)

    def _renew_producer(self) -> None:
        """A new producer for sending failed records again. Why: once a batch expires
        after being sent, the idempotent producer drops its producer id and waits for a
        new one before it sends anything; kafka-python against the embedded broker was
        seen to wait for good (the records sent again stayed in flight after the broker
        was back). A new producer starts with a new id; the old one has nothing left in
        flight (records are sent again only then) and is closed at once."""
        old, self.producer = self.producer, self._make_producer()
        try:
            assert old is not None
            old.close(timeout=0)
        except Exception as e:  # noqa: BLE001 - the old client is being dropped anyway
            log.warning("closing the old producer: %s", e)

    def _settle(self, within_s: float) -> bool:
        """Step 5 and 6 until they hold or ``within_s`` passes (a clean stop: its drain
        may hold more than one flush's worth, and its final snapshot needs them
        delivered); whether it committed."""
        deadline = time.monotonic() + within_s
        while not self._flush_and_commit():
            if time.monotonic() >= deadline:
                return False
        return True

    def _hold(self) -> None:
        """Stop consuming until the outputs are delivered (``_poll_held``)."""
        if not self._held:
            self._held = True
            log.warning("%s worker: holding its input until its outputs are delivered",
                        self.stage.name)

    def _poll_held(self) -> None:
        """A poll while outputs wait for delivery: every partition paused, so the member
        stays in its group (``max_poll_interval_ms``) and takes in nothing; then the
        delivery is checked again, and once it holds the offsets are committed and the
        partitions resumed. A record a poll returns anyway (a partition assigned by a
        rebalance inside it) is sought back: it is read again after the hold."""
        assert self.consumer is not None
        self.consumer.pause(*self.consumer.assignment())
        for tp, records in poll(self.consumer, self.stage.poll_timeout_ms).items():
            if records:
                self.consumer.seek(tp, records[0].offset)
        if self._flush_and_commit(HELD_FLUSH_S):
            self._held = False
            self.consumer.resume(*(self.consumer.assignment() - self._restoring))
            log.warning("%s worker: outputs delivered, input resumed", self.stage.name)

    # ------------------------------------------------------------- the loop
    def _decode(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> list[Event]:
        events: list[Event] = []
        for tp, records in polled.items():
            topic = self.names.base(tp.topic)
            self.metrics.consumed.labels(self.stage.name, topic).inc(len(records))
            for rec in records:
                try:
                    events.append(Event(topic, rec, self.stage.decode(topic, rec)))
                except BadEvent as e:
                    self.dead_letter(topic, rec, e)
                except Exception as e:  # noqa: BLE001 - a decoder bug must not kill the worker
                    # no traceback per record: a hostile flood would flood the log
                    self.dead_letter(topic, rec, BadEvent("processing_error",
                                                          f"{type(e).__name__}: {e}"))
        return events

    def _handle(self, events: list[Event]) -> None:
        try:
            self.stage.handle(events)
            return
        except KafkaError:
            raise  # the broker's trouble, not the events': the batch is read again
        except Exception:
            if len(events) == 1:
                ev = events[0]
                log.exception("event failed")
                self.dead_letter(ev.topic, ev.record, BadEvent("processing_error", "see log"))
                return
            log.exception("batch of %d failed; retrying event by event", len(events))
        for ev in events:
            try:
                self.stage.handle([ev])
            except KafkaError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad event never kills the worker
                detail = f"{type(e).__name__}: {e}"
                self.dead_letter(ev.topic, ev.record, BadEvent("processing_error", detail))

    def poll_once(self) -> int:
        assert self.consumer is not None
        if self._held:
            self._poll_held()
            self._report_lag()
            return 0
        polled = poll(self.consumer, self.stage.poll_timeout_ms, self.stage.max_poll_records)
        t0 = time.perf_counter()
        self._restore()
        self.metrics.restoring.labels(self.stage.name).set(len(self._restoring))
        n = sum(len(v) for v in polled.values())
        if n:
            for tp, records in polled.items():
                if records and tp in self._next:
                    self._next[tp] = records[-1].offset + 1
            events = self._decode(polled)
            try:
                if events:
                    self._handle(events)
            except KafkaError:  # e.g. a send that found no buffer space: read it all again
                for tp, records in polled.items():
                    if records:
                        self.consumer.seek(tp, records[0].offset)
                raise
        self.stage.tick(time.time())
        if self._lingering and time.monotonic() < self._linger_due:
            pass  # outputs held (kafka.linger_ms): sent, flushed and committed when due
        elif n or self._lingering:
            self._flush_and_commit()
        elif self._unconfirmed and not self._delivered(FLUSH_S):  # an idle poll's outputs
            self._hold()
        if n:
            self.metrics.batch_seconds.labels(self.stage.name).observe(time.perf_counter() - t0)
        if self.snapshots.due():
            self.write_snapshots()
        self._report_lag()
        return n

    # ------------------------------------------------------------- snapshots
    def _snapshotted(self, partitions: set[TopicPartition]) -> set[TopicPartition]:
        return {tp for tp in partitions
                if self.names.base(tp.topic) in self.stage.snapshot_topics}

    def _restore(self) -> None:
        """Newly assigned partitions: their state from a snapshot or the log, then resume.

        A partition is only polled from where its state leaves off: it stays paused
        from the rebalance until its restore is done (nothing of it was handled
        meanwhile). A stage whose restore re-reads a log does it a slice per poll
        (``Stage.catch_up``, at most ``RESTORE_SHARE`` of ``max_poll_interval_ms``)."""
        if not self._restoring:
            return
        assert self.consumer is not None
        deadline = time.monotonic() + RESTORE_SHARE * self.settings.kafka.max_poll_interval_ms / 1e3
        self._restoring &= self.consumer.assignment()
        self._catching_up &= self._restoring
        for n, tp in enumerate(sorted(self._restoring - self._catching_up)):
            if n and time.monotonic() > deadline:
                break  # the rest next poll: several large snapshots outlast the poll interval
            # one at a time: a broker error here (raised to the loop, retried next poll)
            # leaves the partitions not yet restored paused and queued, never lost
            committed = self.consumer.committed(tp)
            if tp in self._verify and self._kept_state_stands(tp, committed):
                continue
            snap = self.snapshots.load(tp, committed) if self.snapshots.enabled else None
            start = self.stage.restore(tp, snap, committed)
            if start == 0:
                self.consumer.seek_to_beginning(tp)
            elif start is not None:
                self.consumer.seek(tp, start)
            log.info("%s: %s restored %s", self.stage.name, tp,
                     f"from a snapshot at offset {snap.offset}" if snap else "from the log")
            self._next[tp] = committed
            if self.stage.catching_up(tp):
                self._catching_up.add(tp)
            else:
                self._restoring.discard(tp)
                self.consumer.resume(tp)
        for tp in sorted(self._catching_up):
            if self.stage.catch_up(tp, deadline):
                self._catching_up.discard(tp)
                self._restoring.discard(tp)
                self.consumer.resume(tp)
                log.info("%s: %s caught up with its log", self.stage.name, tp)

    def _kept_state_stands(self, tp: TopicPartition, committed: int | None) -> bool:
        """A partition this member held before the rebalance and got back: its state is
        used as it is when it covers the group's committed offset (everything before it
        was applied here: nobody committed past what this member applied); polling
        resumes at the committed offset, and the records between it and what was
        applied come again, which state updates ignore (they are idempotent: a commit
        refused by the rebalance leaves such records). Otherwise the state is dropped
        and the partition restored as any new one."""
        assert self.consumer is not None
        applied = self._verify.pop(tp)
        if not (committed == applied or (committed is not None and applied is not None
                                          and committed <= applied)):
            self.stage.on_revoked({tp})
            return False
        if committed is not None:
            self.consumer.seek(tp, committed)
        self._next[tp] = committed
        self._restoring.discard(tp)
        self.consumer.resume(tp)
        self.metrics.kept_partitions.labels(self.stage.name).inc()
        log.info("%s: %s kept its state through the rebalance (offset %s)", self.stage.name,
                 tp, committed)
        return True

    def write_snapshots(self, wait: bool = False) -> int:
        """Step 7: outputs flushed and offsets committed first, then each assigned
        partition's state with the offset it reflects. Returns the snapshots taken.

        The state is copied here, between two polls; the files are written on a
        background thread (the loop must poll again within ``max_poll_interval_ms``,
        and a large state takes seconds to write). While one round is still being
        written the next is skipped. ``wait``: write before returning (a clean stop).
        """
        assert self.consumer is not None
        if self._down_since is not None and not wait:
            return 0  # its commit would wait out the request timeout: after the outage
        parts = self._snapshotted(self.consumer.assignment()) - self._restoring
        if not parts or (self._writing is not None and not self._writing.done()
                         and not wait):
            return 0
        if self._writing is not None:
            self._writing.result()
        if self._held or not self._flush_and_commit():
            return 0  # a snapshot reflects delivered outputs only
        snaps = [(tp, self.stage.snapshot(tp, self.consumer.position(tp)))
                 for tp in sorted(parts)]
        snaps = [(tp, snap) for tp, snap in snaps if snap is not None]
        self._writing = self._writer.submit(self._save_all, snaps)
        if wait:
            self._writing.result()
        return len(snaps)

    def _save_all(self, snaps: list[tuple[TopicPartition, Snapshot]]) -> None:
        t0 = time.perf_counter()
        for tp, snap in snaps:
            try:
                self.snapshots.save(tp, snap)
            except OSError as e:  # a full disk must not stop the worker: the log remains
                self.metrics.errors.labels(self.stage.name, "snapshot").inc()
                log.error("snapshot of %s not written (%s); the previous one stays", tp, e)
        log.info("%s: %d snapshots written in %.2f s", self.stage.name, len(snaps),
                 time.perf_counter() - t0)

    def _report_lag(self) -> None:
        now = time.monotonic()
        if now < self._next_lag or self.consumer is None:
            return
        self._next_lag = now + self.lag_interval_s
        if not self._check_broker(now):
            return
        mine = self.consumer.assignment()
        for tp in self._lag_labels - mine:  # revoked while a report was being made (the
            self._drop_lag(tp)  # rebalance listener runs on kafka-python's IO thread)
        for tp in mine:
            hw = self.consumer.highwater(tp)
            if hw is None:
                continue
            try:
                pos = self.consumer.position(tp, timeout_ms=100)
            except KafkaError:
                continue
            if pos is not None:
                self.metrics.lag.labels(
                    self.stage.name, self.names.base(tp.topic), str(tp.partition)
                ).set(max(0, hw - pos))
                self._lag_labels.add(tp)

    def _drop_lag(self, tp: TopicPartition) -> None:
        """Another member reports this partition's lag now."""
        self._lag_labels.discard(tp)
        try:
            self.metrics.lag.remove(self.stage.name, self.names.base(tp.topic),
                                    str(tp.partition))
        except KeyError:
            pass

    def _check_broker(self, now: float) -> bool:
        """Whether a broker answers; after an outage, the topics checked (module doc)."""
        assert self.consumer is not None
        try:
            client = self.consumer._client  # kafka-python's network client: connection states
            up = any(client.connected(b.node_id) for b in client.cluster.brokers())
        except Exception:  # noqa: BLE001 - a health probe must never stop the worker
            log.exception("broker health check failed; assuming the broker is up")
            return True
        self.metrics.broker_up.labels(self.stage.name).set(1 if up else 0)
        if not up:
            self.metrics.errors.labels(self.stage.name, "broker_unreachable").inc()
            if self._down_since is None:
                self._down_since = now
                log.warning("%s worker: broker unreachable; retrying (nothing is lost: offsets "
                            "are committed only after outputs are durable)", self.stage.name)
            return False
        if self._down_since is not None:
            log.warning("%s worker: broker back after %.0f s", self.stage.name,
                        now - self._down_since)
            self._down_since = None
            self.ensure_topics()
            self._rejoin = (now + REJOIN_AFTER_S, REJOIN_TRIES)
        elif self._rejoin is not None:
            self._retry_rejoin(now)
        return True

    def _retry_rejoin(self, now: float) -> None:
        """After an outage, join the group again while no partition comes back.

        Why: a member whose join is cut short (by its own leave, or a broker that
        went away mid-join) can linger in the embedded broker's group as a leader
        that never syncs, and every join then fails with "coordinator rebalance".
        A fresh consumer gets a fresh member id. Bounded: a member of a group with
        more members than partitions legitimately has none, and each try rebalances.
        """
        assert self.consumer is not None and self._rejoin is not None
        due, left = self._rejoin
        if self.consumer.assignment():
            self._rejoin = None
        elif now >= due:
            if left == 0:
                log.warning("%s worker: no partitions since the broker came back; if this "
                            "group has no more members than partitions, restart it",
                            self.stage.name)
                self._rejoin = None
                return
            log.warning("%s worker: no partitions %.0f s after the broker came back: "
                        "joining the group again with a new consumer", self.stage.name,
                        REJOIN_AFTER_S)
            self._replace_consumer()
            self._rejoin = (now + REJOIN_AFTER_S, left - 1)

    def _replace_consumer(self) -> None:
        """Drop the consumer (no commit: its member is gone) and join with a new one."""
        assert self.consumer is not None
        try:
            self.consumer.close(autocommit=False)
        except Exception as e:  # noqa: BLE001 - the old client is being dropped anyway
            log.warning("closing the old consumer: %s", e)
        self._restoring.clear()  # paused on the old client; the new one assigns afresh
        self._catching_up.clear()
        self._verify.clear()
        held = set(self._next) | set(self._kept)
        if held:  # the new member restores whatever it is assigned
            self.stage.on_revoked(held)
        self._next.clear()
        self._kept.clear()
        self.metrics.assigned.labels(self.stage.name).set(0)
        self._subscribe()

    def _subscribe(self) -> None:
        """A new consumer of the stage's group, subscribed to the stage's topics."""
        self.consumer = make_consumer(
            self.settings.kafka, self.group_id,
            fetch_max_wait_ms=self.stage.fetch_max_wait_ms,
            max_poll_records=self.stage.max_poll_records,
        )
        topics = [self.names.name(t) for t in self.stage.topics]
        self.consumer.subscribe(topics, listener=on_rebalance(self._on_revoked, self._on_assigned))

    def ensure_topics(self) -> None:
        """The dataflow's topics as ``create_topics`` makes them, or :class:`TopologyLost`.

        Topics the broker lost are created again and the consumer's metadata is
        refreshed at once: the topics' new partitions change its metadata snapshot,
        and kafka-python rejoins the group by itself, assigned the new (empty)
        partitions from their beginning. The rejoin revokes the partitions first, and
        the stage drops their state as at any revocation; their logs are gone with
        the storage, so nothing rebuilds it: after a broker loses its storage, the
        stages start over from what arrives next.

        Tried and dropped: re-subscribing the consumer (its join took over 30 s on
        the embedded broker) and replacing it at once (when the old one was already
        rejoining, closing it mid-join left a member in the broker's group that
        blocked every later join for minutes: a fresh-clone CI failure).
        """
        assert self.consumer is not None
        created = create_topics(self.settings.kafka)
        if created:
            log.warning("the broker came back without %d topics (storage lost?): recreated %s",
                        len(created), ", ".join(created))
            cluster = getattr(getattr(self.consumer, "_client", None), "cluster", None)
            if cluster is not None:  # else: the next periodic refresh finds them
                cluster.request_update()
        want = self.settings.kafka.partitions
        admin_view = self.consumer.topics()  # fresh metadata: the recreated topics included
        wrong = {}
        for t in (self.names.name(t) for t in ALL):
            parts = self.consumer.partitions_for_topic(t) if t in admin_view else None
            if parts is not None and len(parts) != want:
                wrong[t] = len(parts)
        if wrong:
            raise TopologyLost(
                f"after the broker outage these topics have other partition counts than "
                f"kafka.partitions = {want}: {wrong} (auto-created by the broker?). Keys would "
                "move between workers and their state with them: stop the workers, delete and "
                "recreate the topics (`lookalike topics create`), then start the workers again")

    def _on_revoked(self, partitions: set[TopicPartition]) -> None:
        """The range assignor is eager: every rebalance revokes every partition, the
        member's own included. Restored partitions keep their state until the new
        assignment (``_on_assigned``) says which come back; partitions still being
        restored and stateless ones are dropped at once."""
        partial = partitions & (self._restoring | set(self._verify))
        self._restoring -= partitions
        self._catching_up -= partitions
        for tp in partitions & self._next.keys():
            at = self._next.pop(tp)
            if tp not in partial:
                self._kept[tp] = at
        for tp in partial:
            self._verify.pop(tp, None)
        self.stage.on_revoked(partitions - self._kept.keys())
        for tp in partitions:
            self._drop_lag(tp)
        self.metrics.assigned.labels(self.stage.name).set(0)

    def _on_assigned(self, partitions: set[TopicPartition]) -> None:
        kept, self._kept = self._kept, {}
        if kept.keys() - partitions:
            self.stage.on_revoked(kept.keys() - partitions)
        mine = self._snapshotted(partitions)
        self._verify.update({tp: kept[tp] for tp in mine & kept.keys()})
        if mine:  # restored on the loop's thread after this poll (``_restore``)
            assert self.consumer is not None
            self.consumer.pause(*mine)
            self._restoring |= mine
        self.stage.on_assigned(partitions)
        self.metrics.assigned.labels(self.stage.name).set(len(partitions))
        self.ready.set()

    def _make_producer(self) -> KafkaProducer:
        # a send that finds no metadata or buffer space raises after 5 s instead of
        # holding the loop past max_poll_interval_ms (the loop reads the batch again)
        return make_producer(self.settings.kafka, max_block_ms=5_000)

    def open(self) -> None:
        self.producer = self._make_producer()
        self._subscribe()
        self.stage.start()
        self.metrics.broker_up.labels(self.stage.name).set(1)

    def close(self) -> None:
        if self.consumer is not None:
            try:
                if self.consumer.assignment():
                    self.stage.drain()
                    if not self._settle(CLOSE_FLUSH_S):
                        log.warning("%s worker stopping with %d output records not "
                                    "acknowledged: its offsets stay uncommitted (the input "
                                    "is read again)", self.stage.name, len(self._unconfirmed))
                    elif self.snapshots.enabled:
                        self.write_snapshots(wait=True)
            except KafkaError as e:
                log.warning("final commit failed: %s", e)
            self.consumer.close(autocommit=False)
        if self.producer is not None:
            self.producer.close(timeout=10)
        self._writer.shutdown(wait=True)
        self.stage.close()

    def run(self) -> None:
        """Poll until ``stop`` is set, then flush, commit and close. A fatal error is kept
        in ``failure`` (the ``worker`` command exits non-zero with it)."""
        try:
            self._run()
        except Exception as e:
            self.failure = e
            log.critical("%s worker stopped: %s", self.stage.name, e)
            raise

    def _run(self) -> None:
        self.open()
        log.info("%s worker polling %s as group %s", self.stage.name,
                 list(self.stage.topics), self.group_id)
        try:
            while not self.stop.is_set():
                try:
                    self.poll_once()
                except KafkaError as e:  # broker trouble: back off and go on
                    self.metrics.errors.labels(self.stage.name, type(e).__name__).inc()
                    log.warning("kafka error in poll loop: %s", e)
                    self.stop.wait(1.0)
        finally:
            self.close()
