"""Rebalance (issue 8, item 2): adding and removing a worker mid-stream moves
partitions and their state without loss, and without commit-failure loops."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.clustering import ClusteringStage
from consumers.runner import start_worker
from engine.clustering import ItemClusters
from engine.codec import SeedBatch, decode_centroids, encode_seeds, key_of
from lookalike.scrape import scrape, total
from tests.kafka_fixtures import produce, read_all, wait_until

N_ITEMS, DIM = 30, 8


def _phase(seed: int, n: int, t0: float) -> list[tuple[bytes, bytes, int, int, np.ndarray,
                                                      float]]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        item, user = int(rng.integers(N_ITEMS)), int(rng.integers(10_000))
        vec = rng.normal(size=(1, DIM)).astype(np.float32)
        batch = SeedBatch(np.array([user]), np.array([t0 + t]), vec, "v1")
        out.append((key_of(item), encode_seeds(batch), item, user, vec, t0 + t))
    return out


def _lag_partitions(w) -> set[int]:
    return {int(dict(labels)["partition"]) for (name, labels) in scrape(w.metrics_url)
            if name == "lookalike_consumer_lag_messages"}


@pytest.mark.slow
def test_a_worker_joins_and_one_leaves_mid_stream_and_no_seed_is_lost(settings):
    s = settings.model_copy(update={"window": settings.window.model_copy(  # windows fill:
        update={"size": 24, "k": 4, "refresh_every": 8})})  # evictions and refreshes happen
    phases = [_phase(i, 400, 1_000.0 * (i + 1)) for i in range(3)]
    first = ClusteringStage(s)
    w1 = start_worker(first)
    second, w2 = None, None
    try:
        wait_until(lambda: w1.loop.ready.is_set(), what="the first worker joined")
        produce(s, "seed-events", [(k, v) for k, v, *_ in phases[0]])
        wait_until(lambda: first.state.seeds_held() >= 300, what="phase 1 in windows")

        second = ClusteringStage(s)  # a worker joins: partitions move to it
        w2 = start_worker(second)
        wait_until(lambda: len(w1.loop.consumer.assignment()) == 1
                   and len(w2.loop.consumer.assignment()) == 1, timeout_s=60,
                   what="the partitions spread over both")
        # the first worker got back one of its partitions: its state stood, no restore
        assert total(scrape(w1.metrics_url), "lookalike_partitions_kept_total") >= 1
        # and it exports the lag of that partition only (the other's is the second's)
        wait_until(lambda: _lag_partitions(w1) == {tp.partition for tp in
                                                    w1.loop.consumer.assignment()},
                   what="the lag gauge follows the assignment")
        produce(s, "seed-events", [(k, v) for k, v, *_ in phases[1]])

        w1.stop()  # a worker leaves: its partition moves to the second one
        wait_until(lambda: len(w2.loop.consumer.assignment()) == 2, timeout_s=60,
                   what="the second worker owns both partitions")
        produce(s, "seed-events", [(k, v) for k, v, *_ in phases[2]])

        # the reference: the same seeds through one ItemClusters, no worker, no rebalance
        ref = ItemClusters(s.window)
        for _, _, item, user, vec, ts in (e for p in phases for e in p):
            ref.apply(item, SeedBatch(np.array([user]), np.array([ts]), vec, "v1"))
        want = {i: st.window.users() for i, st in ref.items.items()}
        expected_held = sum(len(u) for u in want.values())
        wait_until(lambda: second.state.seeds_held() == expected_held, timeout_s=60,
                   what="every seed in the surviving worker's windows")
        got = {i: st.window.users() for i, st in second.state.items.items()}
        assert got.keys() == want.keys()
        assert all(sorted(got[i]) == sorted(want[i]) for i in want)  # windows: exactly

        # the table: the latest centroids of every item count its window's seeds
        wait_until(lambda: second._dirty == {} and not second.state.due, timeout_s=30,
                   what="changes published")
        latest = {int(r.key): decode_centroids(r.value) for r in read_all(s, "seed-centroids")}
        assert {i: c.n_seeds for i, c in latest.items() if i in want} == {
            i: len(u) for i, u in want.items()}
        # and their values: the moved state carried each seed's slot, so the survivor's
        # centroids are those of one worker that saw every seed (refreshes included)
        assert ref.refreshes > 0
        for i, st in ref.items.items():
            np.testing.assert_allclose(second.state.items[i].centroids, st.centroids,
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(second.state.items[i].counts, st.counts)
            np.testing.assert_allclose(latest[i].centroids, st.centroids, atol=2e-3)  # float16
        m = scrape(w2.metrics_url)
        assert total(m, "lookalike_errors_total", kind="CommitFailedError") == 0
        assert total(m, "lookalike_partitions_kept_total") >= 1  # its own, as w1 left
        assert w2.thread.is_alive() and w2.loop.failure is None
    finally:
        for w in (w1, w2):
            if w is not None:
                w.stop()
