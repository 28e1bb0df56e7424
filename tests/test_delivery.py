"""Delivery guarantees on the embedded broker: what a worker publishes is what the
input log implies, however often a record is read (issue: delivery you can trust)."""

from __future__ import annotations

import signal
import time

import numpy as np
import orjson
import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from consumers.clustering import ClusteringStage
from consumers.kafka import make_consumer
from consumers.runner import start_worker
from consumers.scoring import ScoringStage
from consumers.topics_admin import create_topics
from engine.clustering import ItemClusters, decode_records
from engine.codec import PACK_MAGIC, SeedBatch, decode_centroids, decode_key, encode_seeds, key_of
from engine.config import Settings, load_settings
from engine.topics import Topics
from lookalike.broker import EmbeddedBroker
from lookalike.scrape import scrape, total
from models.ralm import RalmConfig, RalmModel
from models.train_ralm import train_ralm
from tests.kafka_fixtures import produce, read_all, wait_until

N_CLICKS = 300


@pytest.fixture(scope="module")
def tiny_ralm(ml100k, tmp_path_factory) -> RalmModel:
    cfg = RalmConfig.tiny(user_epochs=1, lookalike_epochs=1, episode_steps=5)
    path = train_ralm(ml100k.time_split(0.8)[0], cfg, tmp_path_factory.mktemp("ckpt"),
                      progress=False, log=lambda *_: None)
    return RalmModel.load(path)


def _score_clicks(s: Settings, model: RalmModel, n: int) -> None:
    """One scoring worker until it has consumed ``n`` clicks; then a clean stop."""
    w = start_worker(ScoringStage(s, model))
    try:
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_events_consumed_total",
                                 topic="clicks") >= n, what="clicks consumed")
    finally:
        w.stop()


def _rewind_group(s: Settings, stage: str, topic: str) -> None:
    """Commit offset 0 for every partition of ``topic`` in the stage's group: the next
    worker reads the whole log again, as after a crash before any commit."""
    name = Topics(s.kafka.topic_prefix).name(topic)
    c = make_consumer(s.kafka, f"{s.kafka.topic_prefix}lookalike-{stage}")
    try:
        tps = [TopicPartition(name, p) for p in sorted(c.partitions_for_topic(name))]
        c.assign(tps)
        c.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
    finally:
        c.close(autocommit=False)


def _clusters(s: Settings, records: list) -> ItemClusters:
    """The clustering worker's state after ``seed-events`` in offset order."""
    state = ItemClusters(s.window)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        item = None if r.value[:2] == PACK_MAGIC else decode_key(r.key)
        for cols, _ in decode_records([item], [r.value])[0]:
            state.apply_columns(cols)
    return state


def _windows(state: ItemClusters) -> dict[int, tuple]:
    out = {}
    for item, ic in state.items.items():
        w = ic.window
        out[item] = (tuple(zip(w.users(), w.times(), strict=True)),
                     tuple(np.asarray(ic.counts).tolist()))
    return out


def test_clicks_without_ts_replayed_after_a_crash_change_no_window(settings, ml100k, tiny_ralm,
                                                                 tmp_path):
    """Clicks without ``ts`` read twice (the group's offsets rewound, as a crash before
    the commit leaves them) give the same seeds: windows and centroid counts equal a
    run that read them once. (With the wall clock at decode time as the click's time,
    the second read's seeds were newer: admitted again and counted twice.)"""
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"k": tiny_ralm.k}),
        "scoring": settings.scoring.model_copy(update={"min_seeds": 1})})
    users = ml100k.users.ids[ml100k.user[:N_CLICKS]].tolist()
    items = ml100k.items.ids[ml100k.item[:N_CLICKS]].tolist()
    produce(s, "clicks", [(key_of(u), orjson.dumps({"user_id": u, "item_id": i}))
                          for u, i in zip(users, items, strict=True)])
    _score_clicks(s, tiny_ralm, N_CLICKS)
    once = read_all(s, "seed-events")
    time.sleep(1.5)  # a later wall clock for the second read
    _rewind_group(s, "scoring", "clicks")
    again = s.model_copy(update={"cache_dir": tmp_path / "fresh"})  # no snapshot to start from
    _score_clicks(again, tiny_ralm, N_CLICKS)
    twice = read_all(s, "seed-events")
    assert len(twice) > len(once)  # the second worker did emit seeds again
    assert _windows(_clusters(s, twice)) == _windows(_clusters(s, once))


