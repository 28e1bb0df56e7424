"""NGCF / LightGCN: the normalised adjacency, one propagation by hand, fold-in, BPR data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.ngcf import (
    NGCF,
    LightGCN,
    SpMM,
    SymmetricSpMM,
    node_dropout_mask,
    normalized_adjacency,
    row_normalized_adjacency,
)
from models.splits import Ragged

# users 0, 1; items 0, 1, 2; user 0 clicked item 0 twice
USERS = np.array([0, 0, 1, 1, 0])
ITEMS = np.array([0, 1, 1, 2, 0])
TRAIN = Ragged.from_rows([np.array([0, 1, 0]), np.array([1, 2])])


def hand_laplacian() -> np.ndarray:
    du, di = [2, 2], [1, 2, 1]
    lap = np.zeros((5, 5))
    for u, i in {(0, 0), (0, 1), (1, 1), (1, 2)}:
        lap[u, 2 + i] = lap[2 + i, u] = 1 / math.sqrt(du[u] * di[i])
    return lap


def test_normalized_adjacency_entries_are_one_over_sqrt_degrees():
    lap = normalized_adjacency(USERS, ITEMS, 2, 3).to_dense().numpy()
    np.testing.assert_allclose(lap, hand_laplacian(), rtol=1e-6)
    assert lap[0, 2] == np.float32(1 / math.sqrt(2)) and lap[0, 3] == 0.5


def hand_row_normalised() -> np.ndarray:
    """D~^-1 (A + I): row n is 1 / (|N_n| + 1) at n and at each neighbour."""
    a = np.eye(5)
    for u, i in {(0, 0), (0, 1), (1, 1), (1, 2)}:
        a[u, 2 + i] = a[2 + i, u] = 1
    return a / a.sum(1, keepdims=True)


def test_row_normalized_adjacency_is_the_authors_norm_adj():
    m = row_normalized_adjacency(USERS, ITEMS, 2, 3).to_dense().numpy()
    np.testing.assert_allclose(m, hand_row_normalised(), rtol=1e-6)
    assert m[0, 0] == m[0, 2] == np.float32(1 / 3) and m[2, 2] == m[2, 0] == 0.5


def _fitted(cls: type, **cfg) -> NGCF | LightGCN:
    model = cls(embedding=3, layers=2, **cfg)
    torch.manual_seed(0)
    model.prepare(np.arange(3), user_ids=np.array([10, 20]))
    next(model.batches(TRAIN, np.random.default_rng(0)))  # sets the graph
    with torch.no_grad():
        for p in model.module_.parameters():
            torch.nn.init.normal_(p)
    return model


def _p(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in model.module_.state_dict().items()}


@pytest.mark.parametrize("normalised", [False, True])
def test_ngcf_propagation_by_hand(normalised: bool):
    """The authors' form feeds a layer's raw output to the next; RecBole's its L2 norm."""
    model = _fitted(NGCF, message_dropout=0.5, node_dropout=0.5,
                    normalised_messages=normalised)
    p = _p(model)
    lap = hand_laplacian()
    e = np.concatenate([p["user.weight"], p["item.weight"]])
    layers = [e]
    for k in range(2):
        side = lap @ e
        x = ((e + side) @ p[f"w1.{k}.weight"].T + p[f"w1.{k}.bias"]
             + (side * e) @ p[f"w2.{k}.weight"].T + p[f"w2.{k}.bias"])
        e = np.where(x > 0, x, 0.2 * x)  # LeakyReLU(0.2)
        if normalised:
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
        layers.append(e)
    final = np.concatenate([layers[0]] + [x / np.linalg.norm(x, axis=1, keepdims=True)
                                          for x in layers[1:]], axis=1)
    expected = final[:2] @ final[2:].T
    got = model.score_many([TRAIN[0], TRAIN[1]], users=np.array([0, 1]))  # eval: no dropout
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ngcf_code_form_by_hand():
    """The authors' TensorFlow form: side = D~^-1 (A + I) E, one LeakyReLU per term."""
    model = _fitted(NGCF, message_dropout=0.5, form="code")
    p = _p(model)
    m = hand_row_normalised()
    e = np.concatenate([p["user.weight"], p["item.weight"]])
    layers = [e]

    def leaky(x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, x, 0.2 * x)
    for k in range(2):
        side = m @ e
        e = (leaky(side @ p[f"w1.{k}.weight"].T + p[f"w1.{k}.bias"])
             + leaky((side * e) @ p[f"w2.{k}.weight"].T + p[f"w2.{k}.bias"]))
        layers.append(e)
    final = np.concatenate([layers[0]] + [x / np.linalg.norm(x, axis=1, keepdims=True)
                                          for x in layers[1:]], axis=1)
    got = model.score_many([TRAIN[0], TRAIN[1]], users=np.array([0, 1]))
    np.testing.assert_allclose(got.numpy(), final[:2] @ final[2:].T, rtol=1e-5, atol=1e-6)


