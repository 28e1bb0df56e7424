"""The bench report format: targets checked on values, and the summary ``bench all`` ends with."""

from lookalike.bench.report import BenchReport, summary


def _report(name: str, *figures: tuple[str, float, str]) -> BenchReport:
    r = BenchReport(name, machine={"cores": 2, "platform": "x", "python": "3"})
    for fig, value, target in figures:
        r.add(fig, value, "x", target)
    return r


def test_targets_are_checked_both_ways():
    r = _report("a", ("fast", 12.0, ">= 10"), ("slow", 3.0, "<= 2"), ("info", 1.0, ""))
    assert [f.ok for f in r.figures] == [True, False, None]
    assert not r.ok and _report("b", ("fast", 10.0, ">= 10")).ok


def test_summary_lists_every_target_once_with_its_verdict():
    reports = [_report("a", ("fast", 12.0, ">= 10"), ("info", 5.0, "")),
               _report("b", ("slow", 3.0, "<= 2"), ("edge", 2.0, "<= 2"))]
    text = summary(reports)
    rows = [line for line in text.splitlines() if line.startswith("| a ") or
            line.startswith("| b ")]
    assert rows == ["| a | fast >= 10 | 12 x | PASS |", "| b | slow <= 2 | 3 x | **FAIL** |",
                    "| b | edge <= 2 | 2 x | PASS |"]
    assert text.startswith("## targets: 2 of 3 met")
