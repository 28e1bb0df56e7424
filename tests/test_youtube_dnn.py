"""YouTube DNN (models/youtube_dnn.py): the forward math by hand, training, popularity as
the floor, ANN against exact search, unseen users, profiles, and the weighted ranker."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.data import Items, Users, build_dataset
from models.evaluator import Protocol, evaluate
from models.popularity import PopularityScores
from models.recommender import Recommender
from models.splits import Ragged, leave_one_out
from models.youtube_dnn import (
    Bags,
    CandidateIndex,
    YouTubeDNN,
    YouTubeDNNConfig,
    YouTubeDNNNet,
    age_features,
    ann_vs_exact,
    encode_profiles,
    mean_bags,
    sampled_softmax_loss,
    training_examples,
)
from models.youtube_dnn_ranking import context_features, row_weights, running_rate, weighted_bce
from tests.test_model_conformance import tiny_dataset

SMALL = {"dim": 16, "hidden": 32, "max_history": 4, "negatives": 10, "batch_size": 64}


def test_history_average_by_hand():
    """Bag = the mean of the last `max_history` input embeddings; an empty bag is 0."""
    table = torch.nn.Embedding(4, 2)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [5.0, 5.0]]))
    bags = Bags.of([np.array([0, 2]), np.array([], dtype=np.int64), np.array([3, 0, 1, 2])], 2)
    expected = torch.tensor([[2.0, 2.0], [0.0, 0.0], [1.5, 3.0]])  # row 2: items 1, 2
    torch.testing.assert_close(mean_bags(table, bags), expected)
    values = np.array([7, 8, 9, 10, 11])
    window = Bags.window(values, np.array([1, 0, 4]), np.array([3, 0, 1]))
    assert window.items.tolist() == [8, 9, 10, 11] and window.offsets.tolist() == [0, 3, 3]


def test_user_tower_by_hand():
    """u = W2 ReLU(W1 [mean, a, a^2, sqrt a] + b1) + b2, with example age a at serving 0."""
    cfg = YouTubeDNNConfig(dim=2, hidden=3, layers=1, example_age=True)
    net = YouTubeDNNNet(3, cfg)
    with torch.no_grad():
        net.watch.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -2.0], [0.0, 0.0]]))
        w1 = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0],
                           [-1.0, -1.0, 0.0, 0.0, 1.0]])
        net.tower[0].weight.copy_(w1)
        net.tower[0].bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
        net.tower[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]]))
        net.tower[2].bias.copy_(torch.tensor([0.1, 0.2]))
    bags = Bags.of([np.array([0, 1])], 50)  # mean (2, 0)
    served = net.user_vector(bags)  # age 0: features (0, 0, 0)
    h = np.maximum(w1.numpy() @ np.array([2.0, 0.0, 0.0, 0.0, 0.0]) + [0.0, -1.0, 0.5], 0)
    expected = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]]) @ h + [0.1, 0.2]
    np.testing.assert_allclose(served.detach().numpy()[0], expected, rtol=1e-6)
    aged = age_features(np.array([0.0, 100.0]))
    torch.testing.assert_close(aged, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert not torch.equal(net.user_vector(bags, np.array([100.0])), served)
    # scores: u . w_i + b_i, and the ANN item vectors carry the bias as a last column
    scores = net.scores(served)
    torch.testing.assert_close(scores, served @ net.out.weight.T + net.bias)
    query = torch.cat([served, torch.ones(1, 1)], dim=1)
    torch.testing.assert_close(query @ net.item_vectors().T, scores)


def test_sampled_softmax_by_hand():
    """Cross-entropy of the target among the shared sample, logQ-corrected, with the
    sampled copy of a row's own target masked out."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    bias = torch.tensor([0.0, 0.5, 0.0, -1.0])
    target = torch.tensor([0, 3])
    sampled = torch.tensor([1, 3])
    log_kq = torch.log(torch.tensor([0.5, 1.0, 2.0, 0.25]))

    def ce(logits: list[float]) -> float:
        return -logits[0] + math.log(sum(math.exp(x) for x in logits))

    # row 0: target 0 -> 1 + 0 - log .5; sampled 1 -> 2 + .5 - 0, 3 -> 0 - 1 - log .25
    row0 = [1 - math.log(0.5), 2.5, -1 - math.log(0.25)]
    # row 1: target 3 -> 3 - 1 - log .25; sampled 1 -> 0 + .5; sampled 3 = target: masked
    row1 = [2 - math.log(0.25), 0.5]
    loss = sampled_softmax_loss(u, out, bias, target, sampled, log_kq)
    assert float(loss) == pytest.approx((ce(row0) + ce(row1)) / 2, rel=1e-5)
    plain = sampled_softmax_loss(u, out, bias, target, sampled, None)
    assert float(plain) == pytest.approx((ce([1, 2.5, -1]) + ce([2, 0.5])) / 2, rel=1e-5)


