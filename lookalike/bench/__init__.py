"""``lookalike bench``: one module per stage, one report format.

Each ``lookalike/bench/<name>.py`` exposes ``run(opts: BenchOptions) -> BenchReport``.
Every figure that has a target is a ratio against a baseline measured in the
same run (the machines are shared and noisy); absolute numbers are reported
beside it, with the machine's core count.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lookalike.bench.report import BenchOptions, BenchReport

#: every bench, in the order ``lookalike bench all`` runs them
NAMES = ("ingest", "cluster", "score", "freshness", "train", "scale")
#: benches ``all`` leaves out (``soak`` takes ten minutes by design, ``recovery`` about as
#: long: two passes of 1M clicks, one with 30 kill events, then ``failover``: scoring
#: workers killed under a request stream, a few minutes)
EXTRA = ("soak", "recovery", "failover")


def runner(name: str) -> Callable[[BenchOptions], BenchReport]:
    """The ``run`` function of bench ``name``; a clear error when it does not exist."""
    if name not in NAMES + EXTRA:
        raise ValueError(f"unknown bench {name!r}; choose from "
                         f"{', '.join(NAMES + EXTRA)} or all")
    try:
        module = importlib.import_module(f"lookalike.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"lookalike.bench.{name}":
            raise
        raise ValueError(f"bench {name!r} is not built yet") from e
    return module.run


__all__ = ["NAMES", "BenchOptions", "BenchReport", "runner"]
