"""Snapshots put back exactly the state they were taken of, through a file, and are
refused when they cannot be trusted (consumers/snapshots.py)."""

from __future__ import annotations

import numpy as np
from kafka import TopicPartition

from consumers.snapshots import Snapshot, SnapshotStore
from engine.clustering import ItemClusters
from engine.codec import Click, Profile, SeedBatch
from engine.config import WindowConfig
from engine.user_store import UserStore

TP = TopicPartition("seed-events", 3)


def _through_file(tmp_path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    store = SnapshotStore(tmp_path, "group", every_s=1.0)
    store.save(TP, Snapshot(42, arrays, {"n": 1}))
    snap = store.load(TP, committed=42)
    assert snap is not None and snap.offset == 42 and snap.meta == {"n": 1}
    return snap.arrays


def _clusters(dtype: str) -> tuple[ItemClusters, list[int]]:
    state = ItemClusters(WindowConfig(size=5, k=2, vector_dtype=dtype))
    rng = np.random.default_rng(0)
    for step in range(30):  # windows overflow (size 5), users come back, two dims
        item = int(rng.integers(6))
        dim = 4 if item < 4 else 3
        users = rng.integers(9, size=2)
        state.apply(item, SeedBatch(users, np.array([step, step + 0.5]),
                                    rng.normal(size=(2, dim)).astype(np.float32), "v1"))
    return state, sorted(state.items)


def _same_clusters(a: ItemClusters, b: ItemClusters, items: list[int]) -> None:
    for i in items:
        x, y = a.items[i], b.items[i]
        assert x.window.users() == y.window.users()  # same order, oldest first
        np.testing.assert_array_equal(x.window.vectors(), y.window.vectors())
        assert x.window.times() == y.window.times()
        np.testing.assert_array_equal(x.window.stored(), y.window.stored())  # same rows
        np.testing.assert_array_equal(x.centroids, y.centroids)
        np.testing.assert_array_equal(x.counts, y.counts)
        assert (x.last_seed_ts, x.model_version, x.dim) == (y.last_seed_ts, y.model_version,
                                                            y.dim)
    assert a.seeds_held() == b.seeds_held()


def test_item_clusters_come_back_exactly_and_go_on_alike(tmp_path) -> None:
    for dtype in ("float32", "float16"):
        state, items = _clusters(dtype)
        back = ItemClusters(state.cfg)
        assert back.restore(_through_file(tmp_path, state.export(items))) == items
        _same_clusters(state, back, items)
        # and the next seeds (a replayed old one among them) do the same to both
        batch = SeedBatch(np.array([1, 50]), np.array([0.0, 100.0]),
                          np.ones((2, 4), np.float32), "v1")
        assert state.apply(0, batch) == back.apply(0, batch)
        _same_clusters(state, back, items)


def test_user_store_comes_back_exactly(tmp_path) -> None:
    store = UserStore(history_len=3, max_users=10, max_seen=4)
    for i in range(20):
        user = i % 4
        store.click(Click(user, 100 + i, float(i), Profile(age=30.0 + user, gender="F")
                          if user != 3 else None), partition=user % 2, row=i)
    store.set_vectors([store.get(0), store.get(2)], np.ones((2, 5), np.float32))
    back = UserStore(history_len=3, max_users=10, max_seen=4)
    back.click(Click(0, 999, 0.0), partition=0)  # held state of a restored user is replaced
    assert back.restore(_through_file(tmp_path, store.export(partition=0)), 0) == 2
    for user in (0, 2):
        a, b = store.get(user), back.get(user)
        assert (a.clicks, a.last_ts, a.profile, a.partition) == (b.clicks, b.last_ts,
                                                                 b.profile, b.partition)
        assert a.history == b.history and a.seen.tolist() == b.seen.tolist()
        np.testing.assert_array_equal(store.rows[a.slot], back.rows[b.slot])
        np.testing.assert_array_equal(store.vecs[a.slot], back.vecs[b.slot])
    assert back.get(1) is None and back.get(3) is None  # partition 1's users stay out


def test_untrusted_or_broken_snapshots_are_ignored(tmp_path) -> None:
    store = SnapshotStore(tmp_path, "group", every_s=1.0)
    store.save(TP, Snapshot(10, {"x": np.arange(3)}, {}))
    assert store.load(TP, committed=None) is None  # a fresh topic: no committed offset
    assert store.load(TP, committed=9) is None  # the group is behind the snapshot
    assert store.load(TP, committed=12) is not None
    store.path(TP).write_bytes(b"not a snapshot")
    assert store.load(TP, committed=12) is None
    assert store.load(TopicPartition("seed-events", 0), committed=12) is None  # none yet


def test_due_once_per_interval() -> None:
    store = SnapshotStore("/nonexistent", "g", every_s=10.0)
    t = store._next
    assert not store.due(t - 1) and store.due(t) and not store.due(t + 5) and store.due(t + 10)
    assert not SnapshotStore("/nonexistent", "g", every_s=0).due(1e12)