def test_examples_and_their_age():
    """Every click after a user's first is one example; its age counts the later clicks."""
    train = Ragged.from_rows([np.array([5, 6, 7]), np.array([8]), np.array([9, 1])])
    users, pos = training_examples(train)
    assert users.tolist() == [0, 0, 2] and pos.tolist() == [1, 2, 1]
    model = YouTubeDNN(dim=4, hidden=4, negatives=3, batch_size=10)
    model.prepare(np.arange(10))
    (batch,) = model.batches(train, np.random.default_rng(0))
    rows = sorted(zip(batch.users.tolist(), batch.target.tolist(), batch.age.tolist(),
                      np.split(batch.histories.items.numpy(),
                               batch.histories.offsets.numpy()[1:])))
    assert [(u, t, a, h.tolist()) for u, t, a, h in rows] == [
        (0, 6, 1, [5]), (0, 7, 0, [5, 6]), (2, 1, 0, [9])]
    assert batch.sampled.shape == (3,)


@pytest.fixture(scope="module")
def fitted() -> tuple[YouTubeDNN, object]:
    split = leave_one_out(tiny_dataset())
    model = YouTubeDNN(**SMALL)
    result = model.fit(split, seed=0, progress=False, epochs=15, lr=1e-2)
    return model, result, split


def test_training_lowers_the_loss_and_beats_popularity(fitted):
    model, result, split = fitted
    losses = [r.loss for r in result.history]
    assert losses[-1] < 0.7 * losses[0]
    full = Protocol(None, mask_history=True)
    ours = evaluate(model, split.test, full, ks=(10,)).mean()["recall@10"]
    pop = evaluate(PopularityScores(split.train, split.n_items), split.test, full,
                   ks=(10,)).mean()["recall@10"]
    assert ours > pop + 0.3, (ours, pop)


def test_ann_candidates_agree_with_exact_search(fitted):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 9)).astype(np.float32)
    queries = rng.normal(size=(40, 9)).astype(np.float32)
    _, exact = CandidateIndex(items, "exact").search(queries, 10)
    np.testing.assert_array_equal(exact, np.argsort(-(queries @ items.T), axis=1)[:, :10])
    for kind in ("hnsw", "ivf"):
        _, ann = CandidateIndex(items, kind, nprobe=8).search(queries, 10)  # type: ignore[arg-type]
        overlap = np.mean([len(np.intersect1d(a, e)) / 10 for a, e in zip(ann, exact)])
        assert overlap >= 0.95, (kind, overlap)
    model, _, split = fitted
    report = ann_vs_exact(model, split.test, ks=(5, 10))
    assert report["kinds"]["hnsw"]["kept@10"] >= 0.95
    assert report["kinds"]["exact"]["recall@10"] == pytest.approx(evaluate(
        model, split.test, Protocol(None), ks=(10,)).mean()["recall@10"])
    padded = ann_vs_exact(model, split.test, ks=(10,), catalogue=2000)
    assert padded["items"] == 2000 and padded["kinds"]["hnsw"]["overlap@10"] >= 0.9


def test_unseen_user_is_scored_from_their_clicks(fitted):
    model, _, _ = fitted
    before = {k: v.clone() for k, v in model.module_.state_dict().items()}
    scores = model.score([[503, 504, 505], [510, 511, 512]])  # ids never seen as a user
    assert np.isfinite(scores).all() and not np.allclose(scores[0], scores[1])
    assert 506 in model.recommend([503, 504, 505], k=5)
    assert 513 in model.recommend([510, 511, 512], k=5)
    after = model.module_.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no retraining


