"""Local Factor Models (models/lfm.py): the forward math by hand, training, inductive users,
and the strong-generalization split it is evaluated on (models/splits.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.evaluator import PROTOCOLS, Protocol, evaluate, protocols_for
from models.lfm import LFM, LFMConfig, min_sum, segment_softmax_pool
from models.mult_vae import Clicks
from models.splits import make_split, strong_generalization, user_sequences
from tests.test_model_conformance import tiny_dataset


def test_min_sum_pooling_by_hand():
    """sum_c min(a_uc, b_ic) on numbers small enough to add up in one's head."""
    a = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]])
    b = torch.tensor([[2.0, 1.0, 1.0], [0.0, 0.0, 4.0], [0.25, 3.0, 0.0]])
    expected = torch.tensor([[1.0 + 0 + 1, 0 + 0 + 2, 0.25 + 0 + 0],
                             [0.5 + 1 + 0, 0 + 0 + 0, 0.25 + 3 + 0]])
    torch.testing.assert_close(min_sum(a, b), expected)
    rng = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 7, generator=rng), torch.rand(4, 7, generator=rng)
    torch.testing.assert_close(min_sum(x, y), torch.minimum(x[:, None], y[None]).sum(-1))


def test_segment_softmax_pool_by_hand():
    """Row 0 has two items, row 1 none, row 2 one; two heads with their own logits."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]])
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0], [7.0, 8.0]])
    rows = torch.tensor([0, 0, 2])
    pooled = segment_softmax_pool(logits, values, rows, 3)
    # head 0: equal weights -> (1 + 3) / 2; head 1: weights 3/4, 1/4 -> 1.5 + 1.5
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [0.0, 0.0], [7.0, 8.0]]))


def test_forward_by_hand():
    """Two clusters, three items, one key dimension: every number written out."""
    model = LFM(clusters=8, key_dim=1, item_bias=True)
    model.prepare(np.array([10, 20, 30]))
    net = model.module_
    e = torch.zeros(3, 8)
    e[:, :2] = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]])
    with torch.no_grad():
        net.items.weight.copy_(e)
        net.pool.keys.weight.copy_(torch.zeros(1, 8))  # keys 0: every head averages
        net.pool.keys.weight[0, 0] = 1.0  # ... except that key = the item's cluster-0 score
        net.pool.queries.zero_()
        net.pool.queries[1, 0] = math.log(2.0)  # head 1 weighs items by 2 ** e_j0
        net.bias.copy_(torch.tensor([0.0, 0.1, -0.2]))
    scores = model.score_many([np.array([0, 1])])[0]
    # user clicked items 0 and 1. head 0: mean(1, 2) = 1.5; head 1: weights 2:4 -> (-1 * 2
    # + 0.5 * 4) / 6 = 0; heads 2..7: 0. ReLU memberships a = (1.5, 0, 0...).
    # b = ReLU(e): (1, 0), (2, 0.5), (0, 3) -> min-sum (1, 1.5, 0) plus the biases.
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.6, -0.2]))


def test_dropout_hides_clicks_from_the_encoder_in_training_only():
    model = LFM(clusters=8, key_dim=4, dropout=0.5)
    model.prepare(np.arange(20))
    clicks = Clicks.of([np.arange(20)])
    net = model.module_
    net.eval()
    assert torch.equal(net(clicks), net(clicks))
    net.train()
    torch.manual_seed(0)
    assert not torch.equal(net(clicks), net(clicks))


def test_config_bounds_the_clusters():
    assert LFMConfig(clusters=8).clusters == 8 and LFMConfig(clusters=2048).clusters == 2048
    for bad in (4, 4096):
        with pytest.raises(ValueError):
            LFMConfig(clusters=bad)


def test_strong_generalization_holds_users_out():
    ds = tiny_dataset()
    split = strong_generalization(ds, heldout=(0.1, 0.2), seed=1)
    seqs = user_sequences(ds)
    held = np.concatenate([split.valid.users, split.test.users])
    assert len(split.valid) == 6 and len(split.test) == 12 and len(set(held)) == 18
    assert np.all(split.train.lengths[held] == 0)
    assert np.all(split.train.lengths[np.setdiff1d(np.arange(len(seqs)), held)] > 0)
    for data in (split.valid, split.test):
        for row, u in enumerate(data.users):
            h, t = data.history[row], data.targets[row]
            assert sorted([*h, *t]) == sorted(seqs[u].tolist())
            assert len(h) == round(0.8 * len(seqs[u]))
    again = make_split(ds, "strong", seed=1)
    np.testing.assert_array_equal(again.test.users, split.test.users)
    assert protocols_for("strong") == ["sg-full"] and PROTOCOLS["sg-full"]["paper"].mask_history


@pytest.fixture(scope="module")
def trained() -> tuple[LFM, list[float], object]:
    split = strong_generalization(tiny_dataset(), heldout=(0.1, 0.2))
    model = LFM(clusters=16, key_dim=8, batch_size=16)
    result = model.fit(split, epochs=15, lr=3e-2, progress=False)
    return model, [r.loss for r in result.history], split


def test_training_lowers_the_loss(trained):
    _, losses, _ = trained
    assert losses[-1] < losses[0] and losses[-1] < min(losses[:3])


def test_beats_popularity_on_held_out_users(trained):
    """Test users never trained: folded in from 80% of their clicks, scored on the rest."""
    model, _, split = trained
    protocol = Protocol(None, mask_history=True)
    ours = evaluate(model, split.test, protocol, ks=(10,)).mean()["ndcg@10"]
    popularity = np.bincount(split.train.values, minlength=split.n_items).astype(np.float32)

    class Popular:  # the same evaluator, a constant score per item
        user_bound = False

        def score_many(self, histories, users=None):
            return torch.from_numpy(np.tile(popularity, (len(histories), 1)))

    pop = evaluate(Popular(), split.test, protocol, ks=(10,)).mean()["ndcg@10"]  # type: ignore[arg-type]
    assert ours > pop + 0.1


def test_unseen_user_is_scored_without_retraining(trained):
    model, _, _ = trained
    weights = {k: v.clone() for k, v in model.module_.state_dict().items()}
    scores = model.score([[503, 504, 505], []])
    assert scores.shape == (2, 30) and np.isfinite(scores).all()
    assert 506 in model.recommend([503, 504, 505], k=5)  # the planted next click
    # no clicks: zero membership, so the ranking is the item bias alone
    np.testing.assert_allclose(scores[1], model.module_.bias.detach().numpy(), atol=1e-5)
    assert all(torch.equal(v, model.module_.state_dict()[k]) for k, v in weights.items())


def test_comparison_runner_parses_runs_and_tabulates():
    from lookalike.experiments.lfm_compare import parse_run, report

    assert parse_run("lfm:clusters=128,batch_size=32") == (
        "lfm", {"clusters": "128", "batch_size": "32"})
    assert parse_run("multvae") == ("multvae", {})
    row = {"model": "lfm", "settings": {"clusters": "8"}, "trainer": {}, "seed": 0,
           "params": 15650, "valid_ndcg@20": 0.3, "test_recall@20": 0.25,
           "test_ndcg@20": 0.33, "epochs": 9, "best_epoch": 7, "seconds_per_epoch": 0.5,
           "train_seconds": 5.0}
    table = report([row, {**row, "seed": 1, "test_ndcg@20": 0.35}])
    assert "| lfm:clusters=8 | 0,1 | 15,650 |" in table and "0.3400 ± 0.0141" in table
