"""One clustering online and offline: an evaluation's seeds replayed through the
clustering worker on the embedded broker give the centroids the offline path gives."""

from __future__ import annotations

import numpy as np

from consumers.clustering import ClusteringStage
from consumers.runner import start_worker
from engine.codec import SeedBatch, decode_centroids, encode_seeds, key_of
from models.ralm import RalmConfig
from models.seed_clusters import cluster_seeds, window_config
from tests.kafka_fixtures import produce, read_all, wait_until

N_CLICKS, DIM = 15_000, 8  # the first 15k clicks: 18 refreshes offline


def test_the_worker_computes_the_evaluations_centroids(settings, ml100k):
    """The training clicks of ml-100k, each a seed embedded by its user's vector, as the
    look-alike evaluation clusters them (``cluster_seeds``) and as the clustering worker
    does from ``seed-events``: the same centroids and counts, item by item (windows of
    16 evict, and refreshes run every 64 seeds of an item)."""
    cfg = RalmConfig.tiny(k=4, max_seeds=16)
    window = window_config(cfg).model_copy(update={"centroid_wire_dtype": "float32"})
    s = settings.model_copy(update={"window": window})
    train = ml100k.time_split(0.8)[0]
    first = np.argsort(train.ts, kind="stable")[:N_CLICKS]
    user, item, ts = train.user[first], train.item[first], train.ts[first]
    emb = np.random.default_rng(0).normal(size=(len(train.users.ids), DIM)).astype(np.float32)
    items = np.unique(item)
    want_c, want_n = cluster_seeds(cfg, user, item, ts, emb, items)  # the offline path

    stage = ClusteringStage(s)
    worker = start_worker(stage)
    try:
        wait_until(lambda: worker.loop.ready.is_set() and worker.loop.consumer.assignment(),
                   what="partitions assigned")
        order = np.argsort(ts, kind="stable")  # as the scoring worker emits them: click order
        produce(s, "seed-events", [(key_of(int(item[j])), encode_seeds(SeedBatch(
            user[j:j + 1].astype(np.int64), ts[j:j + 1].astype(np.float64), emb[user[j:j + 1]],
            "v1"))) for j in order])
        wait_until(lambda: stage.state.seeds_held() == sum(
            min(len(np.unique(user[item == i])), cfg.max_seeds) for i in items),
            timeout_s=120, what="every seed in the worker's windows")
        wait_until(lambda: not stage._dirty and not stage.state.due, timeout_s=60,
                   what="centroids refreshed and published")
        assert stage.state.refreshes > 0  # the refresh ran inside the worker
        latest = {int(r.key): decode_centroids(r.value) for r in read_all(s, "seed-centroids")}
    finally:
        worker.stop()
    assert set(latest) == set(items.tolist())
    for j, i in enumerate(items.tolist()):
        got = latest[i]
        np.testing.assert_array_equal(got.counts, want_n[j])
        np.testing.assert_allclose(got.centroids, want_c[j], rtol=1e-5, atol=1e-6)
