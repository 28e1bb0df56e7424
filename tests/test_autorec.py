"""I-AutoRec: forward and loss by hand, RMSE, the ridge fold-in, learning ratings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import Items, Users, build_dataset
from models.autorec import AutoRec
from models.splits import EvalSet, Ragged, random_split
from tests.test_model_conformance import tiny_dataset

# (user, item, rating): two users, three items; item 2 never rated
RATINGS = np.array([[0, 0, 5.0], [1, 0, 3.0], [0, 1, 4.0]])
V = np.array([[0.5, -1.0], [2.0, 0.3]])  # SparseInput rows: one per user (U, k)
MU = np.array([0.1, -0.2])
W = np.array([[1.0, 0.5], [-0.5, 2.0]])  # decoder (U, k)
B = np.array([3.0, 2.5])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _model(**cfg) -> AutoRec:
    model = AutoRec(hidden=2, **cfg)
    model.prepare(np.array([10, 20, 30]), user_ids=np.array([1, 2]))
    net = model.net
    net.set_ratings(RATINGS[:, 0].astype(int), RATINGS[:, 1].astype(int), RATINGS[:, 2])
    with torch.no_grad():
        net.encode.weight.copy_(torch.tensor(V))
        net.encode.bias.copy_(torch.tensor(MU))
        net.decode.weight.copy_(torch.tensor(W))
        net.decode.bias.copy_(torch.tensor(B))
    return model


def hand_codes() -> np.ndarray:
    r = np.zeros((3, 2))  # items x users, observed ratings
    for u, i, x in RATINGS:
        r[int(i), int(u)] = x
    return sigmoid(r @ V + MU)


def test_prediction_is_the_reconstruction_of_the_items_ratings():
    codes = hand_codes()
    expected = (codes @ W.T + B).T  # (U, I): h(r_i)_u
    got = _model().score_many([np.array([0]), np.array([1])], users=np.array([0, 1]))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    pairs = _model().predict(np.array([1, 0]), np.array([0, 2]))
    np.testing.assert_allclose(pairs, [expected[1, 0], expected[0, 2]], rtol=1e-6)


def test_loss_counts_observed_ratings_only():
    model = _model(reg=0.5)
    codes = hand_codes()
    pred = codes @ W.T + B  # (I, U)
    err = (pred[0, 0] - 5) ** 2 + (pred[0, 1] - 3) ** 2 + (pred[1, 0] - 4) ** 2
    l2 = (V ** 2).sum() + (W ** 2).sum()
    # a batch of both rated items is the whole epoch: share = 1
    expected = (err + 0.25 * l2) / 2
    assert model.loss({"items": np.array([0, 1])}).item() == pytest.approx(expected, rel=1e-5)


def test_rmse_of_held_out_ratings():
    model = _model()
    data = EvalSet(np.array([0, 1]), Ragged.from_rows([[0], [0]]),
                   Ragged.from_rows([[1, 2], [1]]), np.array([3.0, 4.0, 2.0], np.float32))
    pred = np.clip(hand_codes() @ W.T + B, 3.0, 5.0)  # clipped to the training scale
    se = [(pred[1, 0] - 3) ** 2, (pred[2, 0] - 4) ** 2, (pred[1, 1] - 2) ** 2]
    assert model.rmse(data) == pytest.approx(np.sqrt(np.mean(se)), rel=1e-5)
    assert model.extra_metrics(data) == {"neg_rmse": pytest.approx(-np.sqrt(np.mean(se)))}


def test_new_user_is_a_ridge_fitted_output_unit():
    model = _model(fold_in_reg=0.3)
    z = np.concatenate([hand_codes(), np.ones((3, 1))], axis=1)
    y = np.array([0.0, 1.0, 1.0])
    sol = np.linalg.solve(z.T @ z + 0.3 * np.eye(3), z.T @ y)
    got = model.score_many([np.array([1, 2])])  # no id: folded in
    np.testing.assert_allclose(got[0].numpy(), z @ sol, rtol=1e-5, atol=1e-6)


def test_learns_ratings_better_than_the_global_mean():
    ds = tiny_dataset()
    rated = build_dataset("rated", ds.users.ids[ds.user], ds.items.ids[ds.item],
                          1.0 + ds.items.ids[ds.item] % 5, ds.ts,
                          Users(ids=np.zeros(0), age=np.zeros(0), gender=[], occupation=[],
                                zip_code=[]),
                          Items(ids=np.zeros(0), title=[], year=np.zeros(0), genres=[]))
    split = random_split(rated)
    model = AutoRec(hidden=16, batch_size=8, reg=0.01)
    result = model.fit(split, epochs=30, lr=2e-2, progress=False)
    assert result.metric == "neg_rmse" and "neg_rmse" in result.history[0].valid
    mean = float(np.mean(split.train_ratings))
    baseline = float(np.sqrt(np.mean((split.test.target_ratings - mean) ** 2)))
    assert model.rmse(split.test) < 0.5 * baseline
    with pytest.raises(ValueError, match="needs a split with ratings"):
        from models.splits import leave_one_out

        AutoRec().fit(leave_one_out(rated), epochs=1, progress=False)


def test_evaluate_command_reports_the_test_rmse(tmp_path, ml100k):
    """`lookalike evaluate autorec` prints and writes AutoRec's own task, the test RMSE,
    beside the ranking metrics (it is a rating predictor first)."""
    import orjson
    from typer.testing import CliRunner

    from engine.config import default_cache_dir
    from lookalike.cli import app

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "data").symlink_to(default_cache_dir() / "data")  # ml100k fetched it there
    runner = CliRunner()
    got = runner.invoke(app, ["train", "autorec", "--epochs", "2", "--cache-dir", str(cache),
                              "--set", "hidden=16"])
    assert got.exit_code == 0, got.output
    got = runner.invoke(app, ["evaluate", "autorec", "--protocol", "ro-full",
                              "--cache-dir", str(cache), "--out", str(tmp_path / "out")])
    assert got.exit_code == 0, got.output
    report = orjson.loads((tmp_path / "out" / "evaluate-ro-full.json").read_bytes())
    rmse = report["own_task"]["rmse"]
    assert f"autorec test rmse {rmse:.4f}" in got.output
    # the checkpoint's own RMSE on the same split (the seed the training run used)
    want = AutoRec.load(report["checkpoint"]).rmse(random_split(ml100k, seed=0).test)
    assert rmse == pytest.approx(want, rel=1e-6) and 0 < rmse < 4
