"""``lookalike bench recovery --quick``: a clean pass and a pass with SIGKILLs end in the
same windows and user counts, both equal to what the click log implies (the full run,
1M clicks and each worker killed 20 times, is the bench)."""

from __future__ import annotations

import pytest

from lookalike.bench import runner


@pytest.mark.slow
def test_quick_recovery_loses_and_double_counts_nothing(quick_bench) -> None:
    report = runner("recovery")(quick_bench)
    f = {x.name: x.value for x in report.figures}
    assert f["SIGKILLs injected (crash run)"] == 2  # scoring alone, then clustering alone
    assert f["restarts that started from a snapshot"] > 0
    for name in ("items whose window differs, crash vs clean",
                 "items whose window differs from the click log (crash run)",
                 "users whose click count differs from the log (crash run)",
                 "|seeds held, crash - clean|"):
        assert f[name] == 0, name
    assert 0 <= f["variance explained by the centroids, |crash - clean|, mean over items"] < 0.2
    # then the failover part: a killed scoring worker's users are answered again by the
    # survivor within two session timeouts, and the survivor's own users were not
    # stalled for a whole session timeout (it kept their state through the rebalance)
    killed = f["failover: killed worker's partition: kill -> first answer, max"]
    assert 0 < killed <= 12.0  # quick: session timeout 6 s
    assert f["failover: survivor's own partition: longest gap, max"] < 6.0
    assert f["failover: normal gap between answers, p50"] < 0.5
