"""CDAE: the forward pass with the user node by hand, drop-out noise, binary targets."""

from __future__ import annotations

import math

import numpy as np
import torch

from models.cdae import CDAE, dropout_weights
from models.mult_vae import Clicks
from models.splits import random_split
from tests.test_model_conformance import tiny_dataset


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _model() -> CDAE:
    model = CDAE(hidden=2, activation="sigmoid")
    model.prepare(np.arange(3), user_ids=np.array([7, 8]))
    net = model.net
    with torch.no_grad():
        net.encode.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.3], [-0.4, 0.8]]))
        net.encode.bias.copy_(torch.tensor([0.1, -0.2]))
        net.user.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        net.decode.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, -0.5], [-1.0, 2.0]]))
        net.decode.bias.copy_(torch.tensor([0.0, 0.1, -0.1]))
    return model


W = np.array([[0.5, -1.0], [2.0, 0.3], [-0.4, 0.8]])
B = np.array([0.1, -0.2])
V = np.array([[1.0, 0.0], [0.0, -1.0]])
W2 = np.array([[1.0, 0.0], [0.5, -0.5], [-1.0, 2.0]])
B2 = np.array([0.0, 0.1, -0.1])


def test_forward_by_hand_with_the_user_node():
    model = _model()
    y = np.array([1.0, 0.0, 1.0])
    for user, node in ((1, V[1]), (-1, V.mean(0))):  # a table user; anyone else: mean node
        expected = W2 @ sigmoid(y @ W + node + B) + B2
        got = model.score_many([np.array([0, 2])], users=np.array([user]))
        np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6)


def test_loss_is_logistic_on_binary_targets_plus_l2():
    model = _model()
    model.config.corruption = 0.0  # no noise: the loss is deterministic
    model.config.reg = 0.1
    batch = {"users": torch.tensor([0]), "clicks": Clicks.of([np.array([1])])}
    logits = W2 @ sigmoid(np.array([0.0, 1.0, 0.0]) @ W + V[0] + B) + B2
    p = sigmoid(logits)
    bce = -(math.log(p[1]) + math.log(1 - p[0]) + math.log(1 - p[2]))
    l2 = (W ** 2).sum() + (W2 ** 2).sum() + (V[0] ** 2).sum()
    assert abs(model.loss(batch).item() - (bce + 0.05 * l2)) < 1e-5


def test_dropout_noise_keeps_or_scales():
    clicks = Clicks.of([np.arange(1000)])
    assert torch.equal(dropout_weights(clicks, 0.5, training=False), torch.ones(1000))
    torch.manual_seed(0)
    w = dropout_weights(clicks, 0.25, training=True)
    np.testing.assert_allclose(np.unique(w.numpy()), [0.0, 4 / 3], rtol=1e-6)
    assert 200 < int((w == 0).sum()) < 300


def test_learns_and_beats_popularity_on_the_planted_task():
    from models.evaluator import Protocol, evaluate

    split = random_split(tiny_dataset())
    model = CDAE(hidden=16, batch_size=16, corruption=0.2)
    result = model.fit(split, epochs=10, lr=2e-2, progress=False)
    assert result.history[-1].loss < result.history[0].loss
    ours = evaluate(model, split.test, Protocol(None, mask_history=True)).mean()
    popularity = np.bincount(split.train.values, minlength=split.n_items)
    hits = []
    for row in range(len(split.test)):
        seen = set(split.test.history[row].tolist())
        top = [i for i in np.argsort(-popularity, kind="stable") if i not in seen][:10]
        hits.append(bool(set(top) & set(split.test.targets[row].tolist())))
    assert ours["hit@10"] > float(np.mean(hits))
