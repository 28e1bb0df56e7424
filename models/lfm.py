"""Local Factor Models (Elfm): inductive users, differentiable latent co-clustering.

Why: local models (one model per like-minded subgroup of users) rank better than one
global model, but they cost a model per subgroup and cannot place a user they never
saw. Elfm learns the subgroups and the preferences together, keeps only item
parameters, and represents any user, new or old, by attention over the items they
clicked: a candidate generator that folds in unseen users without retraining.

The network (our reading of Yang et al., section 3; interpretations marked *):

- Items only: an embedding table E (I, N), N = `clusters` (8..2048). Row e_i is item
  i's raw score in each of the N latent co-clusters; its membership is b_i = ReLU(e_i).
- Inductive user, N-head attention pooling: head c has a query q_c (h = `key_dim`);
  the keys of the clicked items are k_j = W_k e_j (h). Head c's output is the
  attention-weighted cluster-c score of the user's items,
  a_uc = sum_j softmax_j(q_c . k_j / sqrt(h)) e_jc, and the user's membership is
  ReLU(a_u) (N heads -> an N-dimensional membership vector). *The paper's "N-head
  self-attention" is read as attention pooling with one learned query per head and
  per-head scalar values (the head's own coordinate), which keeps the user side at
  2 N h parameters.
- Differentiable latent co-clustering, min-sum pooling: a user and an item share
  cluster c as much as the smaller of their memberships, and the scores of the shared
  clusters add up: score(u, i) = sum_c min(ReLU(a_uc), ReLU(e_ic)) + d_i. For
  non-negative vectors sum_c min(x_c, y_c) = (|x|_1 + |y|_1 - |x - y|_1) / 2, so the
  (B, I) matrix takes one L1 `torch.cdist`, never a (B, I, N) tensor. *d_i is an
  optional item bias (`item_bias`, a softmax's popularity offset; not in the paper).
- Loss: the multinomial log-likelihood of the user's clicks under softmax over all
  items, as VAE-CF (models/mult_vae.py). *In training a share `dropout` of each user's
  clicks is hidden from the encoder (Mult-VAE's input dropout, here on the attention's
  items), while every click stays a target, so the model cannot just copy its input.

A user with no known click pools to zero membership and gets the item biases (a
popularity ranking). Parameters: I N (+ I) + 2 N h, independent of the number of users.

Example:
    >>> import numpy as np
    >>> model = LFM(clusters=8, key_dim=4)
    >>> model.prepare(np.array([10, 20, 30]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Longqi Yang, Tobias Schnabel, Paul N. Bennett and Susan Dumais. *Local Factor Models
    for Large-Scale Inductive Recommendation*. RecSys 2021.
    https://doi.org/10.1145/3460231.3474276
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.mult_vae import Clicks, multinomial_nll
from models.recommender import Recommender, register
from models.splits import Ragged


class LFMConfig(BaseModel):
    """Clusters, attention width and input dropout; optimisation lives in `TrainerConfig`.

    Defaults: the best of docs/lfm.md on validation NDCG@20 (ml-100k, strong split).
    """

    clusters: int = Field(512, ge=8, le=2048, description="N: co-clusters = attention heads")
    key_dim: int = Field(32, ge=1, description="h: width of the attention keys and queries")
    dropout: float = Field(0.5, ge=0, lt=1, description="clicks hidden from the encoder")
    batch_size: int = Field(32, ge=1, description="users per step")
    item_bias: bool = Field(True, description="add a learned offset per item to the score")
    init_std: float = Field(0.1, gt=0, description="std of the initial item scores")


def min_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, I) sum_c min(a_bc, b_ic) of non-negative a (B, N) and b (I, N), via the L1
    distance (min(x, y) = (x + y - |x - y|) / 2), in O(B I) memory."""
    return 0.5 * (a.sum(dim=1, keepdim=True) + b.sum(dim=1) - torch.cdist(a, b, p=1))