def test_ngcf_code_form_initialises_biases_like_weights():
    torch.manual_seed(0)
    model = NGCF(embedding=16, layers=1, form="code")
    model.prepare(np.arange(3), user_ids=np.array([10, 20]))
    bias = model.module_.w1[0].bias
    assert bias.abs().max() <= math.sqrt(6 / 17) and bias.abs().min() > 0  # Xavier (1, 16)
    paper = NGCF(embedding=16, layers=1)
    paper.prepare(np.arange(3), user_ids=np.array([10, 20]))
    assert torch.count_nonzero(paper.module_.w1[0].bias) == 0


def test_lightgcn_propagation_by_hand():
    model = _fitted(LightGCN)
    p = _p(model)
    lap = hand_laplacian()
    e0 = np.concatenate([p["user.weight"], p["item.weight"]])
    e1 = lap @ e0
    e2 = lap @ e1
    final = (e0 + e1 + e2) / 3
    got = model.score_many([TRAIN[0], TRAIN[1]], users=np.array([0, 1]))
    np.testing.assert_allclose(got.numpy(), final[:2] @ final[2:].T, rtol=1e-5, atol=1e-6)


def test_fold_in_follows_the_graph_rule():
    """A new user whose clicks equal a training user's, and whose layer 0 (their items'
    mean) equals that user's row, gets that user's scores exactly."""
    for cls, cfg in ((LightGCN, {}), (NGCF, {"message_dropout": 0.0}),
                     (NGCF, {"message_dropout": 0.0, "form": "code"})):
        model = _fitted(cls, **cfg)
        net = model.module_
        with torch.no_grad():
            net.user.weight[1] = net.item.weight[[1, 2]].mean(0)
        known = model.score_many([TRAIN[1]], users=np.array([1]))
        folded = model.score_many([TRAIN[1]])
        torch.testing.assert_close(folded, known, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(model.score_many([np.array([], dtype=np.int64)])).all()


def test_bpr_triples_node_dropout_and_the_sparse_product():
    model = _fitted(LightGCN, batch_size=100)
    batch = next(model.batches(TRAIN, np.random.default_rng(1)))
    assert len(batch["users"]) == 5
    for u, i, j in zip(*(batch[k].tolist() for k in ("users", "pos", "neg")), strict=True):
        assert i in TRAIN[u].tolist() and j not in TRAIN[u].tolist()
    torch.manual_seed(0)
    mask = node_dropout_mask(1000, 0.25)
    np.testing.assert_allclose(np.unique(mask.numpy()), [0.0, 4 / 3], rtol=1e-6)
    # a dropped node sends nothing: L diag(mask) E, and the sparse product's gradient
    lap = torch.tensor(hand_laplacian(), dtype=torch.float32)
    adj = normalized_adjacency(USERS, ITEMS, 2, 3).to_sparse_csr()
    e = torch.randn(5, 2, requires_grad=True)
    m = torch.tensor([[1.0], [0.0], [2.0], [2.0], [0.0]])
    out = SymmetricSpMM.apply(e * m, adj)
    torch.testing.assert_close(out, lap @ torch.diag(m[:, 0]) @ e)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), e)
    e2 = e.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((lap @ (e2 * m)).pow(2).sum(), e2)
    torch.testing.assert_close(grad, expected)
    # not symmetric: the gradient goes through the given transpose
    row = row_normalized_adjacency(USERS, ITEMS, 2, 3)
    mt = torch.tensor(hand_row_normalised(), dtype=torch.float32)
    out = SpMM.apply(e, row.to_sparse_csr(), row.t().coalesce().to_sparse_csr())
    torch.testing.assert_close(out, mt @ e)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), e)
    (expected,) = torch.autograd.grad((mt @ e2).pow(2).sum(), e2)
    torch.testing.assert_close(grad, expected)


def test_checkpoint_keeps_the_graph(tmp_path):
    from models.recommender import Recommender

    model = _fitted(NGCF)
    again = Recommender.load(model.save(tmp_path / "g.pt"))
    assert torch.equal(again.module_.edges, model.module_.edges)
    assert torch.equal(again.score_many([TRAIN[0]], users=np.array([0])),
                       model.score_many([TRAIN[0]], users=np.array([0])))
