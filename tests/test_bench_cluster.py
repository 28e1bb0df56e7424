"""``lookalike bench cluster``: the report's shape (``--quick``; not its timings, noisy),
the refresh it times against scikit-learn's, and the worker's refresh budget it runs at."""

import math

import numpy as np
import pytest

from engine.clustering import ItemClusters, SeedColumns
from engine.config import WindowConfig
from engine.token_bucket import TokenBucket
from lookalike.bench import runner
from lookalike.bench.cluster import (
    full_windows,
    our_inertia,
    seed_stream,
    seeds_in,
    sklearn_refresh,
    state_path,
    without_refresh,
)
from lookalike.bench.report import BenchOptions

FIGURES = {
    "state path seed events/s", "state path / 100k target",
    "state path with refresh / without", "state path refreshes per 1k seed events",
    "state path refresh backlog at the end",
    "worker loop seed events/s", "worker loop / 100k target", "worker loop refreshes run",
    "worker loop refresh backlog at the end", "refresh items/s (ours)",
    "refresh items/s (sklearn per item)", "refresh speed-up vs sklearn",
    "refresh speed-up vs sklearn, ours on 2 threads",
    "refresh inertia / sklearn", "window bytes per item (bound)",
    "window bytes per item (measured)", "window bytes per item (float16 bound)",
    "centroid records published during the run",
    "items waiting for the publish budget at the end",
}
MAY_BE_ZERO = {"items waiting for the publish budget at the end",
               "state path refresh backlog at the end", "worker loop refresh backlog at the end",
               "worker loop refreshes run"}


def test_quick_bench_reports_every_figure(settings, tmp_path):
    opts = BenchOptions(settings=settings, out_dir=tmp_path, quick=True,
                        bootstrap_servers=settings.kafka.bootstrap_servers)
    report = runner("cluster")(opts)
    got = {f.name: f for f in report.figures}
    assert set(got) == FIGURES
    assert all(math.isfinite(f.value) and (f.value > 0 or f.name in MAY_BE_ZERO and f.value == 0)
               for f in report.figures)
    # not timings: ours is sklearn's step with emptied slots dropped, so never below it
    assert 1 - 1e-5 <= got["refresh inertia / sklearn"].value <= 1.01
    assert got["state path refreshes per 1k seed events"].value > 0  # the refresh ran
    assert "per-record" not in md_of(report, tmp_path)
    assert report.machine["cores"] >= 1


def md_of(report, tmp_path) -> str:
    js, md = report.write(tmp_path)
    assert js.exists()
    text = md.read_text()
    assert "refresh speed-up vs sklearn" in text
    return text


def _same_as_sklearn(state: ItemClusters, items: list[int]) -> int:
    """One refresh_all(iters=1) step equals MiniBatchKMeans(init=current).partial_fit per
    item: same counts in every slot, same centroids where sklearn's slot got points; a
    slot without points empties in ours (count 0, zero centroid) and keeps its old
    centroid in sklearn's. Returns how many items' centroids moved (an item whose labels
    were already the nearest centroids' is at the fixed point and stays)."""
    assert all((state.items[i].counts > 0).all() for i in items)  # no empty slot to start
    models: dict = {}
    _, sk = sklearn_refresh(state, items, models)
    before = {i: state.items[i].centroids.copy() for i in items}
    assert state.refresh_all(iters=1) == len(state.items)
    assert state.refreshes == len(state.items) and not state.due
    for i in items:
        ours, m = state.items[i], models[i]
        kept = m._counts > 0
        np.testing.assert_array_equal(ours.counts, m._counts)
        np.testing.assert_allclose(ours.centroids[kept], m.cluster_centers_[kept],
                                   rtol=1e-4, atol=1e-5)
        assert (ours.centroids[~kept] == 0).all()
        np.testing.assert_array_equal(m.cluster_centers_[~kept], before[i][~kept])
    assert our_inertia(state, items) >= sk * (1 - 1e-5)
    return sum(not np.array_equal(before[i], state.items[i].centroids) for i in items)


def test_refresh_all_equals_sklearn_partial_fit_per_item():
    cfg = WindowConfig(size=32, k=5)
    state = full_windows(cfg, 40, seed=3)  # two chunks of the batched refresh (32 + 8)
    assert state.refreshes == 0 and not state.due  # filled with the refresh off
    assert all(len(st.window) == cfg.size for st in state.items.values())
    assert _same_as_sklearn(state, list(range(40))) >= 10


def test_refresh_empties_a_slot_that_sklearn_keeps():
    """Streamed through a small window (seeds evicted), a slot loses all its points
    to the refresh: count 0 in ours, compared slot by slot with sklearn's."""
    cfg = WindowConfig(size=12, k=6)
    state = ItemClusters(without_refresh(cfg, 10**6))
    x = (np.cumsum(np.random.default_rng(111).normal(size=(60, 2)), 0) * 0.3).astype(np.float32)
    state.apply_columns(SeedColumns([7], [0, 60], np.arange(60, dtype=np.int64),
                                    np.arange(60, dtype=np.float64), x))
    assert state.refreshes == 0
    assert _same_as_sklearn(state, [7]) == 1
    assert (state.items[7].counts == 0).any()  # the case this test is for


def test_token_bucket_fills_at_its_rate_one_second_deep():
    """The budget of the worker's publishing and refreshes, and of the bench's state path."""
    now = [100.0]
    bucket = TokenBucket(2_000.0, clock=lambda: now[0])
    assert bucket.fill(float("inf")) == 2_000.0  # an unlimited balance: the bucket, full
    assert bucket.fill(1_500.0) == 1_500.0  # no time passed: nothing earned
    now[0] += 0.1
    assert bucket.fill(1_500.0) == pytest.approx(1_700.0)
    now[0] += 0.2
    assert bucket.fill(-3.0) == pytest.approx(400.0)  # an overdraft counts as none
    now[0] += 5.0
    assert bucket.fill(0.0) == 2_000.0  # never more than one second's worth


def test_state_path_refreshes_within_the_budget():
    polls = seed_stream(8_000, seed=1, items=50)  # ~160 seeds an item: many refreshes due
    n = seeds_in(polls)
    cfg = WindowConfig(size=64, k=4, refresh_every=16)

    free = ItemClusters(cfg)  # offline: unlimited tokens, every due item refreshed
    state_path(free, polls, "free")
    assert n // 32 < free.refreshes <= n // 16 and not free.due

    frozen = ItemClusters(cfg)  # a clock that stands still: the first poll's full bucket only
    state_path(frozen, polls, "budget", TokenBucket(3.0, clock=lambda: 0.0))
    assert frozen.refreshes == 3 and len(frozen.due) == len(frozen) == 50  # the rest wait

    off = ItemClusters(without_refresh(cfg, n))
    state_path(off, polls, "off")
    assert off.refreshes == 0 and not off.due