def segment_softmax_pool(logits: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                         n_rows: int) -> torch.Tensor:
    """(n_rows, N) per-row, per-head softmax(logits)-weighted sums of `values`.

    logits, values: (nnz, N); `rows` (nnz,) the row of each entry. A row with no entry
    pools to 0. The flat layout avoids padding histories to the longest (ml-100k: 737).
    """
    index = rows.unsqueeze(1).expand_as(logits)
    top = torch.full((n_rows, logits.shape[1]), -torch.inf).scatter_reduce(
        0, index, logits.detach(), reduce="amax")
    weights = torch.exp(logits - top[rows])
    total = torch.zeros(n_rows, logits.shape[1]).index_add(0, rows, weights)
    pooled = torch.zeros(n_rows, logits.shape[1]).index_add(0, rows, weights * values)
    return pooled / total.clamp(min=torch.finfo(total.dtype).tiny)


class HeadPooling(nn.Module):
    """N-head attention pooling of item rows (nnz, N) into user rows (B, N): head c
    weighs the items by softmax(q_c . W_k e_j / sqrt(h)) and averages their c-th score."""

    def __init__(self, clusters: int, key_dim: int) -> None:
        super().__init__()
        self.keys = nn.Linear(clusters, key_dim, bias=False)
        self.queries = nn.Parameter(torch.empty(clusters, key_dim))
        nn.init.normal_(self.queries, std=1.0 / math.sqrt(key_dim))

    def forward(self, items: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        logits = self.keys(items) @ self.queries.T / math.sqrt(self.queries.shape[1])
        return segment_softmax_pool(logits, items, rows, n_rows)


class LFMNet(nn.Module):
    """Clicks (B users) -> logits (B, I) by min-sum co-clustering (module docstring)."""

    def __init__(self, n_items: int, clusters: int, key_dim: int, dropout: float,
                 item_bias: bool, init_std: float) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items, clusters)
        nn.init.normal_(self.items.weight, std=init_std)
        self.pool = HeadPooling(clusters, key_dim)
        self.bias = nn.Parameter(torch.zeros(n_items)) if item_bias else None
        self.dropout = dropout

    def user_membership(self, clicks: Clicks) -> torch.Tensor:
        """(B, N) ReLU of the pooled cluster scores; training hides `dropout` of the clicks."""
        items, rows = clicks.items, clicks.rows
        if self.training and self.dropout > 0:
            keep = torch.rand(items.shape) >= self.dropout
            items, rows = items[keep], rows[keep]
        return F.relu(self.pool(self.items(items), rows, clicks.n))

    def item_membership(self) -> torch.Tensor:
        return F.relu(self.items.weight)

    def forward(self, clicks: Clicks) -> torch.Tensor:
        logits = min_sum(self.user_membership(clicks), self.item_membership())
        return logits if self.bias is None else logits + self.bias


@register
class LFM(Recommender):
    """Elfm (Yang et al. 2021) behind the zoo interface; see the module docstring."""

    name = "lfm"
    Config = LFMConfig
    config: LFMConfig
    split = "strong"  # inductive: held-out users, fold-in 80%, rank the rest
    trainer_defaults: ClassVar[dict[str, Any]] = {"valid_mask_history": True}

    def build(self, n_items: int) -> nn.Module:
        c = self.config
        return LFMNet(n_items, c.clusters, c.key_dim, c.dropout, c.item_bias, c.init_std)

    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[Clicks]:
        """Shuffled users with at least one click (held-out users have none): their clicks."""
        order = rng.permutation(np.flatnonzero(train.lengths > 0))
        for _, clicks in Clicks.batches(train, order, self.config.batch_size):
            yield clicks

    def loss(self, batch: Clicks) -> torch.Tensor:
        assert self.module_ is not None
        return multinomial_nll(self.module_(batch), batch)

    def score_index(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        assert self.module_ is not None
        return self.module_(Clicks.of(histories))

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"clusters": 16, "key_dim": 8, "batch_size": 16},
                "trainer": {"epochs": 15, "lr": 3e-2}}


def parameter_count(model: Recommender) -> int:
    """Trainable weights of a fitted model (the paper's model-size axis)."""
    assert model.module_ is not None
    return sum(p.numel() for p in model.module_.parameters() if p.requires_grad)
