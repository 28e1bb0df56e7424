"""Mult-VAE and Mult-DAE: variational / denoising autoencoders with a multinomial likelihood.

Why: a user's clicks are one draw from a multinomial over the items; an autoencoder that
reconstructs the click vector through a softmax ranks all items at once and folds in a
new user from their clicks alone (one forward pass, no retraining), which is what the
engine needs of a candidate generator.

The networks (Liang et al., section 2):

- `MultVAENet`: x (B, I) -> L2-normalise -> dropout (input corruption) -> tanh MLP ->
  (mu, logvar) (B, Z); z = mu + eps * sigma in training, z = mu when scoring; tanh MLP
  decoder -> logits (B, I). Loss = -sum_i log softmax(logits)_i x_i + beta * KL, averaged
  over the batch, with beta annealed linearly from 0 (`beta_at`: min(anneal_cap,
  step / total_anneal_steps), one step per gradient update).
- `MultDAENet`: the same without the latent distribution: dropout-corrupted, normalised
  x -> tanh -> logits; the multinomial log-likelihood alone.

Weights Xavier-uniform, biases N(0, 0.001), as the authors' code. Scoring (fold-in) feeds
the user's clicks, uncorrupted, and ranks the logits.

Example:
    >>> import numpy as np
    >>> model = MultVAE(hidden=16, latent=8)
    >>> model.prepare(np.array([10, 20, 30]))
    >>> model.score_many([np.array([0, 2])]).shape
    torch.Size([1, 3])

References:
    Dawen Liang, Rahul G. Krishnan, Matthew D. Hoffman and Tony Jebara. *Variational
    Autoencoders for Collaborative Filtering*. WWW 2018. https://arxiv.org/abs/1802.05814
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.recommender import Recommender, register
from models.splits import Ragged


class MultVAEConfig(BaseModel):
    """Architecture, corruption and the KL anneal; optimisation lives in `TrainerConfig`."""

    hidden: int = Field(600, ge=0, description="width of the tanh layer (0: none)")
    latent: int = Field(200, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1, description="input corruption")
    batch_size: int = Field(500, ge=1, description="users per step")
    anneal_cap: float = Field(0.2, ge=0, description="largest beta")
    total_anneal_steps: int = Field(200_000, ge=1, description="steps for beta to reach 1")


class MultDAEConfig(BaseModel):
    """Mult-DAE: one tanh layer (the paper's [I -> 200 -> I])."""

    hidden: int = Field(0, ge=0, description="width of an extra tanh layer (0: none)")
    latent: int = Field(200, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1, description="input corruption")
    batch_size: int = Field(500, ge=1, description="users per step")


def beta_at(step: int, anneal_cap: float, total_anneal_steps: int) -> float:
    """The KL weight after `step` updates: linear from 0, capped at `anneal_cap`."""
    return min(anneal_cap, step / total_anneal_steps)


def _mlp(widths: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))


