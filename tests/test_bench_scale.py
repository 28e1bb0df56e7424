"""``lookalike bench scale --quick``: the sweeps run, the plot is written, every figure is sane."""

from __future__ import annotations

import math

from engine.config import load_settings
from lookalike.bench import BenchOptions, runner
from lookalike.bench.scale import user_bytes, window_bytes


def test_quick_scale_bench_reports_and_plots(tmp_path) -> None:
    opts = BenchOptions(settings=load_settings(None, cache_dir=tmp_path), out_dir=tmp_path / "b",
                        quick=True)
    report = runner("scale")(opts)
    figures = {f.name: f.value for f in report.figures}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert any(name.startswith("clustering cost growth") for name in figures)
    assert any(name.startswith("user state cost growth") for name in figures)
    assert (opts.out_dir / "scale.png").stat().st_size > 10_000


def test_state_memory_grows_with_what_is_held(tmp_path) -> None:
    """More seeds per item cost more bytes; a user costs what the configuration bounds."""
    s = load_settings(None, cache_dir=tmp_path)
    assert window_bytes(s.window, 50, 64) > window_bytes(s.window, 50, 4) + 64 * 128 * 2
    cfg = s.scoring
    rings = 8 * max(cfg.max_seen, cfg.history_len) + 4 * cfg.history_len
    for clicks in (2, 2 * cfg.max_seen):  # the rings are per slot: full or not, one price
        assert rings <= user_bytes(s, 300, clicks) <= rings + 1024
