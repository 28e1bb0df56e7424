"""Clustering workers on the embedded broker: windows, centroids, dead letters."""

import time
from collections import defaultdict

import numpy as np

from consumers.clustering import ClusteringStage
from consumers.runner import start_worker
from engine.codec import (
    SeedBatch,
    SeedPack,
    decode_centroids,
    encode_seed_pack,
    encode_seeds,
    key_of,
)
from lookalike.scrape import scrape, total
from tests.kafka_fixtures import produce, read_all, wait_until


def _seed_events(n_items=12, n_users=40, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    out, expected = [], defaultdict(set)
    for t in range(300):
        item, user = int(rng.integers(n_items)), int(rng.integers(n_users))
        vec = rng.normal(size=(1, dim)).astype(np.float32)
        batch = SeedBatch(np.array([user]), np.array([float(t)]), vec, "v1")
        out.append((key_of(item), encode_seeds(batch)))
        expected[item].add(user)
    return out, expected


def test_two_workers_own_disjoint_items_and_publish_centroids(settings):
    settings = settings.model_copy(update={"window": settings.window.model_copy(
        update={"size": 1000, "k": 4})})
    stages = [ClusteringStage(settings) for _ in range(2)]
    workers = [start_worker(s) for s in stages]
    try:
        wait_until(lambda: all(w.loop.ready.is_set() for w in workers), what="group join")
        wait_until(lambda: sum(len(w.loop.consumer.assignment()) for w in workers) == 2,
                   what="both partitions assigned")
        events, expected = _seed_events()
        bad = [(key_of(1), b"garbage"), (b"not-an-id", events[0][1])]
        produce(settings, "seed-events", events[:150] + bad + events[150:])

        def done():
            return sum(s.state.seeds_held() for s in stages) == sum(map(len, expected.values()))
        wait_until(done, what="all seeds in windows")

        # every seed is in exactly one window, and the windows hold exactly the clickers
        owners = defaultdict(list)
        for i, s in enumerate(stages):
            for item, st in s.state.items.items():
                owners[item].append(i)
                assert set(st.window.users()) == expected[item]
        assert all(len(o) == 1 for o in owners.values()) and set(owners) == set(expected)

        # centroids for every clicked item appear on the compacted table
        latest = {}
        for rec in read_all(settings, "seed-centroids"):
            latest[int(rec.key)] = decode_centroids(rec.value)
        assert set(latest) == set(expected)
        assert all(latest[i].n_seeds == len(expected[i]) for i in expected)

        # the bad records are dead-lettered with their reason; the good ones around them counted
        dlq = read_all(settings, "seed-events.dlq", expect=2)
        reasons = sorted(dict(r.headers)["reason"].decode() for r in dlq)
        assert reasons == ["bad_binary", "schema"]
        metrics = [scrape(w.metrics_url) for w in workers]
        assert sum(total(m, "lookalike_events_consumed_total", topic="seed-events")
                   for m in metrics) == len(events) + 2
        assert sum(total(m, "lookalike_dead_letters_total") for m in metrics) == 2
        assert sum(total(m, "lookalike_seed_window_seeds") for m in metrics) == sum(
            map(len, expected.values()))
        # the memory gauge (refreshed every few seconds) matches the windows held
        wait_until(lambda: sum(total(scrape(w.metrics_url), "lookalike_seed_window_bytes")
                               for w in workers)
                   == sum(w.loop.stage.state.window_bytes() for w in workers) > 0,
                   timeout_s=15, what="lookalike_seed_window_bytes")
    finally:
        for w in workers:
            w.stop()


def test_packed_seed_events_land_in_their_items_windows(settings):
    """S2 packs (many items per message) and S1 batches mix; a corrupt pack is dead-lettered."""
    settings = settings.model_copy(update={
        "window": settings.window.model_copy(update={"size": 1000, "k": 4}),
        "kafka": settings.kafka.model_copy(update={"partitions": 1}),
    })
    stage = ClusteringStage(settings)
    worker = start_worker(stage)
    try:
        wait_until(lambda: worker.loop.ready.is_set() and worker.loop.consumer.assignment(),
                   what="partition assigned")
        rng = np.random.default_rng(1)
        items = np.array([3, 5, 8])
        starts = np.array([0, 2, 3, 6])
        users = np.array([10, 11, 10, 12, 13, 14])
        pack = SeedPack(items, starts, users, np.arange(6, dtype=np.float64),
                        rng.normal(size=(6, 8)).astype(np.float32), "v1")
        single = SeedBatch(np.array([15]), np.array([9.0]),
                           rng.normal(size=(1, 8)).astype(np.float32), "v1")
        raw = encode_seed_pack(pack)
        produce(settings, "seed-events", [(None, raw), (key_of(3), encode_seeds(single)),
                                          (None, raw[:-4])])
        wait_until(lambda: stage.state.seeds_held() == 7, what="seeds in windows")
        want = {3: {10, 11, 15}, 5: {10}, 8: {12, 13, 14}}
        assert {i: set(st.window.users()) for i, st in stage.state.items.items()} == want
        # the last record per item (an item whose seeds came in two polls is published
        # twice: the pack and the single batch need not share a poll)
        latest = {int(r.key): decode_centroids(r.value)
                  for r in read_all(settings, "seed-centroids")}
        assert {i: c.n_seeds for i, c in latest.items()} == {i: len(u) for i, u in want.items()}
        dlq = read_all(settings, "seed-events.dlq", expect=1)
        assert [dict(r.headers)["reason"] for r in dlq] == [b"bad_binary"]
        # seed events are counted as they come, not as the windows hold them: a replayed
        # pack changes no window but its six events count (the corrupt one does not)
        assert total(scrape(worker.metrics_url), "lookalike_seed_events_total") == 7
        produce(settings, "seed-events", [(None, raw)])
        wait_until(lambda: total(scrape(worker.metrics_url), "lookalike_seed_events_total")
                   == 13, what="the replayed pack counted")
        assert stage.state.seeds_held() == 7
    finally:
        worker.stop()


def test_publish_budget_delays_changes_oldest_first_and_loses_none(settings):
    """Over ``publish_items_per_s``, changed items wait (the backlog gauges show it) and
    are published first-changed first; in the end every item's latest centroids are out."""
    settings = settings.model_copy(update={
        "window": settings.window.model_copy(update={
            "size": 1000, "k": 2, "publish_items_per_s": 40.0, "publish_interval_s": 0.05}),
        "kafka": settings.kafka.model_copy(update={"partitions": 1}),
    })
    stage = ClusteringStage(settings)
    worker = start_worker(stage)
    rng = np.random.default_rng(2)

    def seeds(items: range) -> list:
        return [(key_of(item), encode_seeds(SeedBatch(
            np.array([item]), np.array([float(item)]),
            rng.normal(size=(1, 8)).astype(np.float32), "v1"))) for item in items]

    try:
        wait_until(lambda: worker.loop.ready.is_set() and worker.loop.consumer.assignment(),
                   what="partition assigned")
        first, second = range(0, 60), range(60, 120)  # 3 s of budget in all
        produce(settings, "seed-events", seeds(first))
        wait_until(lambda: stage.state.seeds_held() == 60, what="first seeds in windows")
        produce(settings, "seed-events", seeds(second))
        wait_until(lambda: stage.state.seeds_held() == 120, what="all seeds in windows")
        t0 = time.monotonic()
        assert total(scrape(worker.metrics_url), "lookalike_centroid_backlog_items") > 0
        records = read_all(settings, "seed-centroids", expect=120, timeout_s=60)
        # at 40/s, at least the 60 second-batch records waited ~1.5 s (a floor: slow is fine)
        assert time.monotonic() - t0 >= 1.0
        order = [int(r.key) for r in records]
        assert sorted(order) == list(range(120))  # each once: nothing lost, no repeats
        # first changed, first out (by mean position: the embedded broker may append a
        # retried batch late, so single swaps are not the stage's doing)
        at = {item: pos for pos, item in enumerate(order)}
        assert np.mean([at[i] for i in first]) + 30 < np.mean([at[i] for i in second])
        wait_until(lambda: total(scrape(worker.metrics_url),
                                 "lookalike_centroid_backlog_items") == 0, what="backlog empty")
    finally:
        worker.stop()


def test_items_beyond_max_items_are_evicted_with_a_tombstone(settings):
    settings = settings.model_copy(update={
        "window": settings.window.model_copy(update={"size": 100, "k": 2, "max_items": 5}),
        "kafka": settings.kafka.model_copy(update={"partitions": 1}),
    })
    stage = ClusteringStage(settings)
    worker = start_worker(stage)
    rng = np.random.default_rng(3)
    try:
        wait_until(lambda: worker.loop.ready.is_set() and worker.loop.consumer.assignment(),
                   what="partition assigned")
        for item in range(12):  # one at a time: item i is seeded at time i
            produce(settings, "seed-events", [(key_of(item), encode_seeds(SeedBatch(
                np.array([item]), np.array([float(item)]),
                rng.normal(size=(1, 8)).astype(np.float32), "v1")))])
            # the worker thread adds the item before it evicts: wait for both
            wait_until(lambda i=item: i in stage.state.items and len(stage.state) <= 5,
                       what=f"item {item} held, at most 5 items")
        assert len(stage.state) <= 5 and 11 in stage.state.items
        records = read_all(settings, "seed-centroids")
        deleted = {int(r.key) for r in records if r.value is None}
        assert deleted and deleted.isdisjoint(stage.state.items)
        assert deleted | set(stage.state.items) == set(range(12))
    finally:
        worker.stop()


def test_a_rolling_reload_loses_no_popular_items_window(settings):
    """Scoring workers on two model versions (a rolling reload half done) send seeds for
    one popular item by turns. The clustering worker knows the current version from
    the ``models`` topic: the item's window holds every seed of the current version
    and none is wiped by the old version's (dropped and counted)."""
    from engine.codec import encode_json

    old, new = "ralm-20261201T000000-a", "ralm-20261207T000000-b"
    settings = settings.model_copy(update={"window": settings.window.model_copy(
        update={"size": 1000, "k": 4})})
    stage = ClusteringStage(settings)
    w = start_worker(stage)
    try:
        wait_until(w.loop.ready.is_set, what="group join")
        produce(settings, "models", [(b"ralm", encode_json({"kind": "ralm", "path": p,
                                                            "version": v}))
                                     for p, v in (("/m/a.pt", old), ("/m/b.pt", new))])
        wait_until(lambda: stage.state.current_version == new, what="the current version")
        rng = np.random.default_rng(0)
        for r in range(8):
            produce(settings, "seed-events", [(key_of(3), encode_seeds(SeedBatch(
                np.arange(10 * r + 5 * (v == new), 10 * r + 5 * (v == new) + 5),
                np.full(5, 1.7e9 + r), rng.normal(size=(5, 8)).astype(np.float32), v)))
                for v in (old, new)])

        def latest():
            recs = [r for r in read_all(settings, "seed-centroids", timeout_s=5)
                    if int(r.key) == 3]
            return decode_centroids(recs[-1].value) if recs else None

        wait_until(lambda: (c := latest()) is not None and c.n_seeds == 40, timeout_s=60,
                   what="the item's window holding all 40 current-version seeds")
        assert latest().model_version == new
        assert total(scrape(w.metrics_url), "lookalike_stale_seeds_total") == 35
    finally:
        w.stop()
