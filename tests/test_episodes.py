"""Stage-2 episodes: the audience task on training items, and what they must keep equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import Dataset
from engine.synthetic import SyntheticSpec, generate
from models.episodes import EpisodeData, episode_logits, episode_loss, first_raters
from models.evaluate_lookalike import auc
from models.features import ClickLog, FeatureSpace
from models.ralm import RalmConfig, RalmModel
from models.train_ralm import fit_ralm

SPEC = SyntheticSpec(n_users=240, n_items=60, n_clusters=4, clicks_per_user=12.0, seed=3)
CFG = RalmConfig.tiny(lookalike_examples="episodes", episode_steps=60, episode_items=8,
                      episode_seeds=(1, 3, 6))


@pytest.fixture(scope="module")
def train() -> Dataset:
    return generate(SPEC).time_split(0.8)[0]


def _data(train: Dataset, cfg: RalmConfig = CFG) -> tuple[RalmModel, EpisodeData]:
    torch.manual_seed(0)
    features = FeatureSpace.build(train, cfg.history_len)
    return RalmModel.new(cfg, features), EpisodeData(ClickLog(train, features), train, cfg)


def test_first_raters_are_distinct_users_by_first_click() -> None:
    user = np.array([5, 1, 5, 2, 1, 3])
    item = np.array([0, 0, 0, 1, 0, 1])
    ts = np.array([3.0, 4.0, 1.0, 2.0, 0.5, 2.0])
    raters, times = first_raters(user, item, ts, 3)
    assert raters[0].tolist() == [1, 5] and times[0].tolist() == [0.5, 1.0]
    assert raters[1].tolist() == [2, 3]  # a tie keeps log order
    assert raters[2].tolist() == []


def test_an_episode_hides_its_items_from_every_history(train: Dataset) -> None:
    model, data = _data(train)
    ep = data.sample(CFG.episode_items, np.random.default_rng(1))
    assert len(set(ep.items.tolist())) == len(ep.items)
    for i, s, p in zip(ep.items, ep.seeds, ep.positives, strict=True):
        assert len(s) in CFG.episode_seeds and len(p) >= 1
        assert np.concatenate([s, p]).tolist() == data.raters[i].tolist()
    hidden = model.features.item_of_rows(data.item_rows[ep.items])
    items = data.batch_without(ep.items).items.numpy()
    assert not np.isin(items, hidden).any()
    full = model.features.batch(data.categorical, data.continuous, data.rows).items.numpy()
    assert np.isin(full, hidden).any()  # ...which the plain histories hold


def test_score_all_is_the_pairwise_score(train: Dataset) -> None:
    model, _ = _data(train)
    g = torch.Generator().manual_seed(0)
    users, cent = torch.randn(7, CFG.dim, generator=g), torch.randn(5, CFG.k, CFG.dim, generator=g)
    mask = torch.rand(5, CFG.k, generator=g) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        got = model.lookalike.score_all(users, cent, mask)
        want = model.lookalike.score(users, cent[None].expand(7, -1, -1, -1),
                                     mask[None].expand(7, -1, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_loss_is_the_audience_softmax_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    seed = torch.tensor([[False, True, False, False]])
    pos = torch.tensor([[True, False, True, False]])
    z = torch.tensor([2.0, 1.0, -1.0])
    want = -(z[:2] - torch.logsumexp(z, 0)).mean()
    torch.testing.assert_close(episode_loss(logits, seed, pos, 0.0), want)
    # two items: user 0 is a positive of item 0 only; the item term is its softmax over items
    two = torch.cat([logits, torch.zeros(1, 4)])
    seed2, pos2 = torch.cat([seed, seed]), torch.cat([pos, torch.zeros(1, 4, dtype=bool)])
    audience = want / 2  # item 1 has no positive: its term is 0
    item_term = -(torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
                  + torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0]) / 2
    torch.testing.assert_close(episode_loss(two, seed2, pos2, 0.5), audience + 0.5 * item_term)


def test_episodes_learn_the_audience_task(train: Dataset) -> None:
    """On planted clusters, episodes raise the audience AUC of items they never drew."""
    model, data = _data(train)
    rng = np.random.default_rng(5)
    held = data.sample(CFG.episode_items, rng)

    def audience_auc(m: RalmModel) -> float:
        with torch.no_grad():
            logits = episode_logits(m, data, held).numpy()
        out = []
        for b, (s, p) in enumerate(zip(held.seeds, held.positives, strict=True)):
            pool = np.ones(data.n_users, bool)
            pool[s] = False
            rel = np.zeros(data.n_users, bool)
            rel[p] = True
            out.append(auc(logits[b][pool], rel[pool]))
        return float(np.mean(out))

    before = audience_auc(model)
    trained = fit_ralm(train, CFG.model_copy(update={"user_epochs": 1}), progress=False,
                       log=lambda _: None)
    after = audience_auc(trained)
    assert after > max(before + 0.05, 0.6), (before, after)
    losses = trained.metrics["lookalike_loss"]
    assert losses[-1] < losses[0]


def test_the_activity_prior_is_learned_and_served(train: Dataset) -> None:
    cfg = CFG.model_copy(update={"activity_prior": True, "user_epochs": 1})
    m = fit_ralm(train, cfg, progress=False, log=lambda _: None)
    w = m.lookalike.prior_weight()
    assert w != 0.0
    np.testing.assert_allclose(m.audience_prior(np.array([0, 3])),
                               [0.0, w * np.log(4.0)], rtol=1e-6)
    plain = fit_ralm(train, CFG.model_copy(update={"user_epochs": 1, "activity_prior": False}),
                     progress=False, log=lambda _: None)
    assert plain.audience_prior(np.array([7])).tolist() == [0.0]


def test_the_prior_weight_shrinks_with_the_seed_count_when_the_scale_grows() -> None:
    """``seed_count_scale``: logit = τ·n^s·score + γ·log(1 + clicks), so in score units an
    item with n seeds adds γ / (τ·n^s) per log-click."""
    from models.ralm import LookalikeTower

    tower = LookalikeTower(RalmConfig.tiny(activity_prior=True, seed_count_scale=True))
    with torch.no_grad():
        tower.prior.fill_(2.0)
        tower.seed_scale.fill_(0.5)
        tower.tau.fill_(4.0)
    assert tower.prior_weight(9.0) == pytest.approx(2.0 / (4.0 * 3.0))
    assert tower.prior_weight(1.0) == pytest.approx(0.5)
    plain = LookalikeTower(RalmConfig.tiny(activity_prior=True))
    with torch.no_grad():
        plain.prior.fill_(2.0)
        plain.tau.fill_(4.0)
    assert plain.prior_weight(9.0) == plain.prior_weight(1.0) == pytest.approx(0.5)
