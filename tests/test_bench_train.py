"""``lookalike bench train``: RecBole's way of feeding SASRec, pinned; the bench runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.config import default_cache_dir, load_settings
from lookalike.bench import BenchOptions, runner
from lookalike.bench.train import prefixes
from models.splits import Ragged


def test_prefixes_are_every_click_after_the_first_with_what_came_before() -> None:
    train = Ragged(np.array([0, 3, 4, 6]), np.array([5, 6, 7, 8, 1, 2]))  # users: 3, 1, 2 clicks
    seqs, targets = prefixes(train, max_len=2)
    # tokens are dense items + 1, 0 pads on the left; a one-click user gives no prefix
    assert seqs.tolist() == [[0, 6], [6, 7], [0, 2]]
    assert targets.tolist() == [7, 8, 3]


@pytest.mark.slow
def test_quick_train_bench_reports_the_ratio(ml100k, tmp_path) -> None:
    s = load_settings(None, cache_dir=default_cache_dir())  # ml-100k from the user's cache
    report = runner("train")(BenchOptions(settings=s, out_dir=tmp_path, quick=True))
    figures = {f.name: f.value for f in report.figures}
    assert all(math.isfinite(v) and v > 0 for v in figures.values())
    ours = figures["SASRec epoch, ours (all positions per window)"]
    assert figures["speed-up vs RecBole's way, same run"] == pytest.approx(
        figures["SASRec epoch, RecBole's way (every prefix an example), same net"] / ours)
