"""Shared pytest fixtures: real MovieLens-100k, and the embedded broker (kafka_fixtures)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from engine.config import default_cache_dir
from engine.data import Dataset, fetch_ml100k, load_recbole

pytest_plugins = ["tests.kafka_fixtures"]

# Shared 2-core machines: wall-clock limits on example generation only make flakes.
settings.register_profile(
    "lookalike", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("lookalike")


@pytest.fixture(scope="session")
def ml100k() -> Dataset:
    """MovieLens-100k, fetched through pip once into the user's cache (never into git)."""
    folder = fetch_ml100k(default_cache_dir() / "data", quiet=True)
    return load_recbole(folder)


@pytest.fixture
def quick_bench(request, ml100k, tmp_path):
    """Options of a ``--quick`` bench on the session's broker, its cache seeing the ml-100k
    the session fetched (the bench loads it by name from ``cache_dir/data``)."""
    from lookalike.bench import BenchOptions

    s = request.getfixturevalue("settings")
    s.cache_dir.mkdir(parents=True, exist_ok=True)
    (s.cache_dir / "data").symlink_to(default_cache_dir() / "data")
    return BenchOptions(settings=s, out_dir=tmp_path / "bench", quick=True,
                        bootstrap_servers=s.kafka.bootstrap_servers)
