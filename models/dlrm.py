"""DLRM (Naumov et al. 2019): sparse embeddings, dense bottom MLP, dot interactions, top MLP.

One small module per architectural idea (TorchRec's habit), shapes named B (batch),
F (feature vectors), D (embedding size)::

    sparse (B, F_s) ids ─► SparseArch ─► (B, F_s + 1, D)   (one table per field;
    genres (B, G) ids  ─┘                                   genres: EmbeddingBag mean)
    dense (B, n_dense) ─► DenseArch (bottom MLP, ReLU) ─► (B, D)
    [dense vec; sparse vecs] ─► InteractionArch ─► (B, D + F(F-1)/2)
        (dot products of every pair i < j of the F = F_s + 2 vectors, no self terms,
         concatenated with the dense vector, as in the paper's Fig. 1 and its code)
    ─► OverArch (top MLP) ─► logit (B,)   sigmoid(logit) = P(click); loss BCE
    optional (``first_order``, not in the paper): + first_order_term(sparse, genres, dense),
        a per-value scalar bias per sparse field and a linear term on the dense features
        (the "wide" part of Wide&Deep / DeepFM), added to the logit

The model returns logits; the trainer applies ``binary_cross_entropy_with_logits``,
the same loss as sigmoid + BCE without its overflow.

>>> import torch
>>> m = DLRM({"user": 5, "item": 7, "genre": 4}, n_dense=3, config=DLRMConfig(embed_dim=4))
>>> m(torch.tensor([[1, 2]]), torch.tensor([[1, 3, 0]]), torch.zeros(1, 3)).shape
torch.Size([1])

References: M. Naumov et al., *Deep Learning Recommendation Model for Personalization
and Recommendation Systems*, arXiv:1906.00091, 2019.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn

from models.ctr_baselines import LinearTerm
from models.ctr_data import GENRE_FIELD


class DLRMConfig(BaseModel):
    """Architecture of DLRM (the paper leaves sizes to the data set)."""

    embed_dim: int = Field(16, ge=1, description="D: every embedding and the bottom output")
    bottom: list[int] = Field(default_factory=lambda: [32], description="bottom MLP hidden")
    top: list[int] = Field(default_factory=lambda: [64, 32], description="top MLP hidden")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the top MLP")
    interaction_itself: bool = Field(
        False, description="also the self dots <t_i, t_i> (the diagonal of T Tᵀ), the "
        "reference code's --arch-interaction-itself: F(F+1)/2 dots instead of F(F-1)/2")
    init: Literal["torch", "reference"] = Field(
        "torch", description="torch: embeddings N(0, 0.05²), torch's Linear default; "
        "reference: facebookresearch/dlrm's, embeddings U(±1/sqrt(rows)), MLP weights "
        "N(0, 2/(fan_in + fan_out)), biases N(0, 1/fan_out)")
    first_order: bool = Field(
        False, description="an extension beyond Naumov et al. 2019 (the wide/linear part "
        "of Wide&Deep and DeepFM, LR inside DLRM): a scalar bias per value of every sparse "
        "field (an embedding of dim 1 per table, genres mean-pooled like their vectors, "
        "row 0 = unknown fixed at 0) plus a linear term w·x on the dense features, added "
        "to the top MLP's logit before the sigmoid; all zero at the start")

    @field_validator("bottom", "top", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        """Also "64,32" or "[64, 32]" (as `lookalike train --set top=...` gives); "" = none."""
        if isinstance(value, str):
            return [int(v) for v in value.strip("()[] ").split(",") if v.strip()]
        return value


def mlp(sizes: list[int], *, last_relu: bool, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last if `last_relu`)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SparseArch(nn.Module):
    """One embedding table per sparse field, an EmbeddingBag (mean, 0 = pad) for genres.

    ``field_sizes``: field name -> table rows, the sparse fields in column order, the
    genre field last. Returns (B, F_s + 1, D): the sparse fields' vectors, then genres'.
    """

    def __init__(self, field_sizes: dict[str, int], dim: int, init: str = "torch") -> None:
        super().__init__()
        names = [n for n in field_sizes if n != GENRE_FIELD]
        self.tables = nn.ModuleList(nn.Embedding(field_sizes[n], dim, padding_idx=0) for n in names)
        self.genres = nn.EmbeddingBag(field_sizes[GENRE_FIELD], dim, mode="mean",
                                      padding_idx=0)
        for t in [*self.tables, self.genres]:
            if init == "reference":  # dlrm_s_pytorch.py create_emb: U(-1/sqrt(n), 1/sqrt(n))
                bound = 1 / math.sqrt(t.num_embeddings)
                nn.init.uniform_(t.weight, -bound, bound)
            else:
                nn.init.normal_(t.weight, std=0.05)
        with torch.no_grad():  # row 0: unknown value / genre padding, a zero vector
            for t in [*self.tables, self.genres]:
                t.weight[0].zero_()

    @property
    def n_vectors(self) -> int:
        return len(self.tables) + 1

    def forward(self, sparse: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        vecs = [t(sparse[:, i]) for i, t in enumerate(self.tables)]
        vecs.append(self.genres(genres))
        return torch.stack(vecs, dim=1)


class DenseArch(nn.Module):
    """Bottom MLP: (B, n_dense) -> (B, D), ReLU after every layer (the reference code's)."""

    def __init__(self, n_dense: int, hidden: list[int], dim: int) -> None:
        super().__init__()
        self.mlp = mlp([n_dense, *hidden, dim], last_relu=True)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense)


