"""Synthetic planted-cluster stream: determinism, planted structure, chunking, skew."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine import synthetic
from engine.data import Dataset
from engine.synthetic import SyntheticSpec, generate, iter_chunks, planted_clusters

SMALL = SyntheticSpec(n_users=2_000, n_items=400, n_clusters=8, clicks_per_user=15.0)


def _same(a: Dataset, b: Dataset) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("user", "item", "ts"))


def _overlap_ratio(spec: SyntheticSpec) -> float:
    """Mean shared items of same-cluster user pairs over that of different-cluster pairs."""
    ds = generate(spec)
    clicked = np.zeros((spec.n_users, spec.n_items), dtype=np.float32)
    clicked[ds.user, ds.item] = 1.0
    shared = clicked @ clicked.T
    labels = planted_clusters(spec)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None, :]
    return float(shared[same].mean() / shared[different].mean())


def test_deterministic_for_a_seed() -> None:
    a, b = generate(SMALL), generate(SMALL)
    assert _same(a, b)
    assert a.users.gender == b.users.gender and a.items.genres == b.items.genres
    assert np.array_equal(planted_clusters(SMALL), planted_clusters(SMALL))
    other = generate(replace(SMALL, seed=1))
    assert not _same(a, other)


def test_stream_shape() -> None:
    ds = generate(SMALL)
    assert (len(ds.users), len(ds.items)) == (SMALL.n_users, SMALL.n_items)
    per_user = np.bincount(ds.user, minlength=SMALL.n_users)
    assert per_user.min() >= 1  # Poisson + 1
    assert abs(per_user.mean() - (SMALL.clicks_per_user + 1)) < 0.5
    assert SMALL.start_ts <= ds.ts[0] and ds.ts[-1] < SMALL.start_ts + SMALL.duration_s
    assert np.array_equal(np.lexsort((ds.item, ds.user, ds.ts)), np.arange(len(ds)))
    assert (ds.rating == 1.0).all()
    assert ds.items.title[0] == "item-1" and ds.users.ids[0] == 1
    assert all(ds.items.genres) and np.isfinite(ds.users.age).all()
    assert set(ds.users.gender) == {"M", "F"}


def test_same_cluster_users_share_more_items() -> None:
    assert _overlap_ratio(SMALL) > 3.0
    # the check has teeth: without cluster affinity the ratio collapses to ~1
    unplanted = replace(SMALL, affinity=0.0)
    assert 0.8 < _overlap_ratio(unplanted) < 1.25


def test_popularity_is_zipf_skewed() -> None:
    def top_decile_share(spec: SyntheticSpec) -> float:
        counts = np.sort(np.bincount(generate(spec).item, minlength=spec.n_items))[::-1]
        return float(counts[: spec.n_items // 10].sum() / counts.sum())

    spec = SyntheticSpec(n_users=3_000, n_items=1_000)
    assert top_decile_share(spec) > 0.35
    assert top_decile_share(replace(spec, zipf_a=0.0)) < 0.2


@pytest.mark.parametrize("chunk", [777, 10_000_000])
def test_chunks_concatenate_to_generate(chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(synthetic, "_WINDOW_CLICKS", 5_000)  # several windows
    ds = generate(SMALL)
    chunks = list(iter_chunks(SMALL, chunk=chunk))
    assert all(len(c[0]) == chunk for c in chunks[:-1]) and 0 < len(chunks[-1][0]) <= chunk
    users, items, ts = (np.concatenate([c[k] for c in chunks]) for k in range(3))
    assert np.array_equal(users, ds.users.ids[ds.user])
    assert np.array_equal(items, ds.items.ids[ds.item])
    assert np.array_equal(ts, ds.ts)


def test_equal_timestamps_are_ordered_by_user_then_item() -> None:
    # a 10 microsecond range at 1.7e9 s has only ~40 representable timestamps
    ds = generate(SyntheticSpec(n_users=500, n_items=50, n_clusters=5, duration_s=1e-5))
    assert len(np.unique(ds.ts)) < len(ds) // 10
    assert np.array_equal(np.lexsort((ds.item, ds.user, ds.ts)), np.arange(len(ds)))


def test_spec_is_validated() -> None:
    with pytest.raises(ValueError, match="n_clusters"):
        SyntheticSpec(n_items=5, n_clusters=10)
    with pytest.raises(ValueError, match="affinity"):
        SyntheticSpec(affinity=1.5)
    with pytest.raises(ValueError, match="chunk"):
        next(iter_chunks(SMALL, chunk=0))
