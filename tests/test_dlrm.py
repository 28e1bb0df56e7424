"""DLRM and its baselines: forward math by hand, FM's O(kn) form, training on real ml-100k."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.config import default_cache_dir
from engine.data import Dataset, fetch_ml100k
from models.ctr_baselines import FactorizationMachine, count_scores, fm_interaction
from models.ctr_data import build_ctr_data
from models.ctr_train import build_model, ctr_metrics, evaluate_ctr, fit, load_ctr, save_ctr
from models.dlrm import DLRM, DLRMConfig, InteractionArch

SIZES = {"user": 4, "item": 5, "genre": 4}


def test_interaction_is_the_upper_triangle_without_self_terms() -> None:
    dense = torch.tensor([[1.0, 0.0]])
    sparse = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    # vectors t0 = (1, 0), t1 = (0, 1), t2 = (2, 3): <t0,t1> = 0, <t0,t2> = 2, <t1,t2> = 3
    out = InteractionArch(3)(dense, sparse)
    assert out.tolist() == [[1.0, 0.0, 0.0, 2.0, 3.0]]
    assert InteractionArch.output_size(3, 2) == 5


def test_interaction_itself_adds_the_diagonal() -> None:
    dense = torch.tensor([[1.0, 0.0]])
    sparse = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    # pairs i <= j in row order: <t0,t0> = 1, <t0,t1> = 0, <t0,t2> = 2, <t1,t1> = 1,
    # <t1,t2> = 3, <t2,t2> = 13
    out = InteractionArch(3, itself=True)(dense, sparse)
    assert out.tolist() == [[1.0, 0.0, 1.0, 0.0, 2.0, 1.0, 3.0, 13.0]]
    assert InteractionArch.output_size(3, 2, itself=True) == 8
    model = DLRM(SIZES, n_dense=3, config=DLRMConfig(embed_dim=2, interaction_itself=True))
    assert model.over.mlp[0].in_features == 2 + 10  # F = 4 vectors: 4 * 5 / 2 dots


def test_reference_init_and_sizes_from_strings() -> None:
    torch.manual_seed(0)
    sizes = {"user": 10_000, "item": 5, "genre": 4}
    model = DLRM(sizes, n_dense=3, config=DLRMConfig(embed_dim=64, init="reference",
                                                     top="128, 1"))
    user = model.sparse_arch.tables[0].weight.detach()
    assert user[0].abs().max() == 0 and user.abs().max() <= 0.01  # U(±1/sqrt(10,000))
    first = model.over.mlp[0].weight.detach()  # fan_in 64 + 6, fan_out 128
    assert abs(float(first.std()) - (2 / (70 + 128)) ** 0.5) < 0.01
    assert DLRMConfig(top="[64, 32]", bottom="").top == [64, 32]
    assert DLRMConfig(bottom="").bottom == []


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _numpy_dlrm(w: dict[str, np.ndarray], sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> list[float]:
    """The plain DLRM's logits (bottom [3], top [4], two sparse fields) in numpy."""
    expected = []
    for b in range(2):
        x = dense[b].numpy().astype(np.float64)
        h = _relu(w["dense_arch.mlp.0.weight"] @ x + w["dense_arch.mlp.0.bias"])
        d = _relu(w["dense_arch.mlp.2.weight"] @ h + w["dense_arch.mlp.2.bias"])
        u = w["sparse_arch.tables.0.weight"][sparse[b, 0]]
        i = w["sparse_arch.tables.1.weight"][sparse[b, 1]]
        g_ids = [g for g in genres[b].tolist() if g]
        g = w["sparse_arch.genres.weight"][g_ids].mean(axis=0)
        vecs = [d, u, i, g]
        dots = [vecs[p] @ vecs[q] for p in range(4) for q in range(p + 1, 4)]
        z = np.concatenate([d, dots])
        h = _relu(w["over.mlp.0.weight"] @ z + w["over.mlp.0.bias"])
        expected.append((w["over.mlp.2.weight"] @ h + w["over.mlp.2.bias"])[0])
    return expected


SPARSE = torch.tensor([[1, 2], [3, 0]])  # row 2: item unknown (the zero row)
GENRES = torch.tensor([[1, 3, 0], [2, 0, 0]])  # 0 = padding
DENSE = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]])


def test_dlrm_forward_matches_numpy() -> None:
    torch.manual_seed(0)
    model = DLRM(SIZES, n_dense=3, config=DLRMConfig(embed_dim=2, bottom=[3], top=[4]))
    got = model(SPARSE, GENRES, DENSE).detach().numpy()
    w = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    assert np.allclose(got, _numpy_dlrm(w, SPARSE, GENRES, DENSE), atol=1e-5)
    assert np.allclose(w["sparse_arch.tables.1.weight"][0], 0)  # unknown item: zero vector
    assert model.first_order is None and not any("first_order" in k for k in w)