def test_a_batch_that_fails_after_applying_its_clicks_applies_no_click_twice(
        settings, ml100k, tiny_ralm):
    """A poisoned click makes ``handle`` fail after the batch's clicks were applied
    (the fault injected where their seeds are emitted: no real record makes the stage
    raise there), so the loop retries the batch event by event. No click is applied
    twice: each user's state is what the click log implies; the poisoned click alone
    is dead-lettered, and every other click's seed is still sent."""
    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"k": tiny_ralm.k})})
    users = ml100k.users.ids[ml100k.user[:N_CLICKS]].tolist()
    items = ml100k.items.ids[ml100k.item[:N_CLICKS]].tolist()
    poison = (users[N_CLICKS // 2], items[N_CLICKS // 2])
    produce(s, "clicks", [(key_of(u), orjson.dumps({"user_id": u, "item_id": i, "ts": 1e9}))
                          for u, i in zip(users, items, strict=True)])
    stage = ScoringStage(s, tiny_ralm)
    emit, batches = stage._emit_click_seeds, []

    def poisoned(events, last, vecs):
        batches.append(len(events))
        if any((ev.value.user_id, ev.value.item_id) == poison for ev in events):
            raise RuntimeError("injected fault")
        return emit(events, last, vecs)

    stage._emit_click_seeds = poisoned
    w = start_worker(stage)
    try:
        wait_until(lambda: total(scrape(w.metrics_url), "lookalike_dead_letters_total") >= 1
                   and total(scrape(w.metrics_url), "lookalike_events_consumed_total",
                             topic="clicks") >= N_CLICKS, what="clicks and the poison handled")
        assert max(batches) > 1  # the poison came in a batch with other clicks
        want: dict[int, list[int]] = {}
        for u, i in zip(users, items, strict=True):
            want.setdefault(u, []).append(i)
        got = {u: (st.clicks, st.history) for u, st in stage.users.users.items()}
        assert got == {u: (len(v), v[-s.scoring.history_len:]) for u, v in want.items()}
        dlq = read_all(s, "clicks.dlq", expect=1)
        assert [dict(r.headers)["reason"] for r in dlq] == [b"processing_error"]
        seeds = _clusters(s, read_all(s, "seed-events"))
        assert sum(len(c.window) for c in seeds.items.values()) == len(set(zip(
            users, items, strict=True))) - 1  # every click's seed but the poisoned one's
    finally:
        w.stop()


def _seeds(s: Settings, item: int) -> None:
    rng = np.random.default_rng(item)
    produce(s, "seed-events", [(key_of(item), encode_seeds(SeedBatch(
        np.arange(10, dtype=np.int64), np.full(10, 1.7e9),
        rng.normal(size=(10, 16)).astype(np.float32), "v")))])


@pytest.mark.slow
def test_outputs_lost_in_an_outage_are_sent_again_and_nothing_is_committed_meanwhile(tmp_path):
    """The broker stops (SIGSTOP) after a clustering worker consumed seeds and before
    their centroids were delivered, and stays stopped past ``delivery_timeout_ms``, so
    the producer gives the records up. The worker commits nothing and takes in
    nothing while they are undelivered (it holds its input); once the broker runs
    again (SIGCONT) it sends them again: the item's centroids are there. (Before, the
    failed records were dropped: ``flush`` returns on failure, and the offsets were
    committed past them.)"""
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    s = load_settings(None, cache_dir=tmp_path / "cache", **{
        "kafka.bootstrap_servers": broker.bootstrap_servers, "kafka.topic_prefix": "outage-",
        "kafka.delivery_timeout_ms": 2000, "window.publish_interval_s": 30.0,
        "snapshots.every_s": 0.0})  # no snapshot's commit racing the stop
    create_topics(s.kafka)
    stage = ClusteringStage(s)
    w = start_worker(stage)
    commits_while_undelivered: list[int] = []
    commits: list[int] = []
    try:
        wait_until(w.loop.ready.is_set, what="clustering worker ready")
        consumer = w.loop.consumer
        commit = consumer.commit

        def spied(*args, **kwargs):
            if w.loop._unconfirmed:
                commits_while_undelivered.append(len(w.loop._unconfirmed))
            out = commit(*args, **kwargs)
            commits.append(1)
            return out

        consumer.commit = spied
        _seeds(s, 1)  # a first item's centroids: the producer knows the topic from then on
        assert [decode_key(r.key) for r in read_all(s, "seed-centroids", expect=1)] == [1]
        before = len(commits)
        _seeds(s, 7)
        wait_until(lambda: stage.state.seeds_held() == 20 and len(commits) > before,
                   what="seeds consumed and committed")  # no commit in flight at the stop
        broker.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            stage._next_publish = time.time()  # publish item 7 now, into the stopped broker
            wait_until(lambda: w.loop._held, timeout_s=30,  # nothing taken in or committed
                       what="the centroids' delivery failing, the input held")
            m = scrape(w.metrics_url)
            assert total(m, "lookalike_errors_total", kind="delivery") >= 1
            assert total(m, "lookalike_undelivered_records") >= 1
        finally:
            broker.proc.send_signal(signal.SIGCONT)
            stopped_for = time.monotonic() - stopped_at
        back = time.monotonic()
        _seeds(s, 8)  # taken in only once the hold ends
        wait_until(lambda: not w.loop._held, timeout_s=60, what="input resumed")
        print(f"broker stopped {stopped_for:.1f} s; outputs delivered and input resumed "
              f"{time.monotonic() - back:.2f} s after it was back")
        got = {}
        for r in read_all(s, "seed-centroids", timeout_s=10):
            got[decode_key(r.key)] = decode_centroids(r.value).n_seeds
        assert got.get(7) == 10  # delivered after all
        wait_until(lambda: stage.state.seeds_held() == 30, what="seeds after the hold")
        assert total(scrape(w.metrics_url), "lookalike_records_resent_total") >= 1
        assert commits_while_undelivered == []
    finally:
        w.stop()
        broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


def _produce_to(s: Settings, topic: str, records: list[tuple[bytes | None, bytes, int | None]]):
    """Records on a base topic, each to the partition given (None: the key's)."""
    from consumers.kafka import make_producer

    p = make_producer(s.kafka, linger_ms=2)
    for key, value, partition in records:
        p.send(Topics(s.kafka.topic_prefix).name(topic), key=key, value=value,
               partition=partition)
    p.flush()
    p.close()


def test_records_on_another_partition_than_their_users_are_forwarded_there(
        settings, ml100k, tiny_ralm):
    """A producer that writes a user's clicks and requests to the wrong partition (as
    librdkafka's default CRC32 partitioner does for half the keys), or keys a click by
    something else than its ``user_id``: the worker forwards each record to its user's
    partition (murmur2 of the user id) and counts it; the user's state lives there, and
    a request is answered from the whole history."""
    from engine.topics import KeyPartitions

    s = settings.model_copy(update={
        "window": settings.window.model_copy(update={"k": tiny_ralm.k}),
        "scoring": settings.scoring.model_copy(update={"min_seeds": 1})})
    users = ml100k.users.ids[:50]
    home = KeyPartitions().of(users, s.kafka.partitions)
    a, b = int(users[home == 1][0]), int(users[home == 0][0])
    items = ml100k.items.ids[:6].tolist()
    wrong_key = next(k for k in range(1000) if KeyPartitions().of(np.array([k]), 2)[0] == 1)
    clicks = [(key_of(a), orjson.dumps({"user_id": a, "item_id": i, "ts": 1e9 + j}), 0)
              for j, i in enumerate(items[:5])]  # user a belongs on partition 1
    clicks.append((key_of(wrong_key), orjson.dumps({"user_id": b, "item_id": items[5],
                                                    "ts": 1e9}), None))  # lands on 1
    _produce_to(s, "clicks", clicks)
    stage = ScoringStage(s, tiny_ralm)
    w = start_worker(stage)
    try:
        wait_until(lambda: (st := stage.users.get(a)) is not None and st.clicks == 5
                   and stage.users.get(b) is not None, what="forwarded clicks applied")
        assert stage.users.get(a).partition == 1 and stage.users.get(b).partition == 0
        assert stage.users.get(a).history == items[:5]
        _produce_to(s, "score-requests", [(key_of(a), orjson.dumps(
            {"user_id": a, "request_id": "misrouted"}), 0)])
        recs = [orjson.loads(r.value) for r in read_all(s, "recommendations", expect=1)]
        assert recs[0]["request_id"] == "misrouted" and recs[0]["cold"] is False
        assert not set(items[:5]) & {r["item_id"] for r in recs[0]["items"]}
        m = scrape(w.metrics_url)
        assert total(m, "lookalike_misrouted_total", topic="clicks") == 6
        assert total(m, "lookalike_misrouted_total", topic="score-requests") == 1
        on = {}
        for r in read_all(s, "clicks"):
            on.setdefault(orjson.loads(r.value)["user_id"], set()).add(r.partition)
        assert on[a] == {0, 1} and on[b] == {0, 1}  # the originals, and the forwarded copies
    finally:
        w.stop()


def test_a_restore_longer_than_the_poll_interval_keeps_the_member_in_its_group(
        settings, ml100k, tiny_ralm, monkeypatch):
    """A scoring worker restores its users from the clicks log (no snapshots) for longer
    than ``max_poll_interval_ms``: the restore goes a slice per poll, so the member is
    never dropped from its group (no second assignment, no revocation) and its users
    end as the first worker left them. The slowness is injected (a sleep per chunk of
    replayed clicks: this machine replays 3,000 clicks in well under the interval)."""
    from consumers import scoring
    from consumers.replay import replay

    s = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"max_poll_interval_ms": 2000}),
        "window": settings.window.model_copy(update={"k": tiny_ralm.k}),
        "snapshots": settings.snapshots.model_copy(update={"every_s": 0.0})})
    replay(ml100k, s.kafka, limit=N_CLICKS * 10, progress=False)
    _score_clicks(s, tiny_ralm, N_CLICKS * 10)  # commits; writes no snapshot
    clicks: dict[int, list[int]] = {}
    for u, i in zip(ml100k.users.ids[ml100k.user[:N_CLICKS * 10]].tolist(),
                    ml100k.items.ids[ml100k.item[:N_CLICKS * 10]].tolist(), strict=True):
        clicks.setdefault(u, []).append(i)
    before = {u: (len(v), v[-s.scoring.history_len:]) for u, v in clicks.items()}

    monkeypatch.setattr(scoring.ClickReplay, "chunk", 300)
    second = ScoringStage(s, tiny_ralm)
    apply, assigned, revoked = second._apply_clicks, [], []

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return apply(*args, **kwargs)

    second._apply_clicks = slow
    on_assigned, on_revoked = second.on_assigned, second.on_revoked
    second.on_assigned = lambda parts: (assigned.append(parts), on_assigned(parts))[1]
    second.on_revoked = lambda parts: (parts and revoked.append(parts), on_revoked(parts))[1]
    t0 = time.monotonic()
    w = start_worker(second)
    try:
        wait_until(lambda: w.loop.ready.is_set() and not w.loop._restoring, timeout_s=120,
                   what="the restore done")
        took = time.monotonic() - t0
        assert took > 2.0  # longer than max_poll_interval_ms
        time.sleep(2.5)  # a member dropped for a late poll would be rebalanced by now
        assert len(assigned) == 1 and revoked == []
        after = {u: (st.clicks, st.history) for u, st in second.users.users.items()}
        assert after == before
    finally:
        w.stop()


