"""ItemClusters' batched paths against the plain per-item ones."""

import numpy as np
import pytest

from engine import kmeans
from engine.clustering import ItemClusters, decode_poll
from engine.codec import BadEvent, SeedBatch, decode_seeds, encode_seeds
from engine.config import WindowConfig
from engine.seed_window import SeedWindow


def _polls(n_polls=6, per_poll=40, items=7, users=30, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for _ in range(n_polls):
        poll = []
        for _ in range(per_poll):
            n = int(rng.integers(1, 4))
            u = rng.integers(users, size=n)
            ts = t + np.arange(n, dtype=np.float64)
            t += n
            poll.append((int(rng.integers(items)), SeedBatch(
                u, ts, rng.normal(size=(n, dim)).astype(np.float32), "v1")))
        out.append(poll)
    return out


@pytest.mark.parametrize("cap", [None, 4.0])
def test_apply_columns_equals_per_item_windows_and_partial_fit(cap):
    cfg = WindowConfig(size=5, k=3, count_cap=cap)
    state = ItemClusters(cfg)
    windows: dict[int, SeedWindow] = {}
    cents: dict[int, tuple] = {}
    for poll in _polls():
        raws = [encode_seeds(b) for _, b in poll]
        runs, bad = decode_poll([i for i, _ in poll], raws)
        assert not bad
        for cols in runs:
            state.apply_columns(cols)
        # the reference: window adds per seed, one partial_fit per item and poll
        accepted: dict[int, list] = {}
        for item, b in poll:
            w = windows.setdefault(item, SeedWindow(cfg.size))
            accepted.setdefault(item, []).extend(
                b.vectors[j] for j in range(len(b.users))
                if w.add(int(b.users[j]), float(b.ts[j]), b.vectors[j]))
        for item, xs in accepted.items():
            if xs:
                c, n = cents.get(item) or kmeans.empty(cfg.k, 8)
                cents[item] = kmeans.partial_fit(c, n, np.stack(xs), cap)
    assert set(state.items) == set(windows)
    for item, w in windows.items():
        st = state.items[item]
        assert st.window.users() == w.users()
        np.testing.assert_array_equal(st.window.vectors(), w.vectors())
        np.testing.assert_allclose(st.centroids, cents[item][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(st.counts, cents[item][1])
    assert state.seeds_held() == sum(len(w) for w in windows.values())


def test_decode_poll_rejects_what_decode_seeds_rejects_with_its_reason():
    good = encode_seeds(SeedBatch(np.array([1, 2]), np.array([1.0, 2.0]),
                                  np.ones((2, 4), np.float32), "v1"))
    nan = encode_seeds(SeedBatch(np.array([3]), np.array([3.0]),
                                 np.full((1, 4), np.nan, np.float32), "v1"))
    other = encode_seeds(SeedBatch(np.array([4]), np.array([4.0]),
                                   np.ones((1, 6), np.float32), "v2"))
    raws = [good, b"garbage", nan, None, good[:-1], other, good]
    runs, bad = decode_poll(list(range(len(raws))), raws)
    for i, err in bad:
        with pytest.raises(BadEvent) as ref:
            decode_seeds(raws[i])
        assert (err.reason, err.detail) == (ref.value.reason, ref.value.detail)
    assert [i for i, _ in bad] == [1, 2, 3, 4]
    assert [(c.items, c.vectors.shape[1], c.model_version) for c in runs] == [
        ([0], 4, "v1"), ([5], 6, "v2"), ([6], 4, "v1")]
    np.testing.assert_array_equal(runs[0].users, [1, 2])


def test_partial_fit_rows_in_place_keeps_squared_norms():
    rng = np.random.default_rng(2)
    cent = rng.normal(size=(10, 3, 4)).astype(np.float32)
    counts = np.full((10, 3), 2.0, np.float32)
    counts[4, 1:] = 0
    sq = (cent ** 2).sum(2)
    x, owner = rng.normal(size=(25, 4)).astype(np.float32), rng.integers(0, 10, 25)
    want_c, want_n = kmeans.partial_fit_many(cent, counts, x, owner, 5.0)
    kmeans.partial_fit_rows(cent, counts, x, owner, 5.0, sq)
    np.testing.assert_allclose(cent, want_c, rtol=1e-6)
    np.testing.assert_array_equal(counts, want_n)
    np.testing.assert_allclose(sq, (cent ** 2).sum(2), rtol=1e-5)


def test_float16_windows_halve_vector_bytes():
    cfg = WindowConfig(size=8, k=2, vector_dtype="float16")
    state = ItemClusters(cfg)
    state.apply(1, SeedBatch(np.arange(8), np.arange(8.0), np.ones((8, 16), np.float32)))
    w = state.items[1].window
    assert w.nbytes() == 8 * 16 * 2 and w.vectors().dtype == np.float32
    state.drop({1})
    assert len(state) == 0 and state.seeds_held() == 0


def test_refresh_all_is_one_lloyd_step_per_item_whatever_the_chunking():
    """Windows of very different lengths: chunked and sorted, each item gets its own step."""
    rng = np.random.default_rng(3)
    state = ItemClusters(WindowConfig(size=64, k=3, count_cap=None))
    for item, n in enumerate([1, 5, 64, 2, 30, 64, 9]):
        state.apply(item, SeedBatch(np.arange(n), np.arange(n, dtype=np.float64),
                                    rng.normal(size=(n, 4)).astype(np.float32), "v"))
    before = {i: (st.centroids.copy(), st.counts.copy(), st.window.stored().copy())
              for i, st in state.items.items()}
    assert state.refresh_all(chunk=2) == 7
    for i, st in state.items.items():
        c, n, x = before[i]
        want_c, want_n = kmeans.lloyd_batched(x[None], np.array([len(x)]), c[None], n[None])
        np.testing.assert_allclose(st.centroids, want_c[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(st.counts, want_n[0])


def test_items_beyond_max_items_go_least_recently_seeded_first():
    cfg = WindowConfig(size=8, k=2)
    state = ItemClusters(cfg)
    rng = np.random.default_rng(0)
    for item in range(50):  # item i's newest seed at time i, except a late one for item 3
        t = 100.0 if item == 3 else float(item)
        state.apply(item, SeedBatch(np.array([item]), np.array([t]),
                                    rng.normal(size=(1, 4)).astype(np.float32), "v"))
    held = state.seeds_held()
    gone = state.evict_over(40)
    assert len(state) <= 40 and sorted(gone) == [i for i in range(50) if i != 3][:len(gone)]
    assert 3 in state.items  # recently seeded, though its id is old
    assert state.seeds_held() == held - len(gone)
    assert state.evict_over(40) == []  # under the cap: nothing more goes
    # a seed for an evicted item starts it afresh
    state.apply(0, SeedBatch(np.array([7]), np.array([200.0]),
                             rng.normal(size=(1, 4)).astype(np.float32), "v"))
    assert state.items[0].window.users() == [7]
