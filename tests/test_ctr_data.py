"""CTR rows from real ml-100k: labels, splits, no leakage in the dense features, hashing."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import Dataset
from models.ctr_data import (
    DENSE_FIELDS,
    LABEL_THRESHOLD,
    SPARSE_FIELDS,
    build_ctr_data,
    dense_features,
    split_rows,
    stable_hash,
)


@pytest.fixture(scope="module")
def time_data(ml100k: Dataset):
    return build_ctr_data(ml100k, "time")


def test_label_is_rating_at_least_four(ml100k: Dataset, time_data) -> None:
    for frame in (time_data.train, time_data.valid, time_data.test):
        assert np.array_equal(frame.label, ml100k.rating[frame.rows] >= LABEL_THRESHOLD)
    assert 0.5 < time_data.train.label.mean() < 0.6  # 55% of ml-100k's ratings are >= 4


def test_time_split_puts_the_future_in_valid_and_test(ml100k: Dataset, time_data) -> None:
    train, valid, test = time_data.train, time_data.valid, time_data.test
    assert (len(train), len(valid), len(test)) == (80_000, 10_000, 10_000)
    assert ml100k.ts[train.rows].max() <= ml100k.ts[valid.rows].min()
    assert ml100k.ts[valid.rows].max() <= ml100k.ts[test.rows].min()
    assert time_data.train.sparse.shape[1] == len(SPARSE_FIELDS)
    assert time_data.train.dense.shape[1] == len(DENSE_FIELDS)


def test_ctx_split_is_a_seeded_random_partition(ml100k: Dataset) -> None:
    a = split_rows(ml100k, "ctx", seed=1)
    b = split_rows(ml100k, "ctx", seed=1)
    c = split_rows(ml100k, "ctx", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert [len(x) for x in a] == [80_000, 10_000, 10_000]
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(len(ml100k)))


def test_dense_counts_come_from_training_rows_only(ml100k: Dataset, time_data) -> None:
    train_rows, test_rows = time_data.train.rows, time_data.test.rows
    raw = dense_features(ml100k, test_rows, train_rows)
    train_users = ml100k.user[train_rows]
    user_count = np.array([(train_users == u).sum() for u in ml100k.user[test_rows[:50]]])
    assert np.allclose(raw[:50, 1], np.log1p(user_count))
    # Counting over all rows (the leak) would give other values for most test rows.
    leaky = dense_features(ml100k, test_rows, np.arange(len(ml100k)))
    assert (leaky[:, 2] != raw[:, 2]).mean() > 0.5
    # Most test rows come from users who joined after the cut: their count is 0.
    assert (raw[:, 1] == 0).mean() > 0.5
    # Standardised with the training statistics: the training columns have mean 0.
    assert np.allclose(time_data.train.dense.mean(axis=0), 0, atol=1e-4)
    expected = (raw - time_data.dense_mean) / time_data.dense_std
    assert np.allclose(time_data.test.dense, expected, atol=1e-5)


def test_unseen_users_map_to_the_unknown_row(ml100k: Dataset, time_data) -> None:
    seen = set(ml100k.user[time_data.train.rows].tolist())
    unseen = ~np.isin(ml100k.user[time_data.test.rows], list(seen))
    assert unseen.any()
    assert (time_data.test.sparse[unseen, 0] == 0).all()
    assert (time_data.test.sparse[~unseen, 0] > 0).all()
    assert (time_data.train.sparse[:, 0] > 0).all()


def test_hashing_is_deterministic_and_in_range() -> None:
    values = [str(i) for i in range(5000)]
    a = stable_hash("user", values, 97)
    assert np.array_equal(a, stable_hash("user", values, 97))
    assert a.min() >= 0 and a.max() < 97
    assert len(np.unique(a)) == 97  # 5,000 values fill every bucket
    assert not np.array_equal(a, stable_hash("item", values, 97))  # per-field salt
    # Pinned: the same buckets in every process and Python version (not salted hash()).
    assert stable_hash("user", ["1", "2", "3"], 1000).tolist() == [853, 426, 29]
    with pytest.raises(ValueError):
        stable_hash("user", values, 0)


def test_hashed_data_fits_fixed_tables(ml100k: Dataset) -> None:
    data = build_ctr_data(ml100k, "ctx", seed=0, hash_buckets=64)
    assert set(data.field_sizes.values()) == {65}  # 64 buckets + the zero row
    for frame in (data.train, data.valid, data.test):
        assert frame.sparse.min() >= 1 and frame.sparse.max() <= 64
        assert frame.genres.max() <= 64
    again = build_ctr_data(ml100k, "ctx", seed=0, hash_buckets=64)
    assert np.array_equal(data.test.sparse, again.test.sparse)
    # A value unseen in training still gets a (shared) trained row: no unknown id.
    users = build_ctr_data(ml100k, "time", hash_buckets=64).test.sparse[:, 0]
    assert (users >= 1).all()
