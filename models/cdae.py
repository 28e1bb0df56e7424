"""CDAE: collaborative denoising autoencoder, a denoising autoencoder with a user node.

Why: the simplest model that is both an autoencoder of a user's clicks (new users fold
in from their clicks) and a latent-factor model (a per-user vector), the bridge the
paper draws between the two families; a baseline of the general-CF protocol.

The network (Wu et al., section 4): the user's 0/1 click row y_u (I,) is corrupted by
drop-out noise (each click kept with probability 1 - q and scaled by 1 / (1 - q)), then

    z_u = h(W^T y~_u + V_u + b)          (K,)  hidden, with the user node V_u
    y^_u = f(W'^T z_u + b')              (I,)  reconstruction, f = sigmoid

trained on the *binary* targets y_u (every item: clicked 1, not clicked 0; or, with
`negatives` = k, the clicks and k unclicked items per click drawn each epoch, the
paper's negative sampling) with the logistic loss, plus lambda / 2 times the squared
norms of W, W' and the batch's V_u (the paper's regulariser), per user of the batch.
h is ReLU by default (`activation`; the paper also uses the sigmoid, which on ml-100k
stays at the popularity level: docs/models.md).

User-bound: training users have their node V_u; anyone else is scored from their clicks
with the mean node of the training users (the average user's offset).

Example:
    >>> import numpy as np
    >>> model = CDAE(hidden=8)
    >>> model.prepare(np.array([10, 20, 30]), user_ids=np.array([1, 2]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Yao Wu, Christopher DuBois, Alice X. Zheng and Martin Ester. *Collaborative Denoising
    Auto-Encoders for Top-N Recommender Systems*. WSDM 2016.
    https://doi.org/10.1145/2835776.2835837
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.mult_vae import Clicks, SparseInput
from models.ncf import sample_unclicked
from models.recommender import Recommender, register
from models.splits import Ragged

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh,
    "identity": lambda x: x}


class CDAEConfig(BaseModel):
    """Sizes, corruption and regularisation; optimisation lives in `TrainerConfig`."""

    hidden: int = Field(50, ge=1, description="K, the code size")
    corruption: float = Field(0.5, ge=0, lt=1, description="q, drop-out probability")
    activation: Literal["sigmoid", "relu", "tanh", "identity"] = Field(
        "relu", description="h; relu as RecBole (sigmoid stalls at popularity on ml-100k)")
    reg: float = Field(0.01, ge=0, description="lambda of the L2 regulariser")
    batch_size: int = Field(128, ge=1, description="users per step")
    negatives: int = Field(0, ge=0, description="0: every unclicked item is a 0 target; "
                           "k: k unclicked items per click, drawn each epoch (section 4.3)")


class CDAENet(nn.Module):
    """Clicks of B users, their nodes (B, K), drop-out weights -> logits (B, I)."""

    def __init__(self, n_users: int, n_items: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.encode = SparseInput(n_items, hidden)  # W (I, K) and b
        self.user = nn.Embedding(n_users, hidden)  # V
        self.decode = nn.Linear(hidden, n_items)  # W', b'
        self.activation = ACTIVATIONS[activation]
        for w in (self.encode.weight, self.user.weight, self.decode.weight):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.encode.bias)
        nn.init.zeros_(self.decode.bias)

    def forward(self, clicks: Clicks, user_nodes: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        z = self.activation(self.encode(clicks, weights) + user_nodes)
        return self.decode(z)


def dropout_weights(clicks: Clicks, q: float, training: bool) -> torch.Tensor:
    """(nnz,) input values: 1 for each click, or drop-out noise in training."""
    ones = torch.ones(len(clicks.items))
    if not training or q == 0:
        return ones
    return (torch.rand(len(ones)) >= q) / (1 - q)


@register
class CDAE(Recommender):
    """CDAE (Wu et al. 2016) behind the zoo interface; see the module docstring."""

    name = "cdae"
    Config = CDAEConfig
    config: CDAEConfig
    split = "random"
    user_bound = True
    trainer_defaults: ClassVar[dict[str, Any]] = {"valid_mask_history": True}

    def build(self, n_items: int) -> nn.Module:
        c = self.config
        return CDAENet(max(self.n_users, 1), n_items, c.hidden, c.activation)

    @property
    def net(self) -> CDAENet:
        self._check_fitted()
        assert isinstance(self.module_, CDAENet)
        return self.module_

    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled users with clicks: their ids and their clicks, sparse."""
        order = rng.permutation(np.flatnonzero(train.lengths > 0))
        k = self.config.negatives
        if k and getattr(self, "_keys_of", None) != id(train):
            users = np.repeat(np.arange(len(train)), train.lengths)
            self._keys_of, self._keys = id(train), np.unique(users * self.n_items + train.values)
        for rows, clicks in Clicks.batches(train, order, self.config.batch_size):
            batch = {"users": torch.from_numpy(rows), "clicks": clicks}
            if k:
                clicks = batch["clicks"]
                r = np.repeat(clicks.rows.numpy(), k)
                batch["negatives"] = (torch.from_numpy(r), torch.from_numpy(
                    sample_unclicked(self._keys, rows[r], self.n_items, rng)))
            yield batch

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        net, clicks = self.net, batch["clicks"]
        nodes = net.user(batch["users"])
        logits = net(clicks, nodes, dropout_weights(clicks, self.config.corruption, True))
        if "negatives" in batch:  # clicks and sampled unclicked items only
            r, j = batch["negatives"]
            pos, neg = logits[clicks.rows, clicks.items], logits[r, j]
            bce = (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")
                   + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg),
                                                        reduction="sum")) / clicks.n
        else:
            target = torch.zeros_like(logits)
            target[clicks.rows, clicks.items] = 1.0
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / clicks.n
        l2 = (net.encode.weight.pow(2).sum() + net.decode.weight.pow(2).sum()
              + nodes.pow(2).sum())
        return bce + self.config.reg / 2 * l2 / clicks.n

    def score_index(self, histories: Sequence[np.ndarray],
                    users: np.ndarray | None = None) -> torch.Tensor:
        """Reconstruction logits of the clean clicks; table users with their node."""
        net = self.net
        users = np.full(len(histories), -1) if users is None else np.asarray(users)
        known = torch.from_numpy((users >= 0) & (users < self.n_users))
        nodes = net.user(torch.from_numpy(np.where(known.numpy(), users, 0)))
        nodes = torch.where(known.unsqueeze(1), nodes, net.user.weight.mean(0))
        clicks = Clicks.of(histories)
        return net(clicks, nodes, dropout_weights(clicks, 0.0, False))

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"hidden": 16, "batch_size": 16, "corruption": 0.2},
                "trainer": {"epochs": 10, "lr": 2e-2}}
