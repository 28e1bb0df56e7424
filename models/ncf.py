"""NCF: GMF, MLP and NeuMF, trained point-wise with BCE on sampled negatives.

Why: the neural CF baselines of the engine's ranker, and the reference point every
learned interaction function is compared with.

The networks (He et al., section 3), all sharing `NCFNet`:

- GMF: y = sigmoid(h^T (p_u * q_i)), p_u, q_i the user's and item's GMF embeddings.
- MLP: y = sigmoid(h^T a_L(... a_1(W_1 [p_u; q_i] + b_1))), a ReLU tower whose widths
  halve (`layers`, default 64 -> 32 -> 16 -> 8; the embeddings are layers[0] / 2 each).
- NeuMF: separate GMF and MLP embeddings, y = sigmoid(h^T [p_u^G * q_i^G; MLP tower]).
  With ``pretrain=True`` (the paper's best setting) `fit` first trains a GMF and an MLP
  on the same data, then starts NeuMF from their weights, the output layer being
  h = [alpha h_GMF; (1 - alpha) h_MLP] with alpha = 0.5, and trains it with plain SGD
  (the paper: Adam's momentum is not in the pre-trained models).

Training: every training click is a positive; each epoch draws `negatives` (default 4)
items per positive uniformly among the items the user never clicked; binary
cross-entropy (the paper's log loss).

User-bound (see docs/models.md): a training user has an embedding row. A user who is not
in the table is *folded in* from their clicks: fresh user vectors (starting at the mean
user), items frozen, `fold_in_steps` Adam steps on the same loss against seeded
negatives, the usual way of placing a new user in a factor model.

Example:
    >>> import numpy as np
    >>> model = GMF(factors=4)
    >>> model.prepare(np.array([10, 20, 30]), user_ids=np.array([1, 2]))
    >>> model.score_many([np.array([0, 2])], users=np.array([1])).shape
    torch.Size([1, 3])

References:
    Xiangnan He, Lizi Liao, Hanwang Zhang, Liqiang Nie, Xia Hu and Tat-Seng Chua.
    *Neural Collaborative Filtering*. WWW 2017. https://arxiv.org/abs/1708.05031
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator
from torch import nn

from models.recommender import Recommender, register
from models.splits import Ragged, Split

if TYPE_CHECKING:
    from models.trainer import TrainResult

SCORE_CHUNK = 64  # users scored at once: the MLP tower runs on (chunk, I, width)


class NCFConfig(BaseModel):
    """Sizes, sampling and fold-in; optimisation settings live in `TrainerConfig`."""

    factors: int = Field(8, ge=1, description="GMF embedding size (predictive factors)")
    layers: tuple[int, ...] = Field((64, 32, 16, 8), description="MLP tower widths")
    negatives: int = Field(4, ge=1, description="sampled negatives per positive")
    batch_size: int = Field(256, ge=1)
    alpha: float = Field(0.5, ge=0, le=1, description="NeuMF: weight of GMF's output layer")
    pretrain: bool = Field(True, description="NeuMF: start from a trained GMF and MLP")
    finetune_lr: float | None = Field(
        None, gt=0, description="NeuMF after pre-training: its own learning rate (SGD)")
    gmf_checkpoint: str | None = Field(
        None, description="NeuMF: pre-trained GMF checkpoint to start from (else fit one)")
    mlp_checkpoint: str | None = Field(
        None, description="NeuMF: pre-trained MLP checkpoint to start from (else fit one)")
    fold_in_steps: int = Field(50, ge=0, description="Adam steps to place an unseen user")
    fold_in_lr: float = Field(0.05, gt=0)

    @field_validator("layers", mode="before")
    @classmethod
    def _parse_layers(cls, value: Any) -> Any:
        """Also "64,32,16,8" or "(64, 32)" (as `lookalike train --set layers=...` gives)."""
        if isinstance(value, str):
            return tuple(int(v) for v in value.strip("()[] ").split(",") if v.strip())
        return value


class NCFNet(nn.Module):
    """User vectors and items -> logits. `gmf` / `mlp` switch the two branches on.

    Users enter as vectors (gmf_u (B, F), mlp_u (B, D)) so that a folded-in user and a
    table row go through the same code; items (B,) or (B, N) dense indices.
    """

    def __init__(self, n_users: int, n_items: int, factors: int, layers: Sequence[int],
                 gmf: bool, mlp: bool) -> None:
        super().__init__()
        if mlp and (len(layers) < 2 or layers[0] % 2):
            raise ValueError(f"layers: at least two widths, the first even; got {layers}")
        self.gmf, self.mlp = gmf, mlp
        width = 0
        if gmf:
            self.gmf_user = nn.Embedding(n_users, factors)
            self.gmf_item = nn.Embedding(n_items, factors)
            width += factors
        if mlp:
            self.mlp_user = nn.Embedding(n_users, layers[0] // 2)
            self.mlp_item = nn.Embedding(n_items, layers[0] // 2)
            self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in
                                       zip(layers[:-1], layers[1:], strict=True))
            width += layers[-1]
        self.predict = nn.Linear(width, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Embeddings N(0, 0.01), tower Glorot, output LeCun-uniform (the authors' code)."""
        for emb in self.embeddings():
            nn.init.normal_(emb.weight, std=0.01)
        if self.mlp:
            for layer in self.tower:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        bound = (3 / self.predict.in_features) ** 0.5
        nn.init.uniform_(self.predict.weight, -bound, bound)
        nn.init.zeros_(self.predict.bias)

    def embeddings(self) -> list[nn.Embedding]:
        return ([self.gmf_user, self.gmf_item] if self.gmf else []) + (
            [self.mlp_user, self.mlp_item] if self.mlp else [])

    def user_vectors(self, users: torch.Tensor) -> tuple[torch.Tensor | None,
                                                          torch.Tensor | None]:
        return (self.gmf_user(users) if self.gmf else None,
                self.mlp_user(users) if self.mlp else None)

    def mean_user(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The average training user's vectors (a fold-in's starting point)."""
        return (self.gmf_user.weight.mean(0) if self.gmf else None,
                self.mlp_user.weight.mean(0) if self.mlp else None)

    def forward(self, gmf_u: torch.Tensor | None, mlp_u: torch.Tensor | None,
                items: torch.Tensor) -> torch.Tensor:
        """Logits shaped like `items`; user vectors broadcast over an item axis if any."""
        parts = []
        expand = items.dim() == 2
        if self.gmf:
            assert gmf_u is not None
            u = gmf_u.unsqueeze(1) if expand else gmf_u
            parts.append(u * self.gmf_item(items))
        if self.mlp:
            assert mlp_u is not None
            first, rest = self.tower[0], self.tower[1:]
            d = mlp_u.shape[-1]
            # W_1 [p; q] = W_1[:, :d] p + W_1[:, d:] q: the user half once per user
            user_part = F.linear(mlp_u, first.weight[:, :d], first.bias)
            h = self.mlp_item(items) @ first.weight[:, d:].T + (
                user_part.unsqueeze(1) if expand else user_part)
            h = torch.relu(h)
            for layer in rest:
                h = torch.relu(layer(h))
            parts.append(h)
        return self.predict(torch.cat(parts, dim=-1)).squeeze(-1)


class _NCF(Recommender):
    """The three NCF variants behind the zoo interface; see the module docstring."""

    Config = NCFConfig
    config: NCFConfig
    split = "random"  # general CF: random 8:1:1, full ranking, training items masked
    user_bound = True
    trainer_defaults: ClassVar[dict[str, Any]] = {"valid_mask_history": True}
    branches: ClassVar[tuple[bool, bool]]  # (gmf, mlp)

    def build(self, n_items: int) -> nn.Module:
        self._clicked: tuple[int, np.ndarray] | None = None
        return NCFNet(max(self.n_users, 1), n_items, self.config.factors, self.config.layers,
                      *self.branches)

    @property
    def net(self) -> NCFNet:
        self._check_fitted()
        assert isinstance(self.module_, NCFNet)
        return self.module_

    # ------------------------------------------------------------------ training data
    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled (user, item, label) rows: every click, and `negatives` draws per click."""
        users = np.repeat(np.arange(len(train)), train.lengths)
        pos = train.values
        k = self.config.negatives
        neg = sample_unclicked(self._clicked_keys(train), np.repeat(users, k), self.n_items,
                               rng)
        u = np.concatenate([users, np.repeat(users, k)])
        i = np.concatenate([pos, neg])
        y = np.concatenate([np.ones(len(pos), np.float32), np.zeros(len(neg), np.float32)])
        order = rng.permutation(len(u))
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start:start + self.config.batch_size]
            yield {"users": torch.from_numpy(u[rows]), "items": torch.from_numpy(i[rows]),
                   "labels": torch.from_numpy(y[rows])}

    def _clicked_keys(self, train: Ragged) -> np.ndarray:
        """Sorted user * n_items + item keys of the training clicks (cached per `train`)."""
        if self._clicked is None or self._clicked[0] != id(train):
            users = np.repeat(np.arange(len(train)), train.lengths)
            self._clicked = (id(train), np.unique(users * self.n_items + train.values))
        return self._clicked[1]

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.net(*self.net.user_vectors(batch["users"]), batch["items"])
        return F.binary_cross_entropy_with_logits(logits, batch["labels"])

    # ------------------------------------------------------------------ scores
    def score_index(self, histories: Sequence[np.ndarray],
                    users: np.ndarray | None = None) -> torch.Tensor:
        """Table users by their row; anyone else folded in from `histories`."""
        users = np.full(len(histories), -1) if users is None else np.asarray(users)
        known = (users >= 0) & (users < self.n_users)
        net = self.net
        gmf_u, mlp_u = net.user_vectors(torch.from_numpy(np.where(known, users, 0)))
        unknown = np.flatnonzero(~known)
        if len(unknown):
            g, m = self.fold_in([histories[r] for r in unknown])
            rows = torch.from_numpy(unknown)
            if gmf_u is not None and g is not None:
                gmf_u = gmf_u.index_put((rows,), g)
            if mlp_u is not None and m is not None:
                mlp_u = mlp_u.index_put((rows,), m)
        items = torch.arange(self.n_items).expand(min(SCORE_CHUNK, len(histories)), -1)
        out = []
        for s in range(0, len(histories), SCORE_CHUNK):
            sl = slice(s, s + SCORE_CHUNK)
            g_s = gmf_u[sl] if gmf_u is not None else None
            m_s = mlp_u[sl] if mlp_u is not None else None
            n = len(histories[sl])
            out.append(net(g_s, m_s, items[:n]))
        return torch.cat(out)

    def fold_in(self, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor | None,
                                                                 torch.Tensor | None]:
        """User vectors for users outside the table, fitted to their clicks, items frozen.

        Starts at the mean training user; `fold_in_steps` Adam steps on the BCE of each
        user's clicks against `negatives` items per click drawn (seeded) among the rest.
        """
        net = self.net
        start = [v.detach().expand(len(histories), -1).clone() if v is not None else None
                 for v in net.mean_user()]
        params = [v.requires_grad_() for v in start if v is not None]
        lengths = np.array([len(h) for h in histories])
        if not lengths.sum() or not self.config.fold_in_steps:
            return start[0], start[1]
        rows = np.repeat(np.arange(len(histories)), lengths)
        pos = np.concatenate(histories).astype(np.int64)
        keys = np.unique(rows * self.n_items + pos)
        rng = np.random.default_rng(0)
        k = self.config.negatives
        opt = torch.optim.Adam(params, lr=self.config.fold_in_lr)
        r = torch.from_numpy(np.concatenate([rows, np.repeat(rows, k)]))
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(pos) * k)])
        with torch.enable_grad():
            for _ in range(self.config.fold_in_steps):
                neg = sample_unclicked(keys, np.repeat(rows, k), self.n_items, rng)
                items = torch.from_numpy(np.concatenate([pos, neg]))
                g = start[0][r] if start[0] is not None else None
                m = start[1][r] if start[1] is not None else None
                loss = F.binary_cross_entropy_with_logits(net(g, m, items), y)
                grads = torch.autograd.grad(loss, params)  # the network's weights untouched
                for p, grad in zip(params, grads, strict=True):
                    p.grad = grad
                opt.step()
        return tuple(v.detach() if v is not None else None for v in start)  # type: ignore[return-value]

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"factors": 8, "layers": (16, 8), "batch_size": 64,
                           "fold_in_steps": 30},
                "trainer": {"epochs": 8, "lr": 1e-2}}