def test_first_order_term_adds_per_value_biases_and_a_dense_linear_term() -> None:
    config = {"embed_dim": 2, "bottom": [3], "top": [4]}
    torch.manual_seed(0)
    plain = DLRM(SIZES, n_dense=3, config=DLRMConfig(**config))
    torch.manual_seed(0)
    model = DLRM(SIZES, n_dense=3, config=DLRMConfig(**config, first_order=True))
    state = model.state_dict()
    for k, v in plain.state_dict().items():  # built last: the DLRM weights are unchanged
        assert torch.equal(state[k], v), k
    fo = model.first_order
    assert fo is not None
    assert all(float(p.detach().abs().sum()) == 0 for p in fo.parameters())  # starts as plain DLRM
    assert torch.equal(model(SPARSE, GENRES, DENSE), plain(SPARSE, GENRES, DENSE))
    with torch.no_grad():  # hand-made biases; row 0 (unknown / padding) stays 0
        fo.weights[0].weight[:, 0] = torch.tensor([0.0, 0.5, -1.0, 2.0])  # user
        fo.weights[1].weight[:, 0] = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])  # item
        fo.genres.weight[:, 0] = torch.tensor([0.0, 1.0, -2.0, 4.0])
        fo.dense.weight[0] = torch.tensor([1.0, 2.0, -1.0])
    got = model(SPARSE, GENRES, DENSE).detach().numpy()
    w = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    # row 1: user 1 (0.5) + item 2 (0.2) + mean(genre 1, genre 3) = 2.5 + dense 0.5 - 2 - 2
    # row 2: user 3 (2.0) + item unknown (0) + genre 2 (-2.0) + dense 0 + 2 + 0.5
    first = np.array([0.5 + 0.2 + 2.5 + (0.5 - 2.0 - 2.0), 2.0 + 0.0 - 2.0 + (0.0 + 2.0 + 0.5)])
    assert np.allclose(got, np.array(_numpy_dlrm(w, SPARSE, GENRES, DENSE)) + first, atol=1e-5)
    assert "first_order.dense.bias" not in w  # the top MLP's bias is the only intercept


def test_fm_ok_n_formula_equals_the_naive_pairwise_sum() -> None:
    v = torch.randn(7, 5, 3, dtype=torch.float64)
    naive = torch.stack([sum(v[b, i] @ v[b, j] for i in range(5) for j in range(i + 1, 5))
                         for b in range(7)])
    assert torch.allclose(fm_interaction(v), naive)


def test_fm_forward_is_linear_plus_pairwise() -> None:
    torch.manual_seed(1)
    fm = FactorizationMachine(SIZES, n_dense=2)
    sparse, genres = torch.tensor([[1, 4]]), torch.tensor([[1, 2, 0]])
    dense = torch.tensor([[0.3, -2.0]])
    with torch.no_grad():
        for p in fm.linear.parameters():
            p.normal_()
    vecs = [fm.factors[0].weight[1], fm.factors[1].weight[4],
            fm.genres.weight[[1, 2]].mean(0), 0.3 * fm.dense[0], -2.0 * fm.dense[1]]
    pairs = sum(vecs[i] @ vecs[j] for i in range(5) for j in range(i + 1, 5))
    lin = fm.linear
    linear = (lin.dense.bias + lin.dense.weight[0] @ dense[0] + lin.weights[0].weight[1]
              + lin.weights[1].weight[4] + lin.genres.weight[[1, 2]].mean(0))
    assert torch.allclose(fm(sparse, genres, dense), (linear + pairs).reshape(1), atol=1e-5)


@pytest.fixture(scope="module")
def ctx_data(ml100k: Dataset):
    return build_ctr_data(ml100k, "ctx", seed=0)


@pytest.mark.parametrize("name", ["dlrm", "fm", "lr"])
def test_training_lowers_the_loss_and_beats_item_counts(ctx_data, name: str) -> None:
    model = build_model(name, ctx_data, seed=0)
    result = fit(model, ctx_data, seed=0, epochs=4, lr=1e-2 if name == "lr" else 3e-3,
                 progress=False)
    losses = [r.loss for r in result.history]
    assert losses[-1] < losses[0]
    test = evaluate_ctr(model, ctx_data.test)
    for kind in ("popularity", "item-mean"):
        floor = ctr_metrics(ctx_data.test.label, count_scores(ctx_data.train, ctx_data.test, kind))
        assert test["auc"] > floor["auc"] + 0.01, (kind, test, floor)
    assert test["logloss"] < 0.66  # a constant at the base rate scores 0.687