def test_snapshot_restores_longer_than_the_poll_interval_together_keep_the_member(
        settings, ml100k, tiny_ralm, tmp_path):
    """Two partitions whose snapshots each take most of ``max_poll_interval_ms`` to
    restore: the loop restores one per poll, so the member stays in its group (one
    assignment, no revocation) and no partition is restored twice. Restoring both in
    one poll dropped the member, and the new assignment restored them again, each time
    (a clustering worker with 10k items per partition looped so in the recovery bench).
    The slowness is injected (a sleep per restore)."""
    from consumers.replay import replay

    s = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"max_poll_interval_ms": 3000}),
        "window": settings.window.model_copy(update={"k": tiny_ralm.k}),
        "snapshots": settings.snapshots.model_copy(update={"every_s": 30.0,
                                                            "dir": tmp_path / "snaps"})})
    replay(ml100k, s.kafka, limit=N_CLICKS, progress=False)
    _score_clicks(s, tiny_ralm, N_CLICKS)  # its clean stop writes both snapshots
    assert len(list((tmp_path / "snaps").rglob("*.npz"))) == 2

    second = ScoringStage(s, tiny_ralm)
    restore, restored, assigned, revoked = second.restore, [], [], []

    def slow(tp, snap, committed):
        time.sleep(2.0)  # two of them: longer than the interval
        restored.append((tp.partition, snap is not None))
        return restore(tp, snap, committed)

    second.restore = slow
    on_assigned, on_revoked = second.on_assigned, second.on_revoked
    second.on_assigned = lambda parts: (assigned.append(parts), on_assigned(parts))[1]
    second.on_revoked = lambda parts: (parts and revoked.append(parts), on_revoked(parts))[1]
    w = start_worker(second)
    try:
        wait_until(lambda: w.loop.ready.is_set() and len(restored) >= 2
                   and not w.loop._restoring, timeout_s=120, what="both restores done")
        time.sleep(3.0)  # a member dropped for a late poll would be rebalanced by now
        assert sorted(restored) == [(0, True), (1, True)]
        assert len(assigned) == 1 and revoked == []
        assert total(scrape(w.metrics_url), "lookalike_partitions_restoring") == 0
    finally:
        w.stop()
