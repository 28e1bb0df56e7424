"""The demo serves a checkpoint trained with today's defaults, never a stale one."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Settings
from engine.synthetic import SyntheticSpec, generate
from lookalike.pipeline import ensure_checkpoint
from models.features import FeatureSpace
from models.ralm import RalmConfig, RalmModel
from models.train_ralm import LATEST

SPEC = SyntheticSpec(n_users=120, n_items=30, n_clusters=3, clicks_per_user=8.0, seed=1)


def _settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path)


def _save(s: Settings, cfg: RalmConfig, train) -> Path:
    model = RalmModel.new(cfg, FeatureSpace.build(train, cfg.history_len), version="ralm-old")
    s.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = model.save(s.checkpoint_dir / "ralm-old.pt")
    (s.checkpoint_dir / LATEST).write_text(path.name + "\n")
    return path


def test_a_checkpoint_with_todays_defaults_is_reused(tmp_path: Path) -> None:
    s, train = _settings(tmp_path), generate(SPEC)
    path = _save(s, RalmConfig(), train)
    assert ensure_checkpoint(s, train, retrain=False) == path


@pytest.mark.slow
def test_a_checkpoint_with_other_settings_is_replaced(tmp_path: Path, capsys) -> None:
    s, train = _settings(tmp_path), generate(SPEC)
    old = _save(s, RalmConfig(transform="relu", activity_prior=False), train)
    got = ensure_checkpoint(s, train, retrain=False)
    assert got != old and "activity_prior, transform" in capsys.readouterr().out
    assert RalmModel.load(got).config == RalmConfig()
