"""The evaluator's metrics pinned on hand-made cases, its protocols on a fixed-score model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from models.evaluator import (
    PROTOCOLS,
    Protocol,
    confidence_interval,
    evaluate,
    evaluate_protocol,
    metrics_from_hits,
    protocols_for,
)
from models.recommender import Recommender
from models.splits import EvalSet, Ragged


class FixedConfig(BaseModel):
    constant: bool = False


class FixedScores(Recommender):
    """Item i scores -i (item 0 best), whoever the user; or a constant for every item."""

    name = "fixed-scores"
    Config = FixedConfig

    def build(self, n_items: int) -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    def batches(self, train, rng):  # pragma: no cover - never trained
        return iter(())

    def loss(self, batch):  # pragma: no cover
        raise NotImplementedError

    def score_index(self, histories):
        row = (torch.zeros(self.n_items) if self.config.constant
               else -torch.arange(self.n_items, dtype=torch.float32))
        return row.expand(len(histories), -1).clone()


def fixed(n_items: int = 50, constant: bool = False) -> FixedScores:
    model = FixedScores(constant=constant)
    model.prepare(np.arange(100, 100 + n_items))
    return model


def one_user(history: list[int], targets: list[int]) -> EvalSet:
    return EvalSet(np.array([0]), Ragged.from_rows([history]), Ragged.from_rows([targets]))


def test_single_target_metrics_at_a_known_rank():
    hits = np.array([[False, True, False]])  # the target is second
    m = metrics_from_hits(hits, np.array([1]), ks=(1, 3))
    assert m["hit@1"][0] == 0 and m["hit@3"][0] == 1
    assert m["ndcg@3"][0] == pytest.approx(1 / math.log2(3))
    assert m["mrr@3"][0] == pytest.approx(0.5)
    assert m["recall@3"][0] == 1 and m["precision@3"][0] == pytest.approx(1 / 3)
    assert m["mrr@1"][0] == 0 and m["ndcg@1"][0] == 0


def test_several_targets():
    hits = np.array([[True, False, True, False]])
    m = metrics_from_hits(hits, np.array([3]), ks=(4,))
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@4"][0] == pytest.approx(dcg / idcg)
    assert m["recall@4"][0] == pytest.approx(2 / 3)
    assert m["precision@4"][0] == pytest.approx(0.5)
    assert m["mrr@4"][0] == 1.0


def test_full_ranking_rank_and_history_mask():
    model = fixed()
    unmasked = evaluate(model, one_user([0, 1, 2], [5]), Protocol(None), ks=(10,)).mean()
    assert unmasked["ndcg@10"] == pytest.approx(1 / math.log2(5 + 2))  # rank 5 (0-based)
    masked = evaluate(model, one_user([0, 1, 2], [5]), Protocol(None, mask_history=True),
                      ks=(10,)).mean()
    assert masked["ndcg@10"] == pytest.approx(1 / math.log2(2 + 2))  # items 0-2 removed
    assert masked["mrr@10"] == pytest.approx(1 / 3)


def test_target_beyond_k_scores_zero_and_ties_count_against_the_target():
    far = evaluate(fixed(), one_user([], [30]), Protocol(None), ks=(10,)).mean()
    assert all(v == 0 for v in far.values())
    tied = evaluate(fixed(constant=True), one_user([], [0]), Protocol(None), ks=(10,)).mean()
    assert tied["hit@10"] == 0  # a constant model finds nothing


def test_several_targets_by_full_ranking():
    res = evaluate(fixed(), one_user([0], [1, 3, 40]), Protocol(None, mask_history=True),
                   ks=(3,)).mean()
    # masked ranking: 1, 2, 3 -> hits at positions 1 and 3
    assert res["recall@3"] == pytest.approx(2 / 3)
    assert res["precision@3"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one target"):
        evaluate(fixed(), one_user([0], [1, 3]), Protocol(100))


def test_sampled_negatives_history_exclusion():
    """Paper: negatives avoid the history; RecBole: only the target."""
    n_users = 200
    data = EvalSet(np.arange(n_users), Ragged.from_rows([[0, 1, 2, 3, 4]] * n_users),
                   Ragged.from_rows([[5]] * n_users))
    paper = evaluate(fixed(200), data, PROTOCOLS["loo-uni100"]["paper"], ks=(1,))
    assert paper.mean()["hit@1"] == 1.0  # only worse items are left as negatives
    recbole = evaluate(fixed(200), data, PROTOCOLS["loo-uni100"]["recbole"], ks=(1,))
    assert 0 < recbole.mean()["hit@1"] < 1  # some users drew a history item (better)
    again = evaluate(fixed(200), data, PROTOCOLS["loo-uni100"]["recbole"], ks=(1,))
    np.testing.assert_array_equal(recbole.per_user["hit@1"], again.per_user["hit@1"])


def test_sampled_rank_counts_only_candidates():
    # 101 items, 100 negatives drawn from the 100 non-target items: nearly all appear
    res = evaluate(fixed(101), one_user([], [100]), Protocol(100), ks=(10,))
    assert res.per_user["hit@10"][0] == 0
    res = evaluate(fixed(101), one_user([], [0]), Protocol(100), ks=(10,))
    assert res.per_user["mrr@10"][0] == 1


def test_per_user_values_and_confidence_interval():
    data = EvalSet(np.arange(4), Ragged.from_rows([[], [], [], []]),
                   Ragged.from_rows([[0], [1], [20], [3]]))
    res = evaluate(fixed(), data, Protocol(None), ks=(10,))
    np.testing.assert_array_equal(res.per_user["hit@10"], [1, 1, 0, 1])
    s = res.summary()["hit@10"]
    half = 1.959964 * np.std([1, 1, 0, 1], ddof=1) / 2
    assert s["mean"] == 0.75
    assert (s["low"], s["high"]) == pytest.approx((0.75 - half, 0.75 + half), abs=1e-5)
    low, high = confidence_interval(np.r_[np.ones(50), np.zeros(50)], method="bootstrap")
    assert low < 0.5 < high
    assert res.to_json()["users"] == 4


def test_protocols_by_split():
    assert protocols_for("loo") == ["loo-full", "loo-uni100"]
    assert protocols_for("random") == ["ro-full"]
    assert PROTOCOLS["ro-full"]["recbole"].mask_history
    both = evaluate_protocol(fixed(), one_user([0, 1], [2]), "loo-full", ks=(1,))
    assert both["recbole"].mean()["hit@1"] == 0 and both["paper"].mean()["hit@1"] == 1
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol(fixed(), one_user([0], [1]), "nope")