def _init(module: nn.Module) -> None:
    """Xavier-uniform weights, N(0, 0.001) biases (the authors' initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear | SparseInput):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=0.001)


@dataclass(frozen=True)
class Clicks:
    """A batch of users' clicks, sparse: `items` of user row b lie in
    ``items[offsets[b]:offsets[b+1]]``; the (B, I) 0/1 matrix without building it."""

    items: torch.Tensor  # (nnz,) int64
    offsets: torch.Tensor  # (B,) int64, start of each row
    rows: torch.Tensor  # (nnz,) int64, the row of each click

    @classmethod
    def of(cls, histories: Sequence[np.ndarray], distinct: bool = True) -> Clicks:
        """Distinct items per history (a repeated click counts once), or, with
        ``distinct=False``, every entry in its given order (to pair with weights)."""
        rows = [np.unique(np.asarray(h, dtype=np.int64)) if distinct
                else np.asarray(h, dtype=np.int64) for h in histories]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        items = np.concatenate(rows) if len(rows) else np.zeros(0, np.int64)
        return cls(torch.from_numpy(items), torch.from_numpy(np.cumsum(lengths) - lengths),
                   torch.from_numpy(np.repeat(np.arange(len(rows)), lengths)))

    @classmethod
    def of_rows(cls, rows: Ragged) -> Clicks:
        """Every entry of `rows` as given (`Ragged.distinct` holds them deduplicated)."""
        offsets = torch.from_numpy(rows.offsets[:-1].copy())
        return cls(torch.from_numpy(rows.values), offsets,
                   torch.from_numpy(np.repeat(np.arange(len(rows)), rows.lengths)))

    @classmethod
    def batches(cls, train: Ragged, order: np.ndarray, size: int
                ) -> Iterator[tuple[np.ndarray, Clicks]]:
        """(users, their distinct clicks) for each run of `size` users of `order`; the
        deduplication is done once per epoch, not once per user."""
        distinct = train.distinct
        for start in range(0, len(order), size):
            users = order[start:start + size]
            yield users, cls.of_rows(distinct.take(users))

    @property
    def n(self) -> int:
        return len(self.offsets)

    def counts(self) -> torch.Tensor:
        return torch.bincount(self.rows, minlength=self.n)


class SparseInput(nn.Module):
    """The first layer, W x + b, for 0/1 click rows x: a weighted sum of W's rows.

    Same values as ``nn.Linear(n_items, width)`` on the dense matrix, at the cost of the
    clicks (nnz x width) instead of B x I x width (ml-100k rows are ~6% dense).
    weight: (I, width); `weights` (nnz,) scale each click (normalisation, dropout).
    """

    def __init__(self, n_items: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_items, width))
        self.bias = nn.Parameter(torch.empty(width))

    def forward(self, clicks: Clicks, weights: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(clicks.items, self.weight, clicks.offsets, mode="sum",
                               per_sample_weights=weights) + self.bias


def corrupted_input(clicks: Clicks, dropout: float, training: bool) -> torch.Tensor:
    """(nnz,) values of dropout(x / ||x||_2): L2-normalised rows, then input dropout."""
    norm = clicks.counts().clamp(min=1).to(torch.float32).rsqrt()[clicks.rows]
    if training and dropout > 0:
        keep = torch.rand(norm.shape) >= dropout
        norm = norm * keep / (1 - dropout)
    return norm


def _tanh_stack(h: torch.Tensor, layers: nn.ModuleList, last_linear: bool = True
                ) -> torch.Tensor:
    for i, layer in enumerate(layers):
        h = layer(h)
        if i < len(layers) - 1 or not last_linear:
            h = torch.tanh(h)
    return h


class MultVAENet(nn.Module):
    """Clicks (B users) -> logits (B, I), mu (B, Z), logvar (B, Z)."""

    def __init__(self, n_items: int, hidden: int, latent: int, dropout: float) -> None:
        super().__init__()
        first = hidden or 2 * latent
        self.input = SparseInput(n_items, first)
        self.encoder = _mlp([first, 2 * latent] if hidden else [])
        self.decoder = _mlp([latent, *([hidden] if hidden else []), n_items])
        self.dropout, self.latent = dropout, latent
        _init(self)

    def forward(self, clicks: Clicks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.input(clicks, corrupted_input(clicks, self.dropout, self.training))
        if len(self.encoder):
            h = _tanh_stack(torch.tanh(h), self.encoder)
        mu, logvar = h[:, :self.latent], h[:, self.latent:]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return _tanh_stack(z, self.decoder), mu, logvar


class MultDAENet(nn.Module):
    """Clicks (B users) -> logits (B, I) through tanh layers: [I -> (hidden) -> latent -> I]."""

    def __init__(self, n_items: int, hidden: int, latent: int, dropout: float) -> None:
        super().__init__()
        widths = [*([hidden] if hidden else []), latent]
        self.input = SparseInput(n_items, widths[0])
        self.encoder = _mlp(widths)
        self.decoder = _mlp([*widths[::-1], n_items])
        self.dropout = dropout
        _init(self)

    def forward(self, clicks: Clicks) -> torch.Tensor:
        h = torch.tanh(self.input(clicks, corrupted_input(clicks, self.dropout, self.training)))
        h = _tanh_stack(h, self.encoder, last_linear=False)
        return _tanh_stack(h, self.decoder)


def multinomial_nll(logits: torch.Tensor, clicks: Clicks) -> torch.Tensor:
    """-sum_i x_i log softmax(logits)_i, averaged over the users of the batch (x 0/1)."""
    log_p = F.log_softmax(logits, dim=1)
    return -log_p[clicks.rows, clicks.items].sum() / clicks.n


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over the latent, averaged over users."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


class _UserAutoencoder(Recommender):
    """Shared by the user-vector autoencoders: batches of users' click rows."""

    split = "random"  # general CF: random 8:1:1, full ranking, training items masked
    trainer_defaults: ClassVar[dict[str, Any]] = {"valid_mask_history": True}

    def batches(self, train: Ragged, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled users with at least one click: their clicks, sparse."""
        users = np.flatnonzero(train.lengths > 0)
        order = rng.permutation(users)
        size = self.config.batch_size  # type: ignore[attr-defined]
        for rows, clicks in Clicks.batches(train, order, size):
            yield {"users": torch.from_numpy(rows), "clicks": clicks}


@register
class MultVAE(_UserAutoencoder):
    """Mult-VAE (Liang et al. 2018) behind the zoo interface; see the module docstring."""

    name = "multvae"
    Config = MultVAEConfig
    config: MultVAEConfig

    def build(self, n_items: int) -> nn.Module:
        self.step_ = 0  # gradient updates so far, for the beta schedule
        c = self.config
        return MultVAENet(n_items, c.hidden, c.latent, c.dropout)

    @property
    def beta(self) -> float:
        return beta_at(self.step_, self.config.anneal_cap, self.config.total_anneal_steps)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.module_ is not None
        logits, mu, logvar = self.module_(batch["clicks"])
        beta = self.beta
        self.step_ += 1
        return multinomial_nll(logits, batch["clicks"]) + beta * gaussian_kl(mu, logvar)

    def score_index(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        assert self.module_ is not None
        return self.module_(Clicks.of(histories))[0]

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"hidden": 32, "latent": 16, "batch_size": 16,
                           "total_anneal_steps": 100},
                "trainer": {"epochs": 10, "lr": 1e-2}}


@register
class MultDAE(_UserAutoencoder):
    """Mult-DAE (Liang et al. 2018) behind the zoo interface; see the module docstring."""

    name = "multdae"
    Config = MultDAEConfig
    config: MultDAEConfig

    def build(self, n_items: int) -> nn.Module:
        c = self.config
        return MultDAENet(n_items, c.hidden, c.latent, c.dropout)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.module_ is not None
        return multinomial_nll(self.module_(batch["clicks"]), batch["clicks"])

    def score_index(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        assert self.module_ is not None
        return self.module_(Clicks.of(histories))

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"config": {"latent": 16, "batch_size": 16},
                "trainer": {"epochs": 10, "lr": 1e-2}}
