"""ItemClusters' batched paths against the plain per-item ones."""

import numpy as np
import pytest

from engine import kmeans
from engine.clustering import ItemClusters, decode_poll
from engine.codec import BadEvent, SeedBatch, decode_seeds, encode_seeds
from engine.config import WindowConfig
from tests.window_reference import ReferenceWindow as SeedWindow


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


def _group(poll):
    out: dict[int, list[SeedBatch]] = {}
    for item, b in poll:
        out.setdefault(item, []).append(b)
    return out


def _assert_invariant(state: ItemClusters) -> None:
    """Every item's centroids are the means of its window's seeds by label."""
    for st in state.items.values():
        c, n = kmeans.means(st.window.vectors(), st.labels(), state.cfg.k)
        np.testing.assert_allclose(st.centroids, c, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(st.counts, n)


@pytest.mark.parametrize("every", [3, 1000])
def test_centroids_depend_on_each_items_seed_order_not_on_the_polls(every):
    """The same seeds polled whole, poll by poll, or one at a time: the same windows and
    bit-identical centroids (refreshes included: they run before an item's next seed)."""
    cfg = WindowConfig(size=5, k=3, refresh_every=every)
    polls = _polls()
    whole, by_poll, one = ItemClusters(cfg), ItemClusters(cfg), ItemClusters(cfg)
    whole.apply_many(_group([ib for p in polls for ib in p]))
    for poll in polls:
        by_poll.apply_many(_group(poll))
        for item, b in poll:
            for j in range(len(b.users)):
                one.apply(item, SeedBatch(b.users[j:j + 1], b.ts[j:j + 1], b.vectors[j:j + 1],
                                          "v1"))
    assert whole.refreshes == by_poll.refreshes == one.refreshes
    assert (whole.refreshes > 0) == (every == 3)
    for state in (by_poll, one):
        for item, st in whole.items.items():
            other = state.items[item]
            assert st.window.users() == other.window.users()
            np.testing.assert_array_equal(st.centroids, other.centroids)
            np.testing.assert_array_equal(st.counts, other.counts)
            assert st.labels().tolist() == other.labels().tolist()
    _assert_invariant(whole)


def test_windows_hold_what_per_item_windows_hold():
    cfg = WindowConfig(size=5, k=3)
    state = ItemClusters(cfg)
    windows: dict[int, SeedWindow] = {}
    for poll in _polls():
        state.apply_many(_group(poll))
        for item, b in poll:
            w = windows.setdefault(item, SeedWindow(cfg.size))
            for j in range(len(b.users)):
                w.add(int(b.users[j]), float(b.ts[j]), b.vectors[j])
    assert {i: st.window.users() for i, st in state.items.items()} == {
        i: w.users() for i, w in windows.items()}
    np.testing.assert_array_equal(state.items[0].window.vectors(), windows[0].vectors())


def test_a_users_newer_click_moves_their_seed_out_of_its_old_slot():
    """Re-seeding a user replaces their vector: the old one pulls nothing any more."""
    state = ItemClusters(WindowConfig(size=10, k=1))
    state.apply(1, SeedBatch(np.array([7, 8]), np.array([1.0, 2.0]),
                             np.array([[100.0, 0.0], [0.0, 0.0]], np.float32)))
    state.apply(1, SeedBatch(np.array([7]), np.array([3.0]), np.array([[2.0, 0.0]], np.float32)))
    np.testing.assert_allclose(state.items[1].centroids[0], [1.0, 0.0])
    assert state.items[1].counts[0] == 2


def test_refresh_waits_for_the_budget_oldest_first():
    """With no tokens due items wait in ``due``; tokens refresh them oldest first."""
    cfg = WindowConfig(size=8, k=2, refresh_every=2)
    state = ItemClusters(cfg)
    state.refresh_tokens = 0
    rng = np.random.default_rng(4)
    for item in (5, 3, 9):
        state.apply(item, SeedBatch(np.arange(2), np.arange(2.0),
                                    rng.normal(size=(2, 4)).astype(np.float32)))
    assert [st.item for st in state.due] == [5, 3, 9] and state.refreshes == 0
    state.refresh_tokens = 2
    assert state.refresh_due() == [5, 3]
    assert [st.item for st in state.due] == [9] and state.refresh_tokens == 0
    state.refresh_tokens = float("inf")
    assert state.refresh_due() == [9] and not state.due


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


def test_float16_windows_halve_vector_bytes():
    cfg = WindowConfig(size=8, k=2, vector_dtype="float16")
    state = ItemClusters(cfg)
    state.apply(1, SeedBatch(np.arange(8), np.arange(8.0), np.ones((8, 16), np.float32)))
    w = state.items[1].window
    assert w.nbytes() == 8 * (16 * 2 + 32) and w.vectors().dtype == np.float32  # + bookkeeping
    state.drop({1})
    assert len(state) == 0 and state.seeds_held() == 0


def test_float16_windows_average_what_they_hold():
    cfg = WindowConfig(size=4, k=1, vector_dtype="float16")
    state = ItemClusters(cfg)
    x = np.random.default_rng(5).normal(size=(9, 16)).astype(np.float32)
    state.apply(1, SeedBatch(np.arange(9), np.arange(9.0), x))
    _assert_invariant(state)  # the held vectors are float16-rounded: so are the means


def test_refresh_all_is_lloyd_per_item_whatever_the_chunking():
    """Windows of very different lengths: chunked and sorted, each item gets its own steps."""
    rng = np.random.default_rng(3)
    state = ItemClusters(WindowConfig(size=64, k=3, refresh_every=1000))
    for item, n in enumerate([1, 5, 64, 2, 30, 64, 9, 40]):
        state.apply(item, SeedBatch(np.arange(n), np.arange(n, dtype=np.float64),
                                    rng.normal(size=(n, 4)).astype(np.float32), "v"))
    before = {i: (st.centroids.copy(), st.counts.copy(), st.window.stored().copy(),
                  st.labels()) for i, st in state.items.items()}
    state._refresh(list(state.items.values()), iters=3, chunk=3)
    for i, st in state.items.items():
        c, n, x, lab = before[i]
        want = kmeans.lloyd(x[None], np.array([len(x)]), c[None], n[None], lab[None], 3)
        np.testing.assert_allclose(st.centroids, want[0][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(st.counts, want[1][0])
        assert st.labels().tolist() == want[2][0].tolist()
    _assert_invariant(state)


def test_export_and_restore_keep_labels_and_the_refresh_schedule():
    cfg = WindowConfig(size=6, k=2, refresh_every=4)
    a, b = ItemClusters(cfg), ItemClusters(cfg)
    polls = _polls(per_poll=20)
    for poll in polls[:3]:
        a.apply_many(_group(poll))
    b.restore(a.export(list(a.items)))
    for poll in polls[3:]:
        a.apply_many(_group(poll))
        b.apply_many(_group(poll))
    for item, st in a.items.items():
        np.testing.assert_array_equal(st.centroids, b.items[item].centroids)
        assert st.labels().tolist() == b.items[item].labels().tolist()


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


def _versioned(users: range, version: str, dim: int = 8) -> SeedBatch:
    rng = np.random.default_rng(users.start)
    return SeedBatch(np.array(users), np.arange(users.start, users.stop, dtype=np.float64),
                     rng.normal(size=(len(users), dim)).astype(np.float32), version)


def test_seeds_of_an_older_model_never_restart_a_newer_window():
    """Two workers on two model versions (a rolling reload) send seeds for one item by
    turns: the window moves to the newer version once and keeps growing; the older
    version's seeds are dropped and counted (they used to restart it every time)."""
    state = ItemClusters(WindowConfig(size=1000, k=4))
    for r in range(6):
        users = range(10 * r, 10 * r + 5)
        state.apply(1, _versioned(users, "ralm-20261201T000000-a"))
        state.apply(1, _versioned(range(users.start + 5, users.stop + 5),
                                  "ralm-20261207T000000-b"))
    st = state.items[1]
    assert st.model_version == "ralm-20261207T000000-b"
    assert len(st.window) == 30  # every newer-version seed, none wiped
    assert state.stale_seeds == 25  # the older version's seeds after the first switch


def test_the_announced_current_version_wins_a_rollback():
    """An operator rolls back (announces the older checkpoint): its seeds restart the
    window, and the newer version's seeds are the stale ones from then on."""
    old, new = "ralm-20261201T000000-a", "ralm-20261207T000000-b"
    state = ItemClusters(WindowConfig(size=1000, k=4))
    state.apply(1, _versioned(range(0, 5), new))
    state.current_version = old
    state.apply(1, _versioned(range(5, 10), old))
    state.apply(1, _versioned(range(10, 15), new))
    assert state.items[1].model_version == old and len(state.items[1].window) == 5
    assert state.stale_seeds == 5


def test_records_carry_each_items_centroids_as_held():
    from engine.codec import decode_centroids

    state = ItemClusters(WindowConfig(size=5, k=3))
    for poll in _polls(n_polls=2):
        state.apply_many(_group(poll))
    state.apply(99, SeedBatch(np.array([1]), np.array([7.0]), np.ones((1, 3), np.float32), "v2"))
    items = sorted(state.items)
    for dtype in ("float32", "float16"):
        for item, raw in zip(items, state.records(items, 123.0, dtype), strict=True):
            st, rec = state.items[item], decode_centroids(raw)
            np.testing.assert_allclose(rec.centroids, st.centroids, rtol=1e-3, atol=1e-3)
            np.testing.assert_array_equal(rec.counts, st.counts)
            assert (rec.n_seeds, rec.updated_at, rec.last_seed_ts, rec.model_version) == (
                len(st.window), 123.0, st.last_seed_ts, st.model_version)
