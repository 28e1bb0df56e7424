"""The seed windows' ordering, eviction and idempotence, through the worker's path
(``ItemClusters``, whose admissions are ``engine.seed_window.admit``), against plain
references and the per-seed implementation they replaced (``tests/window_reference.py``)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.clustering import ItemClusters, SeedColumns
from engine.codec import SeedBatch
from engine.config import WindowConfig
from engine.seed_window import WindowStore, block_rows, bytes_bound
from tests.window_reference import ReferenceWindow


def v(x: float) -> np.ndarray:
    return np.array([x], np.float32)


class OneWindow:
    """One item's window, fed one seed at a time through ``ItemClusters``."""

    def __init__(self, size: int):
        self.state = ItemClusters(WindowConfig(size=size, k=1, refresh_every=10**9))

    def add(self, user: int, ts: float, vec: np.ndarray) -> bool:
        return self.state.apply(0, SeedBatch(np.array([user]), np.array([ts]), vec[None], ""))

    @property
    def window(self):
        return self.state.items[0].window

    def users(self) -> list[int]:
        return self.window.users() if 0 in self.state.items else []


def test_keeps_most_recent_distinct_users_oldest_first():
    w = OneWindow(3)
    for ts, user in enumerate([1, 2, 3, 4]):
        assert w.add(user, float(ts), v(user))
    assert w.users() == [2, 3, 4]  # user 1 evicted


def test_repeat_click_moves_user_to_front_not_in_twice():
    w = OneWindow(3)
    for ts, user in enumerate([1, 2, 3]):
        w.add(user, float(ts), v(ts))
    assert w.add(1, 10.0, v(10))
    assert w.users() == [2, 3, 1]
    assert len(w.window) == 3
    assert w.window.vectors()[-1, 0] == 10  # newest embedding kept
    w.add(4, 11.0, v(11))
    assert w.users() == [3, 1, 4]  # 2 is now the oldest, evicted


def test_replays_change_nothing():
    w = OneWindow(2)
    events = [(1, 0.0), (2, 1.0), (3, 2.0)]
    for u, ts in events:
        w.add(u, ts, v(u))
    before = (w.users(), w.window.vectors().copy())
    assert not any(w.add(u, ts, v(u)) for u, ts in events)  # a crash replay
    assert w.users() == before[0]
    np.testing.assert_array_equal(w.window.vectors(), before[1])


def test_rejects_bad_size():
    with pytest.raises(ValueError):
        WindowStore(0, 4)


def test_blocks_grow_fourfold_up_to_the_window_size():
    assert [block_rows(256, n) for n in (0, 1, 4, 5, 16, 17, 100, 256)] == [
        4, 4, 4, 16, 16, 64, 256, 256]
    assert block_rows(300, 299) == 300 and block_rows(3, 1) == 3
    w = OneWindow(256)
    for u in range(20):
        w.add(u, float(u), v(u))
    assert w.window.nbytes() == 64 * (4 + 32)  # 20 seeds in a 64-row block of 1-d vectors
    assert bytes_bound(256, 128) == 256 * (640 + 64)  # + a quarter, + doubled bookkeeping


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10_000)), max_size=200,
                unique_by=lambda e: e[1]),
       st.integers(1, 10))
def test_window_is_the_last_n_distinct_users_by_time(events, size):
    """Against a plain reference: the N users with the newest clicks, in click order."""
    events = sorted(events, key=lambda e: e[1])  # one item's partition delivers in order
    w = OneWindow(size)
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
        w = OneWindow(size)
        for u, ts in order:
            w.add(u, float(ts), v(u))
        assert w.users() == expect
        if expect:
            assert w.window.times() == [float(newest[u]) for u in expect]
            assert w.window.newest_ts() == float(newest[expect[-1]])
        windows.append(w)
    if expect:
        np.testing.assert_array_equal(windows[0].window.vectors(), windows[1].window.vectors())


_SEEDS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 12), st.integers(0, 40)),
                  max_size=150)


@settings(max_examples=150, deadline=None)
@given(_SEEDS, st.integers(1, 6), st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_many_windows_in_polls_equal_the_reference_seed_by_seed(seeds, size, cuts):
    """Many items' seeds, ties, replays and late arrivals included, in polls of any
    size: every window equals the per-seed reference, users, times and vectors, and each
    seed's storage row is where the reference put it."""
    cfg = WindowConfig(size=size, k=2, refresh_every=10**9)
    state = ItemClusters(cfg)
    ref: dict[int, ReferenceWindow] = {}
    vec = np.arange(len(seeds) * 3, dtype=np.float32).reshape(-1, 3)
    lo = 0
    for cut in [*cuts, len(seeds)] * (len(seeds) // max(sum(cuts), 1) + 1):
        poll = seeds[lo:lo + cut]
        if not poll:
            break
        for j, (item, user, ts) in enumerate(poll):  # one record per seed, in arrival order
            ref.setdefault(item, ReferenceWindow(size)).add(user, float(ts), vec[lo + j])
        state.apply_columns(SeedColumns([s[0] for s in poll], list(range(len(poll) + 1)),
                                        np.array([s[1] for s in poll], np.int64),
                                        np.array([s[2] for s in poll], np.float64),
                                        vec[lo:lo + len(poll)], ""))
        lo += cut
    assert sorted(state.items) == sorted(ref)
    for item, want in ref.items():
        got = state.items[item].window
        assert got.users() == want.users()
        assert got.times() == [want._ts[r] for r in want._rows.values()]
        np.testing.assert_array_equal(got.vectors(), want.vectors())
        np.testing.assert_array_equal(got.stored(), want.stored())
    assert state.seeds_held() == sum(len(w) for w in ref.values())


def test_windows_spread_over_many_chunks_equal_the_reference(monkeypatch):
    """Vectors in chunks of 64 rows (a block never straddles two): blocks that move as
    windows grow, freed blocks reused, the store compacted in place, gathers and
    scatters over many chunks."""
    monkeypatch.setattr(WindowStore, "CHUNK_BYTES", 64 * 4 * 4)
    monkeypatch.setattr(WindowStore, "COMPACT_MIN_ROWS", 0)
    compactions = []
    compact = WindowStore.compact

    def counted(self):
        compactions.append((self._top, self._used))
        compact(self)
        assert self._top == self._used  # nothing free is left behind
    monkeypatch.setattr(WindowStore, "compact", counted)
    rng = np.random.default_rng(7)
    n = 6000
    items, users = rng.integers(0, 300, n), rng.integers(0, 40, n)
    ts = rng.integers(0, 500, n).astype(np.float64)
    vec = rng.normal(size=(n, 4)).astype(np.float32)
    state = ItemClusters(WindowConfig(size=16, k=3, refresh_every=5))
    ref: dict[int, ReferenceWindow] = {}
    for lo in range(0, n, 700):
        hi = min(n, lo + 700)
        for j in range(lo, hi):
            ref.setdefault(int(items[j]), ReferenceWindow(16)).add(int(users[j]), ts[j], vec[j])
        state.apply_columns(SeedColumns(items[lo:hi].tolist(), list(range(hi - lo + 1)),
                                        users[lo:hi], ts[lo:hi], vec[lo:hi], ""))
        if lo == 2800:
            state.drop(set(range(0, 300, 3)))  # freed blocks, reused by the items' return
            for i in range(0, 300, 3):
                ref.pop(i, None)
    store = state._tables[4].windows
    assert len(store._chunks) > 10 and compactions
    for item, want in ref.items():
        got = state.items[item].window
        assert got.users() == want.users()
        np.testing.assert_array_equal(got.stored(), want.stored())
