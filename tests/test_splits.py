"""Split sizes: the general-CF comparison with RecBole only means something when both
sides rank the same targets, so the random split must size its parts as RecBole does."""

import numpy as np
import pytest

from models.splits import _positions, random_split


@pytest.mark.parametrize(("n", "sizes"), [
    (29, (25, 2, 2)),  # rounding to nearest would give 23/3/3
    (20, (16, 2, 2)),
    (5, (3, 1, 1)),  # shares under one click get one while training keeps > 1
    (2, (1, 0, 1)),
    (1, (1, 0, 0)),
])
def test_parts_are_sized_like_recbole(n, sizes):
    parts = _positions(n, (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert tuple(len(p) for p in parts) == sizes
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


@pytest.mark.slow
def test_ml100k_split_has_recbole_target_counts(ml100k):
    split = random_split(ml100k, seed=0)
    counts = np.bincount(ml100k.user, minlength=len(ml100k.users))
    want_test = int(np.sum((0.1 * counts).astype(int)))
    assert split.test.targets.values.size == want_test == 9_596
    assert split.valid.targets.values.size == want_test
    assert split.train.values.size == len(ml100k) - 2 * want_test
