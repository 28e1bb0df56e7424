"""The seed window's ordering, eviction and idempotence."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.seed_window import SeedWindow


def v(x: float) -> np.ndarray:
    return np.array([x], np.float32)


def test_keeps_most_recent_distinct_users_oldest_first():
    w = SeedWindow(3)
    for ts, user in enumerate([1, 2, 3, 4]):
        assert w.add(user, float(ts), v(user))
    assert w.users() == [2, 3, 4]  # user 1 evicted


def test_repeat_click_moves_user_to_front_not_in_twice():
    w = SeedWindow(3)
    for ts, user in enumerate([1, 2, 3]):
        w.add(user, float(ts), v(ts))
    assert w.add(1, 10.0, v(10))
    assert w.users() == [2, 3, 1]
    assert len(w) == 3
    assert w.vectors()[-1, 0] == 10  # newest embedding kept
    w.add(4, 11.0, v(11))
    assert w.users() == [3, 1, 4]  # 2 is now the oldest, evicted


def test_replays_change_nothing():
    w = SeedWindow(2)
    events = [(1, 0.0), (2, 1.0), (3, 2.0)]
    for u, ts in events:
        w.add(u, ts, v(u))
    before = (w.users(), w.vectors().copy())
    assert not any(w.add(u, ts, v(u)) for u, ts in events)  # a crash replay
    assert w.users() == before[0]
    np.testing.assert_array_equal(w.vectors(), before[1])


def test_rejects_bad_size():
    with pytest.raises(ValueError):
        SeedWindow(0)


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10_000)), max_size=200,
                unique_by=lambda e: e[1]),
       st.integers(1, 10))
def test_window_is_the_last_n_distinct_users_by_time(events, size):
    """Against a plain reference: the N users with the newest clicks, in click order."""
    events = sorted(events, key=lambda e: e[1])  # one item's partition delivers in order
    w = SeedWindow(size)
    newest: dict[int, int] = {}
    for u, ts in events:
        w.add(u, float(ts), v(u))
        newest[u] = max(newest.get(u, -1), ts)
    expect = sorted(newest, key=lambda u: newest[u])[-size:]
    assert w.users() == expect
    for u, ts in events:  # replaying everything changes nothing
        assert not w.add(u, float(ts), v(u))
    assert w.users() == expect


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10_000)), max_size=200,
                unique_by=lambda e: e[1]),
       st.integers(1, 10), st.randoms(use_true_random=False))
def test_any_arrival_order_gives_the_same_window(events, size, rnd):
    """Seeds of one item come from every click partition, so they arrive out of time
    order: the window is still the N users with the newest clicks, oldest first, and
    a second arrival order of the same seeds builds the same window."""
    newest: dict[int, int] = {}
    for u, ts in events:
        newest[u] = max(newest.get(u, -1), ts)
    expect = sorted(newest, key=lambda u: newest[u])[-size:]
    shuffled = list(events)
    rnd.shuffle(shuffled)
    windows = []
    for order in (events, shuffled):
        w = SeedWindow(size)
        for u, ts in order:
            w.add(u, float(ts), v(u))
        assert w.users() == expect
        assert [w._ts[w._rows[u]] for u in expect] == [float(newest[u]) for u in expect]
        assert w.newest_ts() == (float(newest[expect[-1]]) if expect else float("-inf"))
        windows.append(w)
    np.testing.assert_array_equal(windows[0].vectors(), windows[1].vectors())
