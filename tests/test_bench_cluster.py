"""``lookalike bench cluster --quick``: the report's shape, not its timings (noisy)."""

import math

import numpy as np

from engine.bench import runner
from engine.bench.cluster import full_windows, our_inertia, sklearn_refresh
from engine.bench.report import BenchOptions
from engine.config import WindowConfig

FIGURES = {
    "state path seed events/s", "state path / 100k target", "state path / per-record path",
    "worker loop seed events/s", "worker loop / 100k target", "refresh items/s (ours)",
    "refresh items/s (sklearn per item)", "refresh speed-up vs sklearn",
    "refresh speed-up vs sklearn, ours on 2 threads",
    "refresh inertia / sklearn", "window bytes per item (bound)",
    "window bytes per item (measured)", "window bytes per item (float16 bound)",
    "centroid records published during the run",
    "items waiting for the publish budget at the end",
}
MAY_BE_ZERO = {"items waiting for the publish budget at the end"}


def test_quick_bench_reports_every_figure(settings, tmp_path):
    opts = BenchOptions(settings=settings, out_dir=tmp_path, quick=True,
                        bootstrap_servers=settings.kafka.bootstrap_servers)
    report = runner("cluster")(opts)
    got = {f.name: f for f in report.figures}
    assert set(got) == FIGURES
    assert all(math.isfinite(f.value) and (f.value > 0 or f.name in MAY_BE_ZERO and f.value == 0)
               for f in report.figures)
    assert got["refresh inertia / sklearn"].value <= 1.01  # same update: not a timing
    assert report.machine["cores"] >= 1
    js, md = report.write(tmp_path)
    assert js.exists() and "refresh speed-up vs sklearn" in md.read_text()


def test_refresh_all_equals_sklearn_partial_fit_per_item():
    cfg = WindowConfig(size=64, k=5)
    state = full_windows(cfg, 6, seed=3)
    _, sk = sklearn_refresh(state, list(range(6)))
    before = {i: state.items[i].centroids.copy() for i in range(6)}
    state.refresh_all(iters=1, chunk=4)  # two chunks
    assert abs(our_inertia(state, list(range(6))) / sk - 1) < 1e-4
    assert all(not np.array_equal(before[i], state.items[i].centroids) for i in range(6))
