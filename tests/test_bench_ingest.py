"""``lookalike bench ingest`` runs end to end on the test broker (quick sizes)."""

import math

from lookalike.bench import BenchOptions, runner


def test_ingest_bench_reports_finite_positive_figures(broker, tmp_path, settings):
    opts = BenchOptions(settings=settings, out_dir=tmp_path, quick=True,
                        bootstrap_servers=broker.bootstrap_servers)
    report = runner("ingest")(opts)
    figures = {f.name: f for f in report.figures}
    assert figures["stage / raw consume"].target == ">= 0.5"
    assert {"scoring stage click path", "raw kafka-python consume"} <= set(figures)
    assert all(math.isfinite(f.value) and f.value > 0 for f in report.figures)
    assert report.settings["clicks"] > 0 and report.machine["cores"] >= 1
    js, md = report.write(tmp_path)
    assert js.exists() and "| stage / raw consume |" in md.read_text()
