"""The sharded centroid table (docs/capacity.md): items split over shards by murmur2,
answered in two phases, give the whole table's answers, and each shard holds its slice."""

import numpy as np

from lookalike.experiments import capacity as cap


def test_sharded_answers_equal_the_whole_table_and_memory_splits():
    m = cap.model(0)
    users = np.random.default_rng(1).normal(size=(20, m.dim)).astype(np.float32)
    assert cap.equal_answers(m, 3_000, 3, users, n=100, k=10, seed=0) == 1.0
    whole = cap.build(m, 3_000, 1, True, 0, False)
    parts = cap.build(m, 3_000, 3, True, 0, False)
    assert sum(len(p.table) for p in parts) == len(whole[0].table) == 3_000
    per_item = cap.table_bytes(whole[0].table) / 3_000
    assert 12_000 < per_item < 14_000  # k=20 x d=128 centroids, Gram, global vector, index
    assert max(cap.table_bytes(p.table) for p in parts) < 0.45 * cap.table_bytes(whole[0].table)
    a = cap.answer(parts, users[:3], n=100, k=10)
    assert len(a.scatter_s) == len(a.rerank_s) == 3 and all(len(i) == 10 for i in a.items)
