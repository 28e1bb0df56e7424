"""``lookalike bench freshness --quick`` on the session's embedded broker, real ml-100k clicks."""

from __future__ import annotations

import math

import pytest

from engine.bench import runner


@pytest.mark.slow
def test_quick_freshness_bench_sees_every_probe_through(quick_bench) -> None:
    """Each probe click reaches the published centroids and then a recommendation."""
    opts = quick_bench
    report = runner("freshness")(opts)
    figures = {f.name: f.value for f in report.figures}
    assert figures["probes"] == 4
    assert figures["probes reflected in a recommendation"] == 1.0
    for name, value in figures.items():
        assert math.isfinite(value) and value > 0, (name, value)
    published = figures["click -> item's centroids published, p99"]
    reflected = figures["click -> a recommendation that reflects it, p99"]
    assert published < reflected  # centroids first, then the recommendation that uses them
    js, md = report.write(opts.out_dir)
    assert "click -> a recommendation that reflects it" in md.read_text()
    assert js.stat().st_size > 0
