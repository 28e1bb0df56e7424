"""Mult-VAE / Mult-DAE: forward math by hand, the loss terms, the beta schedule, corruption."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.mult_vae import (
    Clicks,
    MultDAE,
    MultVAE,
    SparseInput,
    beta_at,
    corrupted_input,
    gaussian_kl,
    multinomial_nll,
)
from models.splits import random_split
from tests.test_model_conformance import tiny_dataset


def _set(layer: torch.nn.Module, weight: list, bias: list) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_dae_forward_by_hand():
    """[I=3 -> 2 -> 3]: logits = W2 tanh(W1 x / ||x|| + b1) + b2 on the user's 0/1 row."""
    model = MultDAE(latent=2, hidden=0, dropout=0.5)
    model.prepare(np.array([7, 8, 9]))
    net = model.module_
    w1 = np.array([[0.5, -1.0], [2.0, 0.3], [-0.4, 0.8]])  # (I, 2): SparseInput's layout
    b1 = np.array([0.1, -0.2])
    w2 = np.array([[1.0, 0.0], [0.5, -0.5], [-1.0, 2.0]])  # (I, 2): nn.Linear(2, I)
    b2 = np.array([0.0, 0.1, -0.1])
    _set(net.input, w1.tolist(), b1.tolist())
    _set(net.decoder[0], w2.tolist(), b2.tolist())
    x = np.array([1.0, 0.0, 1.0]) / math.sqrt(2)
    expected = w2 @ np.tanh(x @ w1 + b1) + b2
    got = model.score_many([np.array([2, 0, 2])])  # a repeated click counts once
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6)


def test_vae_scores_with_the_mean_of_the_code():
    """Scoring uses z = mu (no sampling): logits = W_d tanh(W_h mu + b_h) + b_d."""
    torch.manual_seed(0)
    model = MultVAE(hidden=3, latent=2)
    model.prepare(np.arange(4))
    net = model.module_
    p = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    x = np.array([0.0, 1.0, 1.0, 1.0]) / math.sqrt(3)
    h = np.tanh(x @ p["input.weight"] + p["input.bias"])
    mu = (p["encoder.0.weight"] @ h + p["encoder.0.bias"])[:2]
    z = np.tanh(p["decoder.0.weight"] @ mu + p["decoder.0.bias"])
    expected = p["decoder.1.weight"] @ z + p["decoder.1.bias"]
    a = model.score_many([np.array([1, 2, 3])])
    np.testing.assert_allclose(a[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(a, model.score_many([np.array([1, 2, 3])]))  # deterministic


def test_loss_terms_by_hand():
    logits = torch.tensor([[0.0, math.log(2), math.log(3)]])  # softmax = [1, 2, 3] / 6
    clicks = Clicks.of([np.array([1, 2])])
    assert multinomial_nll(logits, clicks).item() == pytest.approx(
        -(math.log(2 / 6) + math.log(3 / 6)), rel=1e-6)
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * sum(sigma^2 + mu^2 - 1 - log sigma^2)
    assert gaussian_kl(mu, logvar).item() == pytest.approx(
        0.5 * ((1 + 1 - 1 - 0) + (2 + 0 - 1 - math.log(2))), rel=1e-6)


def test_beta_anneals_linearly_to_the_cap():
    assert beta_at(0, 0.2, 1000) == 0.0
    assert beta_at(100, 0.2, 1000) == pytest.approx(0.1)
    assert beta_at(200, 0.2, 1000) == pytest.approx(0.2)
    assert beta_at(10_000, 0.2, 1000) == pytest.approx(0.2)
    assert beta_at(1000, 1.0, 1000) == pytest.approx(1.0)
    # the model advances one step per gradient update, starting from 0 at each fit
    model = MultVAE(hidden=8, latent=4, batch_size=10, total_anneal_steps=20, anneal_cap=0.5)
    split = random_split(tiny_dataset())
    model.fit(split, epochs=2, progress=False)
    steps = 2 * int(np.ceil(np.sum(split.train.lengths > 0) / 10))
    assert model.step_ == steps and model.beta == pytest.approx(min(0.5, steps / 20))
    model.fit(split, epochs=1, progress=False)
    assert model.step_ == steps // 2


def test_input_dropout_corrupts_in_training_only():
    clicks = Clicks.of([np.arange(400), np.array([3])])
    clean = corrupted_input(clicks, 0.5, training=False)
    np.testing.assert_allclose(clean[:400].numpy(), 1 / 20)  # 1 / sqrt(400)
    assert clean[400].item() == 1.0
    torch.manual_seed(0)
    noisy = corrupted_input(clicks, 0.5, training=True)[:400]
    np.testing.assert_allclose(np.unique(noisy.numpy()), [0.0, 0.1], rtol=1e-6)  # 0 or x 2
    assert 150 < int((noisy == 0).sum()) < 250


def test_sparse_input_equals_a_dense_linear_layer():
    torch.manual_seed(0)
    layer = SparseInput(6, 3)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    histories = [np.array([0, 5]), np.array([], dtype=np.int64), np.array([2, 3, 4])]
    clicks = Clicks.of(histories)
    weights = torch.rand(len(clicks.items))
    dense = torch.zeros(3, 6)
    dense[clicks.rows, clicks.items] = weights
    expected = dense @ layer.weight + layer.bias
    torch.testing.assert_close(layer(clicks, weights), expected)


def test_fold_in_an_unseen_user_and_beat_popularity():
    """A trained VAE ranks the planted next items above the most popular ones."""
    split = random_split(tiny_dataset())
    model = MultVAE(hidden=32, latent=16, batch_size=16, total_anneal_steps=100)
    result = model.fit(split, epochs=10, lr=1e-2, progress=False)
    assert result.history[-1].loss < result.history[0].loss
    from models.evaluator import Protocol, evaluate

    ours = evaluate(model, split.test, Protocol(None, mask_history=True)).mean()["ndcg@10"]
    popularity = np.bincount(split.train.values, minlength=split.n_items).astype(np.float32)
    ranked = np.argsort(-popularity)
    hits = []
    for row in range(len(split.test)):
        seen = set(split.test.history[row].tolist())
        top = [i for i in ranked if i not in seen][:10]
        hits.append(len(set(top) & set(split.test.targets[row].tolist())) > 0)
    pop_hit = float(np.mean(hits))
    ours_hit = evaluate(model, split.test, Protocol(None, mask_history=True)).mean()["hit@10"]
    assert ours > 0.3 and ours_hit > pop_hit
