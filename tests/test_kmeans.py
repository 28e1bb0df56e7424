"""The incremental k-means against scikit-learn's MiniBatchKMeans."""

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from engine import kmeans


def _data(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=5, size=(6, d))
    return (centers[rng.integers(6, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_partial_fit_equals_sklearn_minibatch_steps():
    x = _data()
    k, bs = 6, 50
    ref = MiniBatchKMeans(n_clusters=k, init=x[:k], n_init=1, batch_size=bs,
                          reassignment_ratio=0.0)
    ref.partial_fit(x[:bs])  # sklearn's first call initialises; compare from its state on
    c, n = ref.cluster_centers_.astype(np.float32).copy(), ref._counts.astype(np.float32).copy()
    for lo in range(bs, len(x), bs):
        ref.partial_fit(x[lo:lo + bs])
        c, n = kmeans.partial_fit(c, n, x[lo:lo + bs], count_cap=None)
        np.testing.assert_allclose(c, ref.cluster_centers_, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(n, ref._counts, rtol=1e-6)


def test_first_seeds_fill_empty_slots():
    c, n = kmeans.empty(3, 2)
    x = np.array([[0, 0], [1, 1], [5, 5], [0.2, 0]], np.float32)
    c, n = kmeans.partial_fit(c, n, x[:2])
    assert n.tolist() == [1, 1, 0]
    c, n = kmeans.partial_fit(c, n, x[2:])
    np.testing.assert_allclose(c[2], [5, 5])  # filled the empty slot
    np.testing.assert_allclose(c[0], [0.1, 0])  # then averaged into the nearest
    assert n.tolist() == [2, 1, 1]


def test_count_cap_keeps_tracking_a_moving_window():
    rng = np.random.default_rng(1)
    c, n = kmeans.empty(1, 2)
    capped = (c, n)
    for _ in range(50):
        c, n = kmeans.partial_fit(c, n, rng.normal(size=(20, 2)).astype(np.float32))
        capped = kmeans.partial_fit(*capped, rng.normal(size=(20, 2)).astype(np.float32), 40)
    shifted = rng.normal(size=(40, 2)).astype(np.float32) + 10
    plain = kmeans.partial_fit(c, n, shifted)[0]
    tracked = kmeans.partial_fit(*capped, shifted, 40)[0]
    assert np.abs(plain - 10).max() > 8  # uncapped: 1000 old points outweigh 40 new ones
    assert np.abs(tracked - 10).max() < 5.5  # capped: the new seeds weigh half


def test_fit_inertia_close_to_sklearn_kmeans():
    from sklearn.cluster import KMeans

    x = _data(seed=2)
    c, n = kmeans.fit(x, 6, n_iter=50, seed=0)
    ref = KMeans(6, n_init=5, random_state=0).fit(x)
    assert kmeans.inertia(x, c, n) <= ref.inertia_ * 1.01
    assert n.sum() == len(x)


def test_fit_with_fewer_points_than_k_marks_empty_slots():
    c, n = kmeans.fit(np.ones((3, 4), np.float32), 5)
    assert n.tolist() == [1, 1, 1, 0, 0]


def test_partial_fit_many_equals_the_per_item_loop():
    rng = np.random.default_rng(5)
    m, k, d = 30, 4, 6
    cent = rng.normal(size=(m, k, d)).astype(np.float32)
    counts = rng.integers(0, 6, size=(m, k)).astype(np.float32)
    counts = -np.sort(-counts, axis=1)  # used slots are a prefix
    cent[counts == 0] = 0
    x = rng.normal(size=(200, d)).astype(np.float32)
    owner = rng.integers(0, m, size=200)
    for cap in (None, 3.0):
        got_c, got_n = kmeans.partial_fit_many(cent, counts, x, owner, cap)
        for i in range(m):
            ref_c, ref_n = kmeans.partial_fit(cent[i], counts[i], x[owner == i], cap)
            np.testing.assert_allclose(got_c[i], ref_c, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got_n[i], ref_n)


def test_lloyd_batched_is_sklearns_partial_fit_from_the_current_centroids():
    """Padded windows of different lengths, one batched step: per item, what a fresh
    MiniBatchKMeans(init=current).partial_fit(window) gives (the refresh's reference)."""
    import warnings

    rng = np.random.default_rng(7)
    b, s, k, d = 5, 40, 4, 6
    lengths = np.array([40, 7, 23, 40, 12])
    x = rng.normal(size=(b, s, d)).astype(np.float32)
    for i, n in enumerate(lengths):
        x[i, n:] = np.nan  # padding must not leak into any centroid or count
    cent = rng.normal(size=(b, k, d)).astype(np.float32)
    got_c, got_n = kmeans.lloyd_batched(x, lengths, cent, np.ones((b, k), np.float32))
    for i, n in enumerate(lengths):
        ref = MiniBatchKMeans(n_clusters=k, init=cent[i], n_init=1, batch_size=int(n),
                              reassignment_ratio=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.partial_fit(x[i, :n])
        np.testing.assert_allclose(got_c[i], ref.cluster_centers_, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got_n[i], ref._counts)
        assert got_n[i].sum() == n


def test_lloyd_batched_never_assigns_to_an_empty_slot():
    x = np.array([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]]], np.float32)
    cent = np.array([[[0.0, 0.0], [5.0, 5.0], [5.0, 5.1]]], np.float32)
    counts = np.array([[1.0, 0.0, 1.0]], np.float32)  # slot 1 is empty, though nearest to (5, 5)
    c, n = kmeans.lloyd_batched(x, np.array([3]), cent, counts)
    assert n.tolist() == [[2.0, 0.0, 1.0]]
    np.testing.assert_allclose(c[0], [[0.05, 0.0], [5.0, 5.0], [5.0, 5.0]])