def test_same_seed_same_fit_and_checkpoint_round_trip(ctx_data, tmp_path) -> None:
    runs = []
    for seed in (0, 0, 1):
        model = build_model("dlrm", ctx_data, {"embed_dim": 4}, seed=seed)
        runs.append((fit(model, ctx_data, seed=seed, epochs=1, progress=False).history[0].loss,
                     model))
    assert runs[0][0] == runs[1][0] != runs[2][0]
    path = save_ctr(tmp_path / "m.pt", "dlrm", runs[0][1], ctx_data, {"note": 1})
    name, loaded, payload = load_ctr(path)
    assert name == "dlrm" and payload["data"]["protocol"] == "ctx"
    assert evaluate_ctr(loaded, ctx_data.valid) == evaluate_ctr(runs[0][1], ctx_data.valid)


def test_lr_decay_scales_the_rate_after_every_epoch(ctx_data) -> None:
    """With the rate multiplied by ~0 after epoch 1, epochs 2 and 3 cannot move the model:
    the same validation AUC three times; at a constant rate it moves."""
    small = replace(ctx_data, train=ctx_data.train.take(np.arange(10_000)),
                    valid=ctx_data.valid.take(np.arange(3_000)))
    aucs = {}
    for decay in (1e-9, 1.0):
        model = build_model("lr", small, seed=0)
        result = fit(model, small, seed=0, epochs=3, lr=1e-2, lr_decay=decay, patience=3,
                     progress=False)
        aucs[decay] = [r.valid["auc"] for r in result.history]
    frozen, moving = aucs[1e-9], aucs[1.0]
    assert len(frozen) == 3 and max(frozen) - min(frozen) < 1e-6, frozen
    assert frozen[0] == pytest.approx(moving[0]) and abs(moving[2] - moving[0]) > 1e-4, moving


def test_first_order_dlrm_trains_and_round_trips_hashed(ml100k: Dataset, tmp_path) -> None:
    data = build_ctr_data(ml100k, "ctx", seed=0, hash_buckets=64)
    small = replace(data, train=data.train.take(np.arange(20_000)),
                    valid=data.valid.take(np.arange(4_000)))
    model = build_model("dlrm", small, {"embed_dim": 4, "first_order": True}, seed=0)
    result = fit(model, small, seed=0, epochs=3, lr=1e-2, patience=3, progress=False)
    losses = [r.loss for r in result.history]
    assert losses[-1] < losses[0], losses
    fo = model.first_order
    assert fo.weights[0].weight.shape == (65, 1) and fo.genres.weight.shape == (65, 1)
    assert float(fo.weights[1].weight[1:].detach().abs().max()) > 0  # the item biases learned
    assert all(float(t.weight.detach()[0, 0]) == 0.0 for t in [*fo.weights, fo.genres])  # zero rows
    path = save_ctr(tmp_path / "fo.pt", "dlrm", model, small, {})
    name, loaded, payload = load_ctr(path)
    assert payload["config"]["first_order"] is True and loaded.first_order is not None
    assert evaluate_ctr(loaded, small.valid) == evaluate_ctr(model, small.valid)


def test_user_dropout_teaches_the_model_new_users(ml100k: Dataset) -> None:
    # Time split: most later rows come from users who joined after the cut (user id 0,
    # activity count 0), a combination the training rows never show without dropout.
    data = build_ctr_data(ml100k, "time")
    new = data.valid.take(np.flatnonzero(data.valid.sparse[:, 0] == 0))
    loss = {}
    for dropout in (0.0, 0.5):
        model = build_model("lr", data, seed=0)
        fit(model, data, seed=0, epochs=3, lr=1e-2, user_dropout=dropout, progress=False)
        loss[dropout] = evaluate_ctr(model, new)["logloss"]
        assert float(model.linear.weights[0].weight[0].detach()) == 0.0  # the fixed zero row
    assert loss[0.5] < loss[0.0] - 0.01, loss


def test_cli_trains_and_evaluates_dlrm(tmp_path) -> None:
    from lookalike.cli import app

    folder = fetch_ml100k(default_cache_dir() / "data", quiet=True)
    runner = CliRunner()
    common = ["--dataset", str(folder), "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r")]
    res = runner.invoke(app, ["train", "dlrm", "--protocol", "ctx", "--epochs", "1",
                              "--hash-buckets", "200", "--set", "embed_dim=4", *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "dlrm", *common])
    assert res.exit_code == 0, res.output
    assert "test auc" in res.output
    report = json.loads((tmp_path / "r" / "evaluate-ctx.json").read_text())
    assert report["data"]["hash_buckets"] == 200 and 0.5 < report["test"]["auc"] < 1
    assert (tmp_path / "r" / "learning-curve.png").stat().st_size > 0
    assert (tmp_path / "r" / "train.json").is_file()
