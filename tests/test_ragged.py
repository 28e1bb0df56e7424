"""`Ragged.take` and `Ragged.distinct` are the vectorised forms of a per-row loop; the
loop is the reference they must equal on any input."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from models.mult_vae import Clicks
from models.splits import Ragged

rows_strategy = st.lists(st.lists(st.integers(0, 30), max_size=12), min_size=1, max_size=20)


@given(rows_strategy, st.data())
def test_take_equals_the_row_loop(rows: list[list[int]], data: st.DataObject) -> None:
    ragged = Ragged.from_rows(rows)
    index = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=30)),
                     dtype=np.int64)
    taken = ragged.take(index)
    assert len(taken) == len(index)
    for got, want in zip([taken[i] for i in range(len(taken))], ragged.rows(index),
                         strict=True):
        np.testing.assert_array_equal(got, want)


@given(rows_strategy)
def test_distinct_equals_np_unique_per_row(rows: list[list[int]]) -> None:
    distinct = Ragged.from_rows(rows).distinct
    assert len(distinct) == len(rows)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(distinct[i], np.unique(np.array(row, dtype=np.int64)))


@given(rows_strategy, st.randoms(use_true_random=False))
def test_click_batches_equal_clicks_of_each_batch(rows: list[list[int]], rnd) -> None:
    ragged = Ragged.from_rows(rows)
    order = np.array(rnd.sample(range(len(rows)), len(rows)), dtype=np.int64)
    for users, clicks in Clicks.batches(ragged, order, size=3):
        want = Clicks.of(ragged.rows(users))
        for field in ("items", "offsets", "rows"):
            np.testing.assert_array_equal(getattr(clicks, field).numpy(),
                                          getattr(want, field).numpy())
