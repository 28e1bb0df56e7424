"""The windowed k-means steps (engine/kmeans.py): leave, join, Lloyd refresh."""

import warnings

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from engine import kmeans


def _tables(rows: int, k: int, d: int):
    return (np.zeros((rows, k, d), np.float32), np.zeros((rows, k), np.float32),
            np.zeros((rows, k), np.float32), np.full((rows, 64), -1, np.int16))


def _step(tables, owner, wrows, x, left=None, old=None):
    x = np.asarray(x, np.float32)
    n = len(owner)
    left = np.zeros(n, bool) if left is None else np.asarray(left, bool)
    old = np.zeros_like(x) if old is None else np.asarray(old, np.float32)
    kmeans.step(*tables, np.asarray(owner, np.int64), np.asarray(wrows, np.int64), left, x, old)


def _reference(seq, k):
    """The update rule written plainly, one seed at a time; seq: (leaving (slot, x) or
    None, joining x). Returns the final centroids and counts."""
    cent, cnt = np.zeros((k, len(seq[0][1]))), np.zeros(k)
    for out, x in seq:
        if out is not None:
            s, v = out
            cent[s] = cent[s] + (cent[s] - v) / (cnt[s] - 1) if cnt[s] > 1 else 0.0
            cnt[s] -= 1
        free = np.flatnonzero(cnt == 0)
        s = free[0] if len(free) else int(np.argmin(((cent - x) ** 2).sum(1)))
        cent[s] = cent[s] + (x - cent[s]) / (cnt[s] + 1)
        cnt[s] += 1
    return cent, cnt


def test_step_is_the_update_rule_seed_by_seed():
    """Joins into empty slots first, then the nearest centroid; an evicted seed leaves."""
    rng = np.random.default_rng(0)
    k, d = 3, 5
    tables = _tables(1, k, d)
    held: list[tuple[int, np.ndarray]] = []  # (window row, vector) of the seeds held
    seq = []
    for t in range(40):
        x = rng.normal(size=d).astype(np.float32)
        if t >= 6:  # a full window of 6: the oldest seed leaves, its row takes the new one
            row, v = held.pop(0)
            seq.append(((int(tables[3][0, row]), v.astype(np.float64)), x.astype(np.float64)))
            _step(tables, [0], [row], x[None], [True], v[None])
        else:
            row = t
            seq.append((None, x.astype(np.float64)))
            _step(tables, [0], [row], x[None])
        held.append((row, x))
    want_c, want_n = _reference(seq, k)
    np.testing.assert_allclose(tables[0][0], want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tables[1][0], want_n)
    np.testing.assert_allclose(tables[2][0], (tables[0][0] ** 2).sum(1), rtol=1e-5)
    # the invariant: each centroid is the mean of the held seeds labelled with it
    labels = np.array([tables[3][0, row] for row, _ in held])
    c, n = kmeans.means(np.stack([v for _, v in held]), labels, k)
    np.testing.assert_allclose(tables[0][0], c, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tables[1][0], n)


def test_an_evicted_seed_leaves_its_centroid():
    """k = 1, a window of two: the centroid is the mean of the two seeds held, not of
    every seed ever seen (the outlier that left pulls nothing)."""
    tables = _tables(1, 1, 2)
    outlier, a, b = np.array([100.0, 100.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0])
    _step(tables, [0], [0], [outlier])
    _step(tables, [0], [1], [a])
    _step(tables, [0], [0], [b], left=[True], old=[outlier])  # b takes the outlier's row
    np.testing.assert_allclose(tables[0][0, 0], (a + b) / 2, atol=1e-6)
    assert tables[1][0, 0] == 2


def test_a_seed_alone_in_its_slot_leaves_it_empty_and_zero():
    tables = _tables(1, 2, 2)
    _step(tables, [0, 0], [0, 1], [[0.0, 0.0], [5.0, 5.0]])
    _step(tables, [0], [1], [[0.2, 0.0]], left=[True], old=[[5.0, 5.0]])
    # slot 1 emptied by the leave, and the first empty slot takes the newcomer
    assert tables[1][0].tolist() == [1.0, 1.0] and tables[3][0, 1] == 1
    np.testing.assert_allclose(tables[0][0, 1], [0.2, 0.0])


def test_an_empty_slot_in_the_middle_is_filled_and_no_live_slot_is_overwritten():
    """counts [4, 0, 4] (a refresh emptied slot 1): the next seed fills slot 1."""
    tables = _tables(1, 3, 2)
    tables[0][0] = [[1.0, 1.0], [0.0, 0.0], [9.0, 9.0]]
    tables[1][0] = [4.0, 0.0, 4.0]
    tables[2][0] = (tables[0][0] ** 2).sum(1)
    _step(tables, [0], [8], [[8.5, 8.5]])  # nearest to slot 2, but slot 1 is free
    assert tables[1][0].tolist() == [4.0, 1.0, 4.0] and tables[3][0, 8] == 1
    np.testing.assert_allclose(tables[0][0], [[1.0, 1.0], [8.5, 8.5], [9.0, 9.0]])
    _step(tables, [0], [9], [[8.0, 8.0]])  # no free slot now: the nearest takes it
    assert tables[1][0].tolist() == [4.0, 2.0, 4.0]


