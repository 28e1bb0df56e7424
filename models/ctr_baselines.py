"""CTR baselines on DLRM's features: logistic regression, a factorization machine, counts.

Why these: the issue asks whether DLRM's MLPs and dot interactions earn their keep
over a linear model of the same one-hot/multi-hot features (LR) and over the model
whose pairwise dot products DLRM generalises (FM); item popularity and the item's
training positive rate are the floors any learned model must clear.

Both models read the same (sparse, genres, dense) rows as DLRM and return logits.
Genres are pooled by their mean (as DLRM's EmbeddingBag and RecBole's token_seq fields),
so a movie's genre set is one feature vector, not up to six.

References: S. Rendle, *Factorization Machines*, ICDM 2010 (eq. 1; the O(kn) form is
its Lemma 3.1).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from models.ctr_data import GENRE_FIELD, CTRFrame


class LRConfig(BaseModel):
    """Logistic regression has no architecture settings."""


class FMConfig(BaseModel):
    """Size of the FM's factors."""

    embed_dim: int = Field(16, ge=1, description="k: factor size of every feature")


class LinearTerm(nn.Module):
    """w0 + Σ w_field(value) + mean_genre w_genre + w_dense · x_dense: (B,) logits.

    Logistic regression, FM's first-order part, and DLRM's optional first-order
    term (``bias=False``: its top MLP has the intercept)."""

    def __init__(self, field_sizes: dict[str, int], n_dense: int, bias: bool = True) -> None:
        super().__init__()
        names = [n for n in field_sizes if n != GENRE_FIELD]
        self.weights = nn.ModuleList(nn.Embedding(field_sizes[n], 1, padding_idx=0) for n in names)
        self.genres = nn.EmbeddingBag(field_sizes[GENRE_FIELD], 1, mode="mean", padding_idx=0)
        self.dense = nn.Linear(n_dense, 1, bias=bias)  # its bias is w0
        for t in [*self.weights, self.genres]:
            nn.init.zeros_(t.weight)

    def forward(self, sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        out = self.dense(dense).squeeze(-1) + self.genres(genres).squeeze(-1)
        for i, w in enumerate(self.weights):
            out = out + w(sparse[:, i]).squeeze(-1)
        return out


class LogisticRegression(nn.Module):
    """Logistic regression over one-hot sparse fields, mean-pooled genres and dense values."""

    name = "lr"

    def __init__(self, field_sizes: dict[str, int], n_dense: int,
                 config: LRConfig | None = None) -> None:
        super().__init__()
        self.config = config or LRConfig()
        self.linear = LinearTerm(field_sizes, n_dense)

    def forward(self, sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        return self.linear(sparse, genres, dense)


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} <v_i, v_j> of (B, F, k) vectors in O(kF): ½ Σ_k ((Σ_i v_ik)² - Σ_i v_ik²)."""
    return 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)


class FactorizationMachine(nn.Module):
    """FM (Rendle 2010): the linear model plus <v_i, v_j> x_i x_j over every feature pair.

    A one-hot field contributes its value's factor, genres the mean of theirs (one
    pooled field vector), and each dense feature x_d the vector x_d · v_d.
    """

    name = "fm"

    def __init__(self, field_sizes: dict[str, int], n_dense: int,
                 config: FMConfig | None = None) -> None:
        super().__init__()
        self.config = config or FMConfig()
        k = self.config.embed_dim
        names = [n for n in field_sizes if n != GENRE_FIELD]
        self.linear = LinearTerm(field_sizes, n_dense)
        self.factors = nn.ModuleList(nn.Embedding(field_sizes[n], k, padding_idx=0) for n in names)
        self.genres = nn.EmbeddingBag(field_sizes[GENRE_FIELD], k, mode="mean", padding_idx=0)
        self.dense = nn.Parameter(torch.empty(n_dense, k))
        for t in [*self.factors, self.genres]:
            nn.init.normal_(t.weight, std=0.05)
        nn.init.normal_(self.dense, std=0.05)
        with torch.no_grad():  # row 0: unknown value / genre padding, a zero vector
            for t in [*self.factors, self.genres]:
                t.weight[0].zero_()

    def vectors(self, sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        """(B, F, k) feature vectors x_i v_i of a batch."""
        vecs = [t(sparse[:, i]) for i, t in enumerate(self.factors)]
        vecs.append(self.genres(genres))
        return torch.cat([torch.stack(vecs, dim=1), dense.unsqueeze(-1) * self.dense], dim=1)

    def forward(self, sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        return (self.linear(sparse, genres, dense)
                + fm_interaction(self.vectors(sparse, genres, dense)))


def count_scores(train: CTRFrame, frame: CTRFrame, kind: str, prior: float = 10.0) -> np.ndarray:
    """Non-learned scores of `frame`'s rows from `train`'s labels, by item.

    ``popularity``: the item's training row count. ``item-mean``: its training positive
    rate, shrunk toward the global rate by `prior` pseudo-rows (unseen items get it).
    """
    item_train, item = train.sparse[:, 1], frame.sparse[:, 1]
    size = int(max(item_train.max(initial=0), item.max(initial=0))) + 1
    count = np.bincount(item_train, minlength=size).astype(np.float64)
    if kind == "popularity":
        return count[item]
    if kind == "item-mean":
        pos = np.bincount(item_train, weights=train.label, minlength=size)
        rate = float(train.label.mean())
        return ((pos + prior * rate) / (count + prior))[item]
    raise ValueError(f"kind must be 'popularity' or 'item-mean', got {kind!r}")
