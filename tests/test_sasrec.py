"""SASRec's own checks: causality, shapes, training windows, negatives, both losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.sasrec import PAD, SASRec, SASRecNet, left_pad, training_windows
from models.splits import Ragged, leave_one_out
from tests.test_model_conformance import N_ITEMS, tiny_dataset


def small(**overrides) -> SASRec:
    model = SASRec(**{"hidden": 16, "blocks": 2, "heads": 2, "max_len": 6, **overrides})
    torch.manual_seed(0)
    model.prepare(np.arange(N_ITEMS))
    return model


def test_output_at_t_ignores_later_clicks():
    net = small().net.eval()
    seq = torch.tensor([[0, 0, 3, 7, 9, 11]])
    changed = seq.clone()
    changed[0, 4:] = torch.tensor([20, 25])
    a, b = net(seq), net(changed)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)
    assert not torch.allclose(a[0, 4:], b[0, 4:])


def test_left_padding_is_finite_and_history_cut_to_max_len():
    """All-pad rows would be NaN under a plain key mask; a query always sees itself."""
    model = small(dropout=0.0)
    net = model.net.eval()
    out = net(torch.tensor([[0, 0, 0, 3, 7, 9]]))
    assert torch.isfinite(out).all()
    # a history longer than max_len is cut to its last max_len clicks
    long = model.score_many([np.arange(20)])
    last = model.score_many([np.arange(20)[-6:]])
    assert torch.equal(long, last)


def test_shapes():
    model = small()
    assert model.net(torch.zeros(3, 6, dtype=torch.long)).shape == (3, 6, 16)
    assert model.score_many([np.array([1, 2]), np.array([], dtype=np.int64)]).shape == (2, N_ITEMS)
    np.testing.assert_array_equal(left_pad([np.array([4, 5])], 4), [[0, 0, 5, 6]])
    with pytest.raises(ValueError, match="multiple of heads"):
        SASRecNet(10, SASRec(hidden=10, heads=3).config)


def test_every_click_after_the_first_is_a_target_once():
    train = Ragged.from_rows([np.arange(13), np.array([5, 6]), np.array([7])])
    windows, users = training_windows(train, max_len=4, every=True)
    assert windows.shape[1] == 5
    inputs, targets = windows[:, :-1], windows[:, 1:]
    for u in range(3):
        trained = (targets[users == u] != PAD) & (inputs[users == u] != PAD)  # as in loss()
        got = np.sort(targets[users == u][trained]) - 1
        np.testing.assert_array_equal(got, np.sort(train[u][1:]))
    # inputs precede their targets: each window is a contiguous run of the history
    first = windows[users == 0][0]
    np.testing.assert_array_equal(first, np.arange(8, 13) + 1)
    last_only, u_last = training_windows(train, max_len=4, every=False)
    assert len(last_only) == 2 and u_last.tolist() == [0, 1]


def test_bce_negatives_avoid_the_users_clicks():
    split = leave_one_out(tiny_dataset())
    model = small(loss="bce", batch_size=8)
    rng = np.random.default_rng(0)
    for batch in model.batches(split.train, rng):
        assert batch["negative"].shape == batch["input"].shape
        for w_target, w_negative in zip(batch["target"], batch["negative"], strict=True):
            user_items = set(w_target.tolist()) - {PAD}
            assert not user_items & set(w_negative.tolist())
        assert "negative" not in next(small(loss="ce").batches(split.train, rng))


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_both_losses_train(loss):
    split = leave_one_out(tiny_dataset())
    model = SASRec(hidden=16, blocks=1, max_len=8, batch_size=16, loss=loss)
    result = model.fit(split, epochs=6, lr=5e-3, progress=False)
    assert result.history[-1].loss < result.history[0].loss
    assert result.best_value > 0.3
