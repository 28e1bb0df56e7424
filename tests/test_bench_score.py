"""``lookalike bench score`` runs end to end on the test broker (quick sizes)."""

import math

from lookalike.bench import BenchOptions, runner


def test_score_bench_reports_finite_positive_figures(broker, tmp_path, settings):
    opts = BenchOptions(settings=settings, out_dir=tmp_path, quick=True,
                        bootstrap_servers=broker.bootstrap_servers)
    report = runner("score")(opts)
    figures = {f.name: f for f in report.figures}
    assert figures["worker-side p99, batch 1"].target == "<= 2"
    assert figures["end-to-end p99 / relay round-trip p99"].target == "<= 2"
    assert any(f.unit == "users/s" and f.target == ">= 2000" for f in report.figures)
    assert all(math.isfinite(f.value) and f.value > 0 for f in report.figures)
    assert "index recall@200 vs exact search" in figures
    assert {"batch-1 p50, 2 threads / 1", "batched time per user, 2 threads / 1",
            "batch-1 p50, 2 threads / 1, one core busy",
            "batched time per user, 2 threads / 1, one core busy"} <= set(figures)
    assert report.settings["items"] > 0 and report.machine["cores"] >= 1
    # the integrator rows: both clients, their defaults and the recommended settings;
    # the recommended fetch wait answers faster than the default's (500 ms) wait
    rows = {n: f.value for n, f in figures.items() if n.startswith("client round trip")}
    assert len(rows) == 4
    assert rows["client round trip p50, kafka-python: fetch_max_wait_ms=10"] < rows[
        "client round trip p50, kafka-python: defaults"]
