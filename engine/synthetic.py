"""Synthetic click stream with planted user clusters, for scale tests.

Why: ml-100k has 943 users, while the RALM paper serves ~3M users and 43.5k items; this
generator produces a stream of that size whose ground truth (each user's cluster) is
known, so look-alike quality can still be checked at scale.

Model. Each user belongs to one of `n_clusters` planted clusters ("tastes"). The catalogue
is shuffled and cut into one slice per cluster. A user makes Poisson(clicks_per_user) + 1
clicks; each click is, with probability `affinity`, an item of the user's cluster's slice
(Zipf-weighted inside the slice), otherwise an item by global Zipf popularity. Click times
are i.i.d. uniform in [start_ts, start_ts + duration_s), and the stream is sorted by
(ts, user, item).

Streaming. The time range is cut into windows of about 2**20 expected clicks (a number
that depends on the spec only, never on `chunk`), generated one after the other: a
user's Poisson clicks spread uniformly over the windows are independent Poisson per
window, so a window's clicks are a Poisson count of uniform users (with times drawn
already sorted) plus the guaranteed "+1" click of the users assigned to it. Memory:
O(n_users) (cluster labels, guaranteed-click windows) plus one window and one chunk.

Measured (iter_chunks, numpy 2.4, one core of a shared 2-core VM): 3M users x 43.5k
items x Poisson(10)+1 clicks = 33M clicks in 4-6 s, i.e. ~6-8M clicks/s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engine.data import Dataset, Items, Users

_WINDOW_CLICKS = 1 << 20  # expected clicks per internal time window

OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment",
    "executive", "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none",
    "other", "programmer", "retired", "salesman", "scientist", "student", "technician",
    "writer",
)
GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

# Independent random streams, so e.g. planted_clusters() needs no click generation.
_CLUSTERS, _CATALOGUE, _PROFILES, _ITEM_META, _STREAM = range(5)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset (same spec, same data)."""

    n_users: int = 10_000
    n_items: int = 1_000
    n_clusters: int = 20
    clicks_per_user: float = 20.0  # mean; actual Poisson(mean) + 1
    zipf_a: float = 1.1  # item popularity skew
    affinity: float = 0.8  # share of clicks from the user's cluster's items
    seed: int = 0
    start_ts: float = 1_700_000_000.0
    duration_s: float = 86_400.0

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_clusters < 1:
            raise ValueError("n_users and n_clusters must be >= 1")
        if self.n_items < self.n_clusters:
            raise ValueError(f"n_items ({self.n_items}) must be >= n_clusters "
                             f"({self.n_clusters}): each cluster needs its own items")
        if self.clicks_per_user < 0 or self.zipf_a < 0 or self.duration_s <= 0:
            raise ValueError("clicks_per_user, zipf_a must be >= 0 and duration_s > 0")
        if not 0.0 <= self.affinity <= 1.0:
            raise ValueError(f"affinity must be in [0, 1], got {self.affinity}")


@dataclass(frozen=True)
class _Alias:
    """Walker's alias table: O(1) draws from a fixed discrete distribution."""

    prob: np.ndarray  # keep column k with this probability ...
    alias: np.ndarray  # ... else take this one


def _alias_table(weights: np.ndarray, offset: int = 0) -> _Alias:
    """Vose's construction (a Python loop, but only once per catalogue, not per click)."""
    n = len(weights)
    scaled = (weights * (n / weights.sum())).tolist()
    prob, alias = [1.0] * n, list(range(offset, offset + n))
    small = [k for k, x in enumerate(scaled) if x < 1.0]
    large = [k for k, x in enumerate(scaled) if x >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], offset + g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return _Alias(np.array(prob), np.array(alias, dtype=np.int64))


@dataclass(frozen=True)
class _Catalogue:
    """One alias table holding 1 + n_clusters distributions side by side.

    Columns [0, n) draw by global Zipf popularity; cluster c's slice of the shuffled
    catalogue sits at columns [n + bounds[c], n + bounds[c + 1]), Zipf-weighted inside.
    `items` maps a column to its dense item.
    """

    table: _Alias
    items: np.ndarray
    bounds: np.ndarray  # n_clusters + 1 slice boundaries, relative to n


def _rng(spec: SyntheticSpec, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(stream,)))


def planted_clusters(spec: SyntheticSpec) -> np.ndarray:
    """The planted cluster (0..n_clusters-1) of each dense user index."""
    return _rng(spec, _CLUSTERS).integers(0, spec.n_clusters, spec.n_users)


