"""The cold-item audience-expansion protocol (lookalike/experiments/audience_expansion.py)
on ml-100k."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.experiments.audience_expansion import (
    MIN_RATERS,
    ActivityScorer,
    Fold,
    ItemKnnScorer,
    RandomScorer,
    Results,
    SeedMeanScorer,
    Task,
    audience_view,
    evaluate_fold,
    make_folds,
    report,
    user_view,
)


@pytest.fixture(scope="module")
def folds(ml100k):
    return make_folds(ml100k, n_folds=5, seed=0)


def test_a_folds_items_are_new_to_every_model(ml100k, folds):
    """Folds are disjoint and cover the items with >= 30 raters; a fold's items leave
    training and every user's history; raters come in order of their first click."""
    items = np.concatenate([f.items for f in folds])
    assert len(np.unique(items)) == len(items)
    n_raters = np.array([len(np.unique(ml100k.user[ml100k.item == i])) for i in
                         range(len(ml100k.items.ids))])
    assert set(items.tolist()) == set(np.flatnonzero(n_raters >= MIN_RATERS).tolist())
    f = folds[0]
    assert not np.isin(f.train.item, f.items).any()
    assert len(f.train) == int((~np.isin(ml100k.item, f.items)).sum())
    for j in range(3):
        assert np.all(np.diff(f.rated_at[j]) >= 0) and len(np.unique(f.raters[j])) == len(
            f.raters[j]) >= MIN_RATERS


def test_a_task_seeds_the_first_raters_and_keeps_the_rest_as_positives(folds):
    f = folds[1]
    t = f.task(50)
    assert len(t.items) <= len(f.items)  # items with <= 50 raters have no positive at N=50
    j = int(np.flatnonzero(f.items == t.items[0])[0])
    np.testing.assert_array_equal(t.seeds[0], f.raters[j][:50])
    np.testing.assert_array_equal(t.positives[0], f.raters[j][50:])
    assert all(len(p) > 0 for p in t.positives)


def test_metrics_by_hand():
    """Two items, five users: the pool leaves the seeds out; eq. 12's denominator."""
    fold = Fold(0, np.array([7, 8]), None, [], [])  # type: ignore[arg-type]
    task = Task(fold, 1, np.array([7, 8]), [np.array([0]), np.array([4])],
                [np.array([0.0]), np.array([0.0])], [np.array([1, 2]), np.array([3])])
    scores = np.array([[9.0, 5.0, 1.0, 4.0, 3.0],    # item 7: pool 1, 3, 4, 2 -> 1 hit at 2
                       [0.0, 2.0, 1.0, 0.5, 9.0]])   # item 8: pool 1, 2, 3, 0: 3 is third
    a = audience_view(task, scores, k_list=(2,))
    np.testing.assert_allclose(a["prec@2"], [0.5, 0.0])
    np.testing.assert_allclose(a["auc"], [0.5, 1 / 3])
    # users: 1 ranks (7: 5.0, 8: 2.0) and its positive is 7 -> 1; 3 ranks 7 (4.0) over 8
    # (0.5) but its positive is 8 -> 0; 2: 7 (1.0) = 8 (1.0), stable order -> 7, hit -> 1
    assert user_view(task, scores, k=1) == pytest.approx(2 / 3)


def test_baselines_rank_look_alikes_above_chance(folds):
    """On a real fold, the seed mean and item-kNN find positives far above random, and
    more seeds help the seed mean; the report holds every model's table."""
    res = Results((1, 10))
    evaluate_fold(folds[0], {"random": RandomScorer(), "activity": ActivityScorer(),
                             "seed_mean": SeedMeanScorer(), "item_knn": ItemKnnScorer()},
                  res, (1, 10), log=lambda *_: None)
    rand = res.mean_std("random", 10, "prec@10")[0]
    assert res.mean_std("seed_mean", 10, "prec@10")[0] > 3 * rand
    assert res.mean_std("item_knn", 10, "prec@10")[0] > 3 * rand
    assert res.mean_std("seed_mean", 10, "auc")[0] > res.mean_std("seed_mean", 1, "auc")[0]
    assert 0.45 < res.mean_std("random", 10, "auc")[0] < 0.55
    text = report(res)
    assert "| seed_mean |" in text and "audience AUC" in text


@pytest.mark.slow
def test_ralm_scores_are_the_served_score_on_worker_centroids(folds):
    """RALM trained without the fold's items scores a fold item's pool with the serving
    score (``RalmModel.score_user`` plus the audience prior, as ``consumers.audience`` adds it)
    over centroids the worker's clustering makes of the seeds; the family shares one
    training per fold."""
    from engine.clustering import ItemClusters, SeedColumns
    from lookalike.experiments.audience_expansion import scorers
    from models.ralm import RalmConfig
    from models.seed_clusters import window_config

    cfg = RalmConfig.tiny(user_epochs=1, lookalike_epochs=1)
    models = scorers(["ralm", "ralm_average", "tower_seed_mean"], cfg)
    fold = folds[2]
    for m in models.values():
        m.fit(fold)
    shared = models["ralm"].shared  # type: ignore[attr-defined]
    assert all(m.shared is shared for m in models.values())  # type: ignore[attr-defined]
    task = fold.task(5)
    got = {name: m.scores(task) for name, m in models.items()}
    assert all(s.shape == (len(task.items), fold.n_users) and np.isfinite(s).all()
               for s in got.values())
    # item 0 by hand: the worker's state after its 5 seeds, then the served score
    state = ItemClusters(window_config(cfg))
    emb = shared.emb
    s0 = task.seeds[0]
    state.apply_columns(SeedColumns([int(task.items[0])] * 5, list(range(6)), s0,
                                    task.seed_ts[0], emb[s0]))
    st = state.items[int(task.items[0])]
    model = shared.model
    glob = model.item_global(st.centroids[None], st.counts[None])
    prior = model.audience_prior(np.bincount(fold.train.user, minlength=fold.n_users), 5)
    assert prior.std() > 0  # the default model has an activity prior: served audiences add it
    for u in (0, 17, 400):
        want = model.score_user(emb[u], st.centroids[None], st.counts[None], glob)[0] + prior[u]
        assert got["ralm"][0, u] == pytest.approx(float(want), abs=1e-5)


@pytest.mark.slow
def test_default_ralm_finds_cold_item_audiences(folds):
    """The default RALM, trained without a fold's items, ranks their later raters well from
    20 seeds: AUC far from chance (the paper's stage 2 gave 0.52) and prec@10 above the
    most active users and the seed mean of click vectors on the same fold."""
    from lookalike.experiments.audience_expansion import scorers
    from models.ralm import RalmConfig

    fold = folds[0]
    models = scorers(["ralm", "activity", "seed_mean"], RalmConfig())
    res = Results((20,))
    evaluate_fold(fold, models, res, (20,), log=lambda *_: None)
    ralm = res.per_fold["ralm"][20][0]
    assert ralm["auc"] > 0.82, ralm
    for ref in ("activity", "seed_mean"):
        assert ralm["prec@10"] > res.per_fold[ref][20][0]["prec@10"], (ref, res.per_fold)


def test_inner_folds_never_hold_a_folds_test_items(folds):
    """Tuning folds come from each fold's training items: its test items are in none of
    them, and they too are new to the models trained on them."""
    from lookalike.experiments.audience_expansion import inner_folds

    for outer, inner in zip(folds, inner_folds(folds), strict=True):
        assert inner.index == outer.index
        assert not np.isin(inner.items, outer.items).any() and len(inner.items) > 50
        assert not np.isin(inner.train.item, np.r_[inner.items, outer.items]).any()