def _profiled_dataset():
    ds = tiny_dataset()
    ids = np.arange(1000, 1060)
    users = Users(ids=ids, age=np.where(ids % 7 == 0, np.nan, 15 + ids % 50),
                  gender=["F" if i % 2 else "M" for i in ids],
                  occupation=["writer" if i % 3 else "" for i in ids],
                  zip_code=[f"{i % 90:02d}123" for i in ids])
    return build_dataset("tiny-profiles", users.ids[ds.user], ds.items.ids[ds.item],
                         ds.rating, ds.ts, users, ds.items)


def test_profiles_are_an_optional_side_input(tmp_path):
    ds = _profiled_dataset()
    codes, sizes = encode_profiles(ds.users)
    assert codes.shape == (60, 4) and sizes[0] == 3 and sizes[1] == 2 and sizes[3] == 8
    assert codes[0, 3] == 1 and codes[1, 3] == 0  # age 15: the first bucket; NaN: unknown
    split = leave_one_out(ds)
    model = YouTubeDNN(**SMALL).use_profiles(ds.users)
    model.fit(split, seed=0, progress=False, epochs=3, lr=1e-2)
    histories = split.test.history.rows(range(4))
    with_users = model.score_many(histories, users=split.test.users[:4])
    assert not torch.equal(with_users, model.score_many(histories))  # unknown profile
    again = Recommender.load(model.save(tmp_path / "m.pt"))
    assert again.config.profile_sizes == sizes
    torch.testing.assert_close(again.score_many(histories, users=split.test.users[:4]),
                               with_users)


def test_context_features_and_weights():
    ds = build_dataset("ctx", np.array([1, 1, 2, 1]), np.array([5, 6, 5, 7]),
                       np.array([5.0, 2.0, 4.0, 3.0]), np.array([0.0, 7200.0, 10.0, 10800.0]),
                       Users(ids=np.zeros(0), age=np.zeros(0), gender=[], occupation=[],
                             zip_code=[]),
                       Items(ids=np.zeros(0), title=[], year=np.zeros(0), genres=[]))
    ctx = context_features(ds)  # rows sorted by time: (u1, 0), (u2, 10), (u1, 2 h), (u1, 3 h)
    np.testing.assert_allclose(ctx[:, 1], [1, 1, 0, 0])
    np.testing.assert_allclose(ctx[:, 0], [0, 0, math.log1p(2.0), math.log1p(1.0)])

    class Frame:
        label = np.array([1.0, 0.0, 1.0], dtype=np.float32)
        rows = np.array([0, 1, 2])

    w = row_weights(Frame(), ds, weighted=True)  # type: ignore[arg-type]
    np.testing.assert_allclose(w, [5.0, 1.0, 2.0])  # ratings in time order: 5, 4, 2, 3
    assert row_weights(Frame(), ds, weighted=False).tolist() == [1, 1, 1]  # type: ignore[arg-type]
    logit, y = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    bce = [math.log(2), math.log1p(math.exp(2)), math.log1p(math.exp(1))]
    assert float(weighted_bce(logit, y, torch.from_numpy(w))) == pytest.approx(
        (5 * bce[0] + bce[1] + 2 * bce[2]) / 8, rel=1e-6)


def test_running_rate_sees_only_earlier_seconds():
    """Per key: how many rows came strictly earlier and their shrunk positive rate."""
    key = np.array([1, 1, 2, 1, 1])
    ts = np.array([0.0, 5.0, 5.0, 5.0, 9.0])
    label = np.array([1, 0, 1, 1, 0])
    out = running_rate(key, ts, label, prior_rate=0.5, prior=2.0)
    # key 1: t=0 nothing before; t=5 (two rows) only the t=0 row; t=9 three rows
    np.testing.assert_allclose(out[:, 0], np.log1p([0, 1, 0, 1, 3]))
    np.testing.assert_allclose(out[:, 1], [0.5, 2 / 3, 0.5, 2 / 3, 3 / 5])
