"""The conformance suite every registered model passes (River's `check_estimator` habit).

A model joins by registering (models/recommender.py); its `_unit_test_params` keep it
small. The data is a tiny planted sequence task: each user clicks consecutive items
(i, i+1, i+2, ... mod N), so a model that learns anything finds the next click.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data import Dataset, Items, Users, build_dataset
from models.evaluator import Protocol, evaluate
from models.popularity import PopularityScores
from models.recommender import NotFittedError, Recommender, get_model, model_names
from models.splits import Split, leave_one_out, random_split
from models.trainer import TrainResult

N_USERS, N_ITEMS = 60, 30


def tiny_dataset(seed: int = 0) -> Dataset:
    """Users clicking runs of consecutive items, ids offset so ids != indices."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(N_USERS):
        n = int(rng.integers(12, 20))
        start = int(rng.integers(N_ITEMS))
        users += [1000 + u] * n
        items += [(start + k) % N_ITEMS + 500 for k in range(n)]
        ts += list(1e9 + u + 100.0 * np.arange(n))
    no_users = Users(ids=np.zeros(0), age=np.zeros(0), gender=[], occupation=[], zip_code=[])
    no_items = Items(ids=np.zeros(0), title=[], year=np.zeros(0), genres=[])
    return build_dataset("tiny", np.array(users), np.array(items), np.ones(len(users)),
                         np.array(ts), no_users, no_items)


def tiny_split(model_cls: type[Recommender]) -> Split:
    ds = tiny_dataset()
    return leave_one_out(ds) if model_cls.split == "loo" else random_split(ds)


def fit(name: str, seed: int = 0) -> tuple[Recommender, TrainResult, Split]:
    cls = get_model(name)
    params = cls._unit_test_params()
    model = cls(**params["config"])
    split = tiny_split(cls)
    result = model.fit(split, seed=seed, progress=False, **params["trainer"])
    return model, result, split


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-identical scores are promised at a fixed thread count: with torch's default
    (one per core) two copies of a model may split a product differently and differ in
    the last bit. The suite alone ran on the default, in the full run after a test that
    set one thread: so it is pinned here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=model_names())
def fitted(request: pytest.FixtureRequest) -> tuple[Recommender, TrainResult, Split]:
    return fit(request.param)


def test_registry_lists_models():
    assert "sasrec" in model_names()
    with pytest.raises(KeyError, match="unknown model"):
        get_model("no-such-model")


def test_loss_goes_down_and_it_learns(fitted):
    model, result, _ = fitted
    losses = [r.loss for r in result.history]
    assert result.epochs >= 2 and losses[-1] < losses[0]
    assert result.best_value > 0.3  # chance is ~10/30 hit, far less NDCG
    assert 1 <= result.best_epoch <= result.epochs
    assert result.seconds_per_epoch > 0


def test_save_load_round_trip_gives_identical_scores(fitted, tmp_path):
    model, _, split = fitted
    path = model.save(tmp_path / "m.pt", metrics={"note": 1})
    for loader in (type(model), Recommender):
        again = loader.load(path)
        assert type(again) is type(model) and again.version_ == model.version_
        assert again.config == model.config
        np.testing.assert_array_equal(again.item_ids_, model.item_ids_)
        histories = split.test.history.rows(range(len(split.test)))
        assert torch.equal(again.score_many(histories), model.score_many(histories))


def test_unseen_user_is_scored_from_their_clicks(fitted):
    model, _, _ = fitted
    clicks = [503, 504, 505]  # external ids; no user id involved
    scores = model.score([clicks, [], [99999]])  # an unknown item id is ignored
    assert scores.shape == (3, N_ITEMS) and np.isfinite(scores).all()
    top = model.recommend(clicks, k=5)
    assert len(top) == 5 and not set(top) & set(clicks)
    assert set(top) <= set(model.item_ids_.tolist())
    assert 506 in model.recommend(clicks, k=10)  # the planted next click


def test_rank_returns_ids_best_first(fitted):
    model, _, _ = fitted
    ranked = model.rank([503, 504], items=[501, 510, 505, 12345])
    assert sorted(i for i, _ in ranked) == [501, 505, 510]
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert len(model.rank([503])) == N_ITEMS


@pytest.mark.parametrize("name", model_names())
def test_deterministic_with_a_seed(name):
    a, ra, split = fit(name, seed=3)
    b, rb, _ = fit(name, seed=3)
    histories = split.test.history.rows(range(len(split.test)))
    assert [r.loss for r in ra.history] == [r.loss for r in rb.history]
    assert torch.equal(a.score_many(histories), b.score_many(histories))
    c, _, _ = fit(name, seed=4)
    assert not torch.equal(a.score_many(histories), c.score_many(histories))


@pytest.mark.parametrize("name", model_names())
def test_unfitted_model_refuses_to_score(name):
    with pytest.raises(NotFittedError):
        get_model(name)().score([[1, 2]])