def _catalogue(spec: SyntheticSpec) -> _Catalogue:
    rng = _rng(spec, _CATALOGUE)
    n = spec.n_items
    popularity_rank = rng.permutation(n)
    slice_items = rng.permutation(n)
    bounds = np.arange(spec.n_clusters + 1) * n // spec.n_clusters
    tables = [_alias_table((popularity_rank + 1.0) ** -spec.zipf_a)] + [
        _alias_table(np.arange(1.0, hi - lo + 1.0) ** -spec.zipf_a, offset=n + lo)
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]
    table = _Alias(np.concatenate([t.prob for t in tables]),
                   np.concatenate([t.alias for t in tables]))
    return _Catalogue(table, np.concatenate([np.arange(n), slice_items]), bounds)


def _draw_items(cat: _Catalogue, cluster: np.ndarray, affinity: float,
                rng: np.random.Generator) -> np.ndarray:
    """One item per click: from the click's cluster slice w.p. affinity, else by popularity."""
    n_items = len(cat.items) // 2
    own = rng.random(len(cluster)) < affinity
    start = np.where(own, n_items + cat.bounds[cluster], 0)
    size = np.where(own, cat.bounds[cluster + 1] - cat.bounds[cluster], n_items)
    column = start + np.minimum((rng.random(len(cluster)) * size).astype(np.int64), size - 1)
    keep = rng.random(len(cluster)) < cat.table.prob[column]
    return cat.items[np.where(keep, column, cat.table.alias[column])]


def _tie_order(ts: np.ndarray, user: np.ndarray, item: np.ndarray) -> np.ndarray | None:
    """With ts sorted, the permutation that orders runs of equal ts by (user, item).

    Float timestamps near 1.7e9 s are spaced 2.4e-7 s apart, so millions of clicks a day
    do produce a few ties; only those runs are sorted.
    """
    tie = np.flatnonzero(ts[1:] == ts[:-1])
    if not len(tie):
        return None
    idx = np.union1d(tie, tie + 1)
    order = np.arange(len(ts))
    order[idx] = idx[np.lexsort((item[idx], user[idx], ts[idx]))]
    return order


