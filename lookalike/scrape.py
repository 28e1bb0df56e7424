"""Read a worker's metrics over HTTP, as Prometheus would.

The demo waits on these numbers and the tests assert on them, so both see what
an operator sees rather than the worker's internals.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(url: str, timeout_s: float = 2.0) -> dict[Sample, float]:
    """{(sample name, labels): value} of one /metrics page."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        text = r.read().decode()
    out: dict[Sample, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def quantile_from_histogram(samples: dict[Sample, float], name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (summed over label sets)."""
    buckets: dict[float, float] = {}
    for (n, ls), v in samples.items():
        if n == f"{name}_bucket":
            le = float(dict(ls)["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    if not buckets:
        return float("nan")
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return float("nan")
    for b in bounds:
        if buckets[b] >= q * count:
            return b
    return bounds[-1]
