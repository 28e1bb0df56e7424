"""``lookalike bench soak --quick``: the soak's machinery on the embedded broker (no timing
assertions: the full ten-minute run is the bench)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lookalike.bench import runner
from lookalike.broker import LONG_RUN_LINGER_MS


@pytest.mark.slow
def test_quick_soak_answers_every_request_and_counts_only_injected_dead_letters(
        quick_bench) -> None:
    # its own embedded broker, as `lookalike bench soak` runs: long-run lingers, broker CPU
    opts = dataclasses.replace(quick_bench, bootstrap_servers=None)
    report = runner("soak")(opts)
    f = {x.name: x.value for x in report.figures}
    assert f["requests sent"] > 100 and f["clicks sent"] > 1000
    assert f["requests lost"] == 0
    assert f["bad clicks injected"] >= 6 and f["dead letters beyond the injected"] == 0
    for kind in ("scoring", "clustering"):
        assert 10 < f[f"{kind} RSS at the end"] < 8192  # MiB: a real process was sampled
    assert math.isfinite(f["request p99, first minute"])
    for kind in ("scoring", "clustering"):  # CPU of the worker processes was sampled
        assert 0 < f[f"{kind} CPU, first minute / last minute"] < 16
    assert (opts.out_dir / "soak.png").stat().st_size > 10_000
    assert math.isfinite(f["broker CPU last minute / second minute"])
    # on the embedded broker every producer lingers (broker.LONG_RUN_LINGER_MS): at most
    # one batch per partition per linger, the load's own requests included (2 partitions)
    for topic in ("score-requests", "recommendations", "seed-events"):
        bound = 2 * 1000 / LONG_RUN_LINGER_MS[topic] + 1
        assert 0 < f[f"batches/s produced to {topic}"] <= bound, topic