def test_lloyd_from_the_current_centroids_is_sklearns_partial_fit():
    """Padded windows of different lengths, one batched step: per item, what a fresh
    MiniBatchKMeans(init=current).partial_fit(window) gives (the refresh's reference)."""
    rng = np.random.default_rng(7)
    b, s, k, d = 5, 40, 4, 6
    lengths = np.array([40, 7, 23, 40, 12])
    x = rng.normal(size=(b, s, d)).astype(np.float32)
    for i, n in enumerate(lengths):
        x[i, n:] = np.nan  # padding must not leak into any centroid or count
    cent = rng.normal(size=(b, k, d)).astype(np.float32)
    got_c, got_n, got_l, steps = kmeans.lloyd(x, lengths, cent, np.ones((b, k), np.float32))
    assert steps == 1
    for i, n in enumerate(lengths):
        ref = MiniBatchKMeans(n_clusters=k, init=cent[i], n_init=1, batch_size=int(n),
                              reassignment_ratio=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.partial_fit(x[i, :n])
        live = ref._counts > 0  # a slot that lost every point empties here (sklearn keeps it)
        np.testing.assert_allclose(got_c[i][live], ref.cluster_centers_[live], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(got_n[i], ref._counts)
        assert (got_c[i][~live] == 0).all()
        assert (got_l[i, n:] == -1).all()  # labels: the assignment the means were taken over
        np.testing.assert_array_equal(np.bincount(got_l[i, :n], minlength=k), got_n[i])


def test_lloyd_never_assigns_to_an_empty_slot():
    x = np.array([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]]], np.float32)
    cent = np.array([[[0.0, 0.0], [5.0, 5.0], [5.0, 5.1]]], np.float32)
    counts = np.array([[1.0, 0.0, 1.0]], np.float32)  # slot 1 is empty, though nearest to (5, 5)
    c, n, labels, _ = kmeans.lloyd(x, np.array([3]), cent, counts)
    assert n.tolist() == [[2.0, 0.0, 1.0]] and labels.tolist() == [[0, 0, 2]]
    np.testing.assert_allclose(c[0], [[0.05, 0.0], [0.0, 0.0], [5.0, 5.0]])


def test_lloyd_reaches_its_fixed_point_and_stops_there():
    """Iterated, the refresh stops when no label changes; there every point's nearest
    centroid is its own and every centroid is its points' mean (Lloyd's fixed point)."""
    rng = np.random.default_rng(3)
    centers = rng.normal(scale=4, size=(5, 8))
    x = (centers[rng.integers(5, size=200)] + rng.normal(size=(200, 8))).astype(np.float32)
    init = x[:5].copy()  # the streaming start: the first k seeds
    c, n, labels, steps = kmeans.lloyd(x[None], np.array([200]), init[None],
                                       np.ones((1, 5), np.float32), iters=100)
    assert 1 < steps < 100
    assert (kmeans.assign(x, c[0], n[0]) == labels[0]).all()
    want_c, want_n = kmeans.means(x, labels[0], 5)
    np.testing.assert_allclose(c[0], want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n[0], want_n)
    again = kmeans.lloyd(x[None], np.array([200]), c, n, labels, iters=5)
    assert again[3] == 0 and (again[2] == labels).all()
    assert kmeans.inertia(x, c[0], n[0]) < kmeans.inertia(x, init)


def test_seeds_per_centroid_caps_the_open_slots():
    """per_slot = 5: the first 5 seeds share one centroid (their mean), the 6th opens a
    second slot, and a seed joins only live centroids, never an empty one."""
    tables = _tables(1, 4, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 2)).astype(np.float32)
    kmeans.step(*tables, np.zeros(5, np.int64), np.arange(5, dtype=np.int64),
                np.zeros(5, bool), x[:5], np.zeros_like(x[:5]), 5)
    cent, counts = tables[0][0], tables[1][0]
    assert counts.tolist() == [5, 0, 0, 0]
    np.testing.assert_allclose(cent[0], x[:5].mean(0), rtol=1e-5)
    kmeans.step(*tables, np.zeros(2, np.int64), np.arange(5, 7, dtype=np.int64),
                np.zeros(2, bool), x[5:], np.zeros_like(x[5:]), 5)
    assert counts[2:].tolist() == [0, 0] and counts.sum() == 7
    assert counts[1] >= 1  # the 6th seed opened slot 1 (ceil(6 / 5) = 2)