def sample_unclicked(clicked_keys: np.ndarray, users: np.ndarray, n_items: int,
                     rng: np.random.Generator) -> np.ndarray:
    """One item per entry of `users`, uniform among the items that user never clicked.

    `clicked_keys`: sorted user * n_items + item of every click. A user who clicked every
    item gets any item (nothing else is left).
    """
    items = rng.integers(0, n_items, len(users))
    bad = _member(clicked_keys, users * n_items + items)
    tries = 0
    while bad.any() and tries < 100:
        items[bad] = rng.integers(0, n_items, int(bad.sum()))
        bad[bad] = _member(clicked_keys, users[bad] * n_items + items[bad])
        tries += 1
    return items


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    at = np.searchsorted(sorted_keys, keys)
    return (at < len(sorted_keys)) & (sorted_keys[np.minimum(at, len(sorted_keys) - 1)]
                                      == keys)


@register
class GMF(_NCF):
    """Generalized matrix factorisation: sigmoid(h^T (p_u * q_i))."""

    name = "ncf-gmf"
    branches = (True, False)


@register
class MLP(_NCF):
    """The MLP branch alone: a ReLU tower over [p_u; q_i]."""

    name = "ncf-mlp"
    branches = (False, True)


@register
class NeuMF(_NCF):
    """GMF and MLP fused under one output layer; pre-trained from both by default."""

    name = "neumf"
    branches = (True, True)

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        """Without pre-training: the suite counts one fit's epochs (tests/test_ncf.py
        covers pre-training)."""
        params = super()._unit_test_params()
        return {**params, "config": {**params["config"], "pretrain": False}}

    def fit(self, split: Split, **trainer_options: Any) -> TrainResult:
        """With `pretrain`: fit GMF, then MLP, then NeuMF started from both (paper, 3.4.1).

        `gmf_checkpoint` / `mlp_checkpoint` replace a fit by a saved model (same split).

        A wall-clock budget (`max_seconds`) is shared: GMF and MLP get a third each at
        most, NeuMF what is left. Without an explicit `optimizer`, the fused model is
        trained with plain SGD, as in the paper, at `finetune_lr` when given.
        """
        if not self.config.pretrain:
            return super().fit(split, **trainer_options)
        start = time.perf_counter()
        budget = trainer_options.get("max_seconds")
        sub = {k: v for k, v in trainer_options.items() if k != "checkpoint"}
        if budget is not None:
            sub["max_seconds"] = budget / 3
        config = self.config.model_dump()
        self.pretrain_results_: dict[str, TrainResult] = {}
        for name, cls, path in (("gmf", GMF, self.config.gmf_checkpoint),
                                ("mlp", MLP, self.config.mlp_checkpoint)):
            if path is not None:  # the paper's workflow: pre-trained files
                model = cls.load(path)
                if not np.array_equal(model.item_ids_, split.item_ids) or not np.array_equal(
                        model.user_ids_, split.user_ids):
                    raise ValueError(f"{path}: trained on other users or items")
            else:
                model = cls(**config)
                self.pretrain_results_[name] = model.fit(split, **sub)
            setattr(self, f"{name}_", model)
        options = {"optimizer": "sgd", **trainer_options}
        if self.config.finetune_lr is not None:
            options["lr"] = self.config.finetune_lr
        if budget is not None:
            options["max_seconds"] = max(budget - (time.perf_counter() - start), 1e-3)
        self._pretrained = (self.gmf_.net, self.mlp_.net)
        try:
            return super().fit(split, **options)
        finally:
            self._pretrained = None

    def build(self, n_items: int) -> nn.Module:
        net = super().build(n_items)
        pretrained = getattr(self, "_pretrained", None)
        if pretrained is not None:
            assert isinstance(net, NCFNet)
            init_from_pretrained(net, *pretrained, alpha=self.config.alpha)
        return net


def init_from_pretrained(neumf: NCFNet, gmf: NCFNet, mlp: NCFNet, alpha: float) -> None:
    """Copy GMF's and MLP's embeddings and tower into NeuMF; h = [alpha h_G; (1-alpha) h_M].

    The output biases are summed with the same weights (the authors' code keeps one
    bias: 0.5 * (b_G + b_M)).
    """
    with torch.no_grad():
        neumf.gmf_user.weight.copy_(gmf.gmf_user.weight)
        neumf.gmf_item.weight.copy_(gmf.gmf_item.weight)
        neumf.mlp_user.weight.copy_(mlp.mlp_user.weight)
        neumf.mlp_item.weight.copy_(mlp.mlp_item.weight)
        for ours, theirs in zip(neumf.tower, mlp.tower, strict=True):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        f = gmf.predict.in_features
        neumf.predict.weight[:, :f] = alpha * gmf.predict.weight
        neumf.predict.weight[:, f:] = (1 - alpha) * mlp.predict.weight
        neumf.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)