def _sorted_uniform(n: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """n sorted i.i.d. uniforms in [lo, hi) in O(n): normalised exponential spacings."""
    gaps = np.cumsum(rng.standard_exponential(n + 1))
    return np.minimum(lo + (hi - lo) * (gaps[:-1] / gaps[-1]), np.nextafter(hi, lo))


def _window_clicks(guaranteed: np.ndarray, mean_extra: float, n_users: int, lo: float,
                   hi: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ts, user) of one window sorted by ts: the given users' guaranteed clicks merged
    with Poisson(mean_extra) clicks of uniform users (already in random order, so sorted
    times can be drawn directly instead of sorting)."""
    n_extra = rng.poisson(mean_extra)
    ts_extra = _sorted_uniform(n_extra, lo, hi, rng)
    user_extra = rng.integers(0, n_users, n_extra)
    ts_own = rng.uniform(lo, hi, len(guaranteed))
    by_time = np.argsort(ts_own)
    ts_own = np.minimum(ts_own[by_time], np.nextafter(hi, lo))
    at = np.searchsorted(ts_extra, ts_own, side="right") + np.arange(len(ts_own))
    rest = np.ones(n_extra + len(ts_own), dtype=bool)
    rest[at] = False
    ts = np.empty(len(rest))
    user = np.empty(len(rest), dtype=np.int64)
    ts[at], user[at] = ts_own, guaranteed[by_time]
    ts[rest], user[rest] = ts_extra, user_extra
    return ts, user


def _windows(spec: SyntheticSpec) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(dense user, dense item, ts) per time window, each sorted by (ts, user, item).

    A user's Poisson(mean) clicks spread uniformly over the windows are independent
    Poisson(mean / windows) per window, whose users are uniform given their total: so a
    window needs no per-user draws, only its own clicks, plus the "+1" click of the users
    whose guaranteed click falls in it.
    """
    clusters = planted_clusters(spec)
    cat = _catalogue(spec)
    expected = spec.n_users * (spec.clicks_per_user + 1.0)
    n_windows = max(1, math.ceil(expected / _WINDOW_CLICKS))
    rng = _rng(spec, _STREAM)
    guaranteed = rng.integers(0, n_windows, spec.n_users, dtype=np.int32)
    edges = spec.start_ts + spec.duration_s * np.arange(n_windows + 1) / n_windows
    for w in range(n_windows):
        ts, user = _window_clicks(np.flatnonzero(guaranteed == w),
                                  spec.n_users * spec.clicks_per_user / n_windows,
                                  spec.n_users, edges[w], edges[w + 1], rng)
        item = _draw_items(cat, clusters[user], spec.affinity, rng)
        order = _tie_order(ts, user, item)
        if order is not None:
            ts, user, item = ts[order], user[order], item[order]
        yield user, item, ts


def iter_chunks(spec: SyntheticSpec, chunk: int = 1_000_000,
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(user_ids, item_ids, ts) in chunks of `chunk` clicks (the last may be shorter).

    Ids are the external ids of generate(spec)'s tables (dense index + 1); the chunks
    concatenate to generate(spec)'s interactions, in order, whatever `chunk` is.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    empty_i, empty_t = np.zeros(0, np.int64), np.zeros(0, np.float64)
    pending: tuple[np.ndarray, ...] = (empty_i, empty_i, empty_t)
    for window in _windows(spec):
        user, item, ts = (np.concatenate(pair) for pair in zip(pending, window, strict=True))
        full = len(ts) // chunk * chunk
        for s in range(0, full, chunk):
            yield user[s:s + chunk] + 1, item[s:s + chunk] + 1, ts[s:s + chunk]
        pending = (user[full:], item[full:], ts[full:])
    if len(pending[2]):
        yield pending[0] + 1, pending[1] + 1, pending[2]


def _users(spec: SyntheticSpec, clusters: np.ndarray) -> Users:
    """Random profiles, mildly tied to the cluster so profile features carry some signal."""
    rng = _rng(spec, _PROFILES)
    n, k = spec.n_users, spec.n_clusters
    cluster_age = rng.uniform(20.0, 55.0, k)
    age = np.clip(np.rint(cluster_age[clusters] + rng.normal(0.0, 8.0, n)), 13, 80)
    cluster_job = rng.integers(0, len(OCCUPATIONS), k)
    job = np.where(rng.random(n) < 0.5, cluster_job[clusters],
                   rng.integers(0, len(OCCUPATIONS), n))
    zip_pool = np.array([f"{z:05d}" for z in rng.choice(100_000, 1_000, replace=False)],
                        dtype=object)
    return Users(
        ids=np.arange(1, n + 1, dtype=np.int64),
        age=age.astype(np.float32),
        gender=np.array(["M", "F"], dtype=object)[rng.integers(0, 2, n)].tolist(),
        occupation=np.array(OCCUPATIONS, dtype=object)[job].tolist(),
        zip_code=zip_pool[rng.integers(0, len(zip_pool), n)].tolist(),
    )


def _items(spec: SyntheticSpec, cat: _Catalogue) -> Items:
    """Titles item-<id>; each slice has a theme genre that its items carry."""
    rng = _rng(spec, _ITEM_META)
    n = spec.n_items
    owner = np.empty(n, dtype=np.int64)
    owner[cat.items[n:]] = np.repeat(np.arange(spec.n_clusters), np.diff(cat.bounds))
    theme = rng.integers(0, len(GENRES), spec.n_clusters)[owner]
    extra = rng.integers(0, len(GENRES), (n, 2))
    n_extra = rng.integers(0, 3, n)
    genres = [tuple(GENRES[g] for g in sorted({int(theme[i]), *extra[i, :n_extra[i]].tolist()}))
              for i in range(n)]
    ids = np.arange(1, n + 1, dtype=np.int64)
    return Items(ids=ids, title=[f"item-{i}" for i in ids.tolist()],
                 year=rng.integers(1950, 2024, n).astype(np.int32), genres=genres)


def generate(spec: SyntheticSpec) -> Dataset:
    """The whole synthetic dataset in memory (implicit feedback: rating 1.0)."""
    parts = list(_windows(spec))
    user, item, ts = (np.concatenate([p[k] for p in parts]) for k in range(3))
    return Dataset(
        name=f"synthetic-{spec.n_users}x{spec.n_items}-c{spec.n_clusters}-s{spec.seed}",
        users=_users(spec, planted_clusters(spec)),
        items=_items(spec, _catalogue(spec)),
        user=user,
        item=item,
        rating=np.ones(len(ts), dtype=np.float32),
        ts=ts,
    )
