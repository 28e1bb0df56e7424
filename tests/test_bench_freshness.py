"""``lookalike bench freshness --quick`` on the session's embedded broker, real ml-100k clicks:
both paths (RALM's centroids, SASRec's live user state); and how the SASRec probe picks a
click that must change the answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookalike.bench import runner
from lookalike.bench.freshness import seq_probe


@pytest.mark.slow
def test_quick_freshness_bench_sees_every_probe_through(quick_bench) -> None:
    """Each probe click reaches the published centroids and then a recommendation,
    each SASRec probe click changes the user's ``seq`` answer into the model's own, and
    an announced model serves once its centroids cover the items."""
    opts = quick_bench
    report = runner("freshness")(opts)
    figures = {f.name: f.value for f in report.figures}
    assert figures["probes"] == 4
    assert figures["probes reflected in a recommendation"] == 1.0
    for name in ("probes answered from their history before the click",
                 "probes reflected in a recommendation",
                 "reflecting answers equal to the model's top-K with the click"):
        assert figures[f"SASRec: {name}"] == 1.0, name
    for name, value in figures.items():
        assert math.isfinite(value) and value > 0, (name, value)
    published = figures["click -> item's centroids published, p99"]
    reflected = figures["click -> a recommendation that reflects it, p99"]
    assert published < reflected  # centroids first, then the recommendation that uses them
    assert "SASRec: click -> a recommendation that reflects it, p99" in figures
    assert report.settings["pipelines"]["seq"]["ranker"] == "sasrec"
    swap = next(f for f in report.figures if f.name.startswith("model swap"))
    assert swap.ok  # the announced model served once its centroids covered the items
    js, md = report.write(opts.out_dir)
    text = md.read_text()
    assert "click -> a recommendation that reflects it" in text and "SASRec: " in text
    assert js.stat().st_size > 0


class _NextItem:
    """A stand-in sequence model: items near the last click score highest."""

    item_ids_ = np.arange(100, 200)

    def __init__(self, flat: bool = False) -> None:
        self.flat = flat

    def score(self, histories: list[list[int]]) -> np.ndarray:
        if self.flat:
            return np.zeros((len(histories), len(self.item_ids_)))
        last = np.array([h[-1] for h in histories])[:, None]
        return -np.abs(self.item_ids_[None] - last).astype(float)


def test_seq_probe_picks_a_click_that_changes_the_top_k_set() -> None:
    history = [150, 151]
    p = seq_probe(_NextItem(), history, np.array([149, 152, 120, 180]), k=3)  # type: ignore[arg-type]
    assert p.before == {149, 152, 153}  # nearest the last click, the history left out
    assert p.item not in p.before and p.item not in history
    assert p.after - p.before  # new items enter: not only the clicked one leaving
    assert p.item in (120, 180)  # 149 and 152 are in the answer already: passed over


def test_seq_probe_refuses_when_no_click_moves_the_answer() -> None:
    with pytest.raises(ValueError, match="changes SASRec's top-3"):
        seq_probe(_NextItem(flat=True), [150], np.array([120, 180]), k=3)  # type: ignore[arg-type]