def reference_init_(module: nn.Module) -> None:
    """facebookresearch/dlrm's MLP init (create_mlp): every Linear's weight
    N(0, 2/(fan_in + fan_out)), its bias N(0, 1/fan_out)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            fan_out, fan_in = layer.weight.shape
            nn.init.normal_(layer.weight, std=math.sqrt(2 / (fan_in + fan_out)))
            nn.init.normal_(layer.bias, std=math.sqrt(1 / fan_out))


class InteractionArch(nn.Module):
    """(B, D) dense vector + (B, F_s, D) sparse vectors -> (B, D + F(F-1)/2), F = F_s + 1.

    All vectors are stacked as T (B, F, D); Z = T Tᵀ; the strict upper triangle of Z
    (pairs i < j, no self terms) is concatenated with the dense vector. With `itself`
    the diagonal too (pairs i <= j, F(F+1)/2 dots: the reference code's
    --arch-interaction-itself), which hands the top MLP each vector's squared norm.
    """

    def __init__(self, n_vectors: int, itself: bool = False) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=0 if itself else 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @staticmethod
    def output_size(n_vectors: int, dim: int, itself: bool = False) -> int:
        return dim + n_vectors * (n_vectors + (1 if itself else -1)) // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        t = torch.cat([dense.unsqueeze(1), sparse], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))
        return torch.cat([dense, z[:, self.rows, self.cols]], dim=1)


class OverArch(nn.Module):
    """Top MLP: interaction features -> one logit per row."""

    def __init__(self, in_size: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        self.mlp = mlp([in_size, *hidden, 1], last_relu=False, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


def first_order_term(field_sizes: dict[str, int], n_dense: int) -> LinearTerm:
    """Σ_field b_field(value) + mean_genre b_genre(g) + w · dense: (B,) first-order logits.

    Not part of DLRM (Naumov et al. 2019): the linear model that FM, Wide&Deep and
    DeepFM add to their pairwise/deep part. Tables of dim 1 with the same rows as
    SparseArch's (so hashed ids share buckets the same way); no bias (the top MLP has
    one); every weight starts at zero, so the model starts as the plain DLRM.
    """
    term = LinearTerm(field_sizes, n_dense, bias=False)
    nn.init.zeros_(term.dense.weight)
    return term


class DLRM(nn.Module):
    """The four arches in a row; forward(sparse, genres, dense) -> logits (B,).

    With ``config.first_order`` (an extension, not the paper's model) the logit also
    gets ``first_order_term``'s per-value biases and dense linear term.
    """

    name = "dlrm"

    def __init__(self, field_sizes: dict[str, int], n_dense: int,
                 config: DLRMConfig | None = None) -> None:
        super().__init__()
        self.config = config or DLRMConfig()
        d = self.config.embed_dim
        itself = self.config.interaction_itself
        self.sparse_arch = SparseArch(field_sizes, d, self.config.init)
        self.dense_arch = DenseArch(n_dense, self.config.bottom, d)
        n_vectors = self.sparse_arch.n_vectors + 1
        self.interaction = InteractionArch(n_vectors, itself)
        self.over = OverArch(InteractionArch.output_size(n_vectors, d, itself),
                             self.config.top, self.config.dropout)
        if self.config.init == "reference":
            reference_init_(self.dense_arch)
            reference_init_(self.over)
        # built last, so that the other weights are drawn the same with or without it
        self.first_order: LinearTerm | None = None
        if self.config.first_order:
            self.first_order = first_order_term(field_sizes, n_dense)

    def forward(self, sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        logit = self.over(self.interaction(self.dense_arch(dense),
                                           self.sparse_arch(sparse, genres)))
        if self.first_order is not None:
            logit = logit + self.first_order(sparse, genres, dense)
        return logit