def test_cli_lists_every_registered_model():
    from lookalike.cli_models import ZOO_MODELS

    assert sorted(ZOO_MODELS) == model_names()


@pytest.mark.parametrize("name", model_names())
def test_cli_train_then_evaluate_writes_reports(name, tmp_path):
    from typer.testing import CliRunner

    from lookalike.cli import app
    from models.evaluator import PROTOCOLS, protocols_for

    ds = tiny_dataset()
    folder = tmp_path / "tiny"
    folder.mkdir()
    rows = zip(ds.users.ids[ds.user], ds.items.ids[ds.item], ds.rating, ds.ts, strict=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{int(r)}\t{int(t)}\n"
                                           for u, i, r, t in rows))
    params = get_model(name)._unit_test_params()
    sets = [a for k, v in params["config"].items() for a in ("--set", f"{k}={v}")]
    common = ["--dataset", str(folder), "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "out")]
    runner = CliRunner()
    res = runner.invoke(app, ["train", name, "--epochs", "2", *sets, *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", name, "--protocol", "all", "-k", "10", *common])
    assert res.exit_code == 0, res.output
    names = {p.name for p in (tmp_path / "out").iterdir()}
    protocols = protocols_for(get_model(name).split)  # loo-full, loo-uni100 | ro-full
    assert {"train.json", "learning-curve.png", *(f"evaluate-{p}.json" for p in protocols)
            } <= names
    report = (tmp_path / "out" / f"evaluate-{protocols[0]}.json").read_text()
    assert set(json.loads(report)["variants"]) == set(PROTOCOLS[protocols[0]])  # recbole|paper
    assert '"ci95"' in report


@pytest.mark.parametrize("name", model_names())
def test_early_stopping_restores_the_best_epoch(name, tmp_path, monkeypatch):
    import models.trainer as trainer
    from models.evaluator import EvalResult, Protocol

    values = iter([0.1, 0.3, 0.2, 0.25, 0.2, 0.9])  # best at epoch 2, patience 3

    def fake_evaluate(*args, **kwargs):
        v = next(values)
        return EvalResult(Protocol(), np.zeros(1), {"ndcg@10": np.array([v])})

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    cls = get_model(name)
    params = cls._unit_test_params()
    model = cls(**params["config"])
    result = model.fit(tiny_split(cls), progress=False, epochs=20, patience=3,
                       checkpoint=tmp_path / "best.pt",
                       **{k: v for k, v in params["trainer"].items() if k != "epochs"})
    assert (result.stopped, result.epochs, result.best_epoch) == ("patience", 5, 2)
    best = cls.load(tmp_path / "best.pt")
    histories = [np.arange(5), np.arange(3, 9)]
    assert torch.equal(best.score_many(histories), model.score_many(histories))


@pytest.mark.parametrize("name", model_names())
def test_budget_and_metric_checks(name):
    cls = get_model(name)
    params = cls._unit_test_params()
    split = tiny_split(cls)
    result = cls(**params["config"]).fit(split, progress=False, epochs=50, max_seconds=1e-3)
    assert (result.stopped, result.epochs) == ("budget", 1)
    with pytest.raises(ValueError, match="unknown validation metric"):
        cls(**params["config"]).fit(split, progress=False, epochs=1, metric="auc")


def test_splits_the_suite_relies_on():
    from models.splits import user_sequences

    ds = tiny_dataset()
    seqs = user_sequences(ds)
    loo = leave_one_out(ds)
    for row, u in enumerate(loo.test.users):
        s = seqs[u]
        assert loo.test.targets[row].tolist() == [s[-1]]
        assert loo.valid.targets[row].tolist() == [s[-2]]
        np.testing.assert_array_equal(loo.test.history[row], s[:-1])
        np.testing.assert_array_equal(loo.train[u], s[:-2])
    rnd = random_split(ds, seed=1)
    for row, u in enumerate(rnd.test.users):
        parts = [rnd.train[u], rnd.test.targets[row]]
        valid_row = np.flatnonzero(rnd.valid.users == u)
        if len(valid_row):
            parts.append(rnd.valid.targets[valid_row[0]])
        assert sorted(np.concatenate(parts).tolist()) == sorted(seqs[u].tolist())
        assert len(rnd.test.history[row]) == len(seqs[u]) - len(rnd.test.targets[row])
    again = random_split(ds, seed=1)
    np.testing.assert_array_equal(again.train.values, rnd.train.values)


def test_beats_popularity_on_the_held_out_test_users(fitted):
    model, _, split = fitted
    protocol = Protocol(None, mask_history=True)  # full ranking, seen items left out
    popularity = PopularityScores(split.train, len(split.item_ids))
    ours = evaluate(model, split.test, protocol).mean()["ndcg@10"]
    floor = evaluate(popularity, split.test, protocol).mean()["ndcg@10"]
    assert ours > floor + 0.1, (ours, floor)
