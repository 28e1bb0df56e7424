"""NCF: GMF / MLP / NeuMF forward math by hand, pre-training init, negatives, fold-in."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.ncf import GMF, MLP, NCFNet, NeuMF, init_from_pretrained, sample_unclicked
from models.splits import Ragged, random_split
from tests.test_model_conformance import tiny_dataset


def _net(cls: type, **cfg) -> NCFNet:
    model = cls(**{"factors": 2, "layers": (4, 2), **cfg})
    torch.manual_seed(0)
    model.prepare(np.arange(3), user_ids=np.array([100, 200]))
    return model


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def test_gmf_by_hand():
    model = _net(GMF)
    net = model.net
    with torch.no_grad():
        net.gmf_user.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5]]))
        net.gmf_item.weight.copy_(torch.tensor([[3.0, 1.0], [0.0, 2.0], [-1.0, -1.0]]))
        net.predict.weight.copy_(torch.tensor([[0.5, 0.25]]))
        net.predict.bias.fill_(0.1)
    # user 0: p = (1, -2); item i: h . (p * q_i) + b
    expected = [0.5 * 3 + 0.25 * -2 + 0.1, 0.25 * -4 + 0.1, 0.5 * -1 + 0.25 * 2 + 0.1]
    got = model.score_many([np.array([1])], users=np.array([0]))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6)


def test_mlp_and_neumf_by_hand():
    for cls in (MLP, NeuMF):
        model = _net(cls)
        net = model.net
        p = {k: _np(v) for k, v in net.state_dict().items()}
        u = 1
        rows = []
        for i in range(3):
            h = relu(p["tower.0.weight"] @ np.concatenate([p["mlp_user.weight"][u],
                                                           p["mlp_item.weight"][i]])
                     + p["tower.0.bias"])
            if cls is NeuMF:
                h = np.concatenate([p["gmf_user.weight"][u] * p["gmf_item.weight"][i], h])
            rows.append(p["predict.weight"][0] @ h + p["predict.bias"][0])
        got = model.score_many([np.array([0])], users=np.array([u]))
        np.testing.assert_allclose(got[0].numpy(), rows, rtol=1e-5, atol=1e-7)


def test_neumf_init_copies_gmf_and_mlp_and_fuses_outputs_with_alpha():
    gmf, mlp, neumf = _net(GMF).net, _net(MLP).net, _net(NeuMF).net
    torch.manual_seed(1)
    for net in (gmf, mlp):
        for param in net.parameters():
            torch.nn.init.normal_(param)
    init_from_pretrained(neumf, gmf, mlp, alpha=0.5)
    for name in ("gmf_user", "gmf_item"):
        assert torch.equal(getattr(neumf, name).weight, getattr(gmf, name).weight)
    for name in ("mlp_user", "mlp_item"):
        assert torch.equal(getattr(neumf, name).weight, getattr(mlp, name).weight)
    assert torch.equal(neumf.tower[0].weight, mlp.tower[0].weight)
    torch.testing.assert_close(neumf.predict.weight[0, :2], 0.5 * gmf.predict.weight[0])
    torch.testing.assert_close(neumf.predict.weight[0, 2:], 0.5 * mlp.predict.weight[0])
    # so NeuMF's logit is the alpha-mix of the two pre-trained logits
    users, items = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    mix = (0.5 * gmf(*gmf.user_vectors(users), items)
           + 0.5 * mlp(*mlp.user_vectors(users), items))
    torch.testing.assert_close(neumf(*neumf.user_vectors(users), items), mix)


def test_neumf_fit_pretrains_then_starts_from_both():
    split = random_split(tiny_dataset())
    model = NeuMF(factors=4, layers=(8, 4), batch_size=64, pretrain=True)
    # a learning rate too small to move the weights: NeuMF ends where pre-training left it
    result = model.fit(split, epochs=2, lr=1e-12, progress=False)
    assert result.epochs == 2
    assert model.gmf_.fitted and model.mlp_.fitted
    torch.testing.assert_close(model.net.gmf_item.weight, model.gmf_.net.gmf_item.weight)
    torch.testing.assert_close(model.net.mlp_user.weight, model.mlp_.net.mlp_user.weight)
    torch.testing.assert_close(model.net.predict.weight[0, :4],
                               0.5 * model.gmf_.net.predict.weight[0])


def test_neumf_starts_from_pretrained_checkpoints(tmp_path):
    split = random_split(tiny_dataset())
    paths = {}
    for name, cls in (("gmf", GMF), ("mlp", MLP)):
        model = cls(factors=4, layers=(8, 4), batch_size=64)
        model.fit(split, epochs=2, lr=1e-2, progress=False)
        paths[name] = model.save(tmp_path / f"{name}.pt")
    neumf = NeuMF(factors=4, layers=(8, 4), batch_size=64, gmf_checkpoint=str(paths["gmf"]),
                  mlp_checkpoint=str(paths["mlp"]), finetune_lr=1e-12)
    neumf.fit(split, epochs=1, lr=1e-2, progress=False)
    assert neumf.pretrain_results_ == {}  # nothing re-trained
    gmf = GMF.load(paths["gmf"])
    torch.testing.assert_close(neumf.net.gmf_user.weight, gmf.net.gmf_user.weight)
    other = dataclasses.replace(split, item_ids=split.item_ids + 1)  # another catalogue
    with pytest.raises(ValueError, match="other users or items"):
        neumf.fit(other, epochs=1, progress=False)


def test_negatives_avoid_clicks_and_come_four_per_positive():
    train = Ragged.from_rows([np.array([0, 1, 2]), np.array([3]), np.array([], dtype=np.int64)])
    model = _net(GMF, negatives=4, batch_size=1000)
    model.prepare(np.arange(5), user_ids=np.arange(3))
    batch = next(model.batches(train, np.random.default_rng(0)))
    labels = batch["labels"].numpy()
    assert labels.sum() == 4 and (labels == 0).sum() == 16
    for u, i, y in zip(batch["users"].tolist(), batch["items"].tolist(), labels, strict=True):
        assert (i in train[u].tolist()) == (y == 1)
    keys = np.array([0 * 5 + 0, 0 * 5 + 1, 0 * 5 + 2, 0 * 5 + 3])
    draws = sample_unclicked(keys, np.zeros(200, np.int64), 5, np.random.default_rng(1))
    assert set(draws.tolist()) == {4}


def test_table_users_by_row_unseen_users_folded_in():
    split = random_split(tiny_dataset())
    model = GMF(factors=8, batch_size=64, fold_in_steps=30)
    model.fit(split, epochs=8, lr=1e-2, progress=False)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    history = [split.train[0]]
    known = model.score_many(history, users=np.array([0]))
    net = model.net
    manual = (net.gmf_user.weight[0] * net.gmf_item.weight) @ net.predict.weight[0] + \
        net.predict.bias
    torch.testing.assert_close(known[0], manual.detach())
    folded = model.score_many(history)  # no id: the same clicks, folded in
    assert not torch.equal(folded, known)
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    # the fold-in ranks the user's own clicks high
    ranks = torch.argsort(torch.argsort(-folded[0]))
    assert float(ranks[torch.from_numpy(history[0])].float().mean()) < model.n_items / 2


@pytest.mark.parametrize("cls", [GMF, MLP])
def test_branches_learn_the_planted_task(cls):
    split = random_split(tiny_dataset())
    result = cls(factors=8, layers=(16, 8), batch_size=64).fit(split, epochs=8, lr=1e-2,
                                                               progress=False)
    assert result.history[-1].loss < result.history[0].loss and result.best_value > 0.3


def test_layers_setting_parses_from_the_command_line():
    assert NeuMF(layers="64,32,16").config.layers == (64, 32, 16)
    assert NeuMF(layers="(8, 4)").config.layers == (8, 4)
    with pytest.raises(ValueError, match="two widths"):
        NCFNet(2, 3, 2, (5, 2), gmf=False, mlp=True)
