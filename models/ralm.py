"""RALM: Real-time Attention based Look-alike Model (Liu et al., KDD 2019).

Two towers, trained in two stages:

1. :class:`UserTower` turns a user's feature fields into a *universal
   embedding*: one vector per field (:class:`FieldEmbedding`), merged by
   attention (:class:`AttentionMerge`) and an MLP. It is trained as a
   multi-class classifier over items with a sampled softmax
   (``models.train_ralm``); :class:`ItemSoftmax` holds the output item table.
2. :class:`LookalikeTower` maps universal embeddings through a transforming
   layer into the look-alike space, where each item is represented by the
   k-means centroids of its seed users. A user is scored against an item by
   local attention (user-dependent) and global attention (user-independent)
   over the centroids: score = α·cos(E_u, E_global) + β·cos(E_u, E_local).

:class:`RalmModel` wraps both for serving: numpy in, numpy out, and is the one
code path of the online workers.

Shapes: B users, C candidate items per user, k centroids per item, n fields,
m universal dimension, h look-alike dimension, a attention dimension.

References:
    Yudan Liu, Kaikai Ge, Xu Zhang, Leyu Lin. Real-time Attention Based
    Look-alike Model for Recommender System. KDD 2019. arXiv:1906.05022.

Why one module of this size: the configuration, both towers, the attention and the
checkpoint format are one model; training and the numpy serving path are apart
(``models/train_ralm.py``, ``models/ralm_serving.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.features import FeatureSpace, Profile, UserBatch
from models.ralm_serving import NumpyTowers, score_slots

KIND = "ralm"
N_FIELDS = 6  # gender, occupation, zip prefix, clicked items, their genres, continuous


class RalmConfig(BaseModel):
    """Hyper-parameters of both towers and both training stages.

    The defaults were chosen on inner folds of the cold-item audience protocol
    (``lookalike evaluate audience --inner``: items of each fold's own training
    part, never its test items; docs/ralm.md, "Tried on inner folds"): stage 2
    by episodes of the audience task with the user tower fine-tuned
    (``lookalike_examples="episodes"``), a linear transforming layer, stage-2
    learning rate 3e-3 and the activity prior. Each raised the inner-fold
    audience figures; a history of 200 clicks, k-means with one centroid per 5
    seeds, a learning rate of 1e-2 and episodes without the item-side term did
    not. Stage 1 (the user tower) keeps the settings chosen on the time split's
    validation part: cosine softmax, 10 negatives. The paper's stage 2
    (``"inner_cut"``) and the leave-one-out one remain options.
    """

    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads while training")
    history_len: int = Field(50, ge=1, description="recent clicks the user tower reads")
    # user tower
    embed_dim: int = Field(128, ge=1, description="m: field and universal embedding size")
    attention_dim: int = Field(64, ge=1, description="a: attention-merge hidden size")
    merge: Literal["attention", "concat"] = "attention"
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=1)
    user_epochs: int = Field(10, ge=0)
    positives_per_user: int = Field(50, ge=1, description="most recent training clicks used")
    negatives: int = Field(10, ge=1, description="sampled negatives per positive")
    user_softmax: Literal["dot", "cosine"] = Field(
        "cosine", description="stage-1 logits: u·e_j + b_j, or scale·cos(u, e_j) + b_j")
    softmax_scale: float = Field(10.0, gt=0, description="logit scale of the cosine softmax")
    # look-alike tower
    dim: int = Field(128, ge=1, description="h: look-alike (transformed) embedding size")
    k: int = Field(20, ge=1, description="seed centroids per item")
    seeds_per_centroid: int = Field(
        1, ge=1, description="k-means opens a centroid per this many seeds, at most k "
        "(WindowConfig.seeds_per_centroid: the clustering worker's must agree)")
    max_seeds: int = Field(256, ge=1, description="most recent seeds per item (the window size)")
    lookalike_examples: Literal["inner_cut", "leave_out", "episodes"] = Field(
        "episodes", description="stage-2 examples: seeds before an inner time cut and "
        "positives after it, every click with the clicker left out of the item's seeds, or "
        "episodes of the audience task (both towers trained; models/episodes.py)")
    inner_cut: float = Field(0.6, gt=0, lt=1, description="seed/positive time quantile")
    lookalike_negatives: int = Field(4, ge=1, description="random unclicked items per positive")
    lookalike_sampling: Literal["uniform", "popularity", "mixed"] = Field(
        "uniform", description="stage-2 negatives: uniform over seeded items, by seed count, "
        "or half of each")
    lookalike_negative_side: Literal["item", "user", "both"] = Field(
        "item", description="stage-2 negatives: the user with an unclicked item, the item "
        "with a user who did not click it, or half of each")
    lookalike_user_sampling: Literal["uniform", "activity", "mixed"] = Field(
        "uniform", description="user-side negatives: uniform over users, by their training "
        "clicks (active users are most of an audience's positives), or half of each")
    lookalike_lr: float | None = Field(3e-3, gt=0, description="stage-2 learning rate (None: lr)")
    lookalike_batch_size: int | None = Field(
        None, ge=1, description="stage-2 batch size (None: batch_size)")
    lookalike_epochs: int = Field(6, ge=0)
    episode_items: int = Field(32, ge=2, description="training items per episode")
    episode_steps: int = Field(600, ge=0, description="episodes (optimiser steps) in stage 2")
    episode_seeds: tuple[int, ...] = Field(
        (1, 2, 5, 10, 20, 50), min_length=1, description="seed counts an episode draws from")
    episode_item_weight: float = Field(
        0.5, ge=0, description="weight of the item-side term (each positive user against the "
        "episode's other items): keeps the user view")
    transform: Literal["relu", "linear"] = Field(
        "linear", description="look-alike transforming layer: Linear + ReLU (the paper) or Linear")
    activity_prior: bool = Field(
        True, description="audience scores add a learned γ·log(1 + user's clicks) to the "
        "cosine score (a prior outside the cosine; rankings of items per user are unchanged)")
    seed_count_scale: bool = Field(
        False, description="with the activity prior: the score's scale grows as "
        "(item's seeds)^s, s learned, so the prior can weigh more when an item has few seeds")
    global_dim: int = Field(32, ge=1, description="hidden size of the global attention")
    alpha: float = Field(0.3, description="weight of the global-attention cosine")
    beta: float = Field(0.7, description="weight of the local-attention cosine")
    tau_init: float = Field(5.0, description="initial scale of the score in the pCTR logit")

    @classmethod
    def tiny(cls, **overrides: object) -> RalmConfig:
        """Small settings that train in a few seconds (tests)."""
        base: dict[str, object] = dict(
            embed_dim=16, attention_dim=8, dim=16, k=4, history_len=10,
            user_epochs=3, lookalike_epochs=3, batch_size=64, max_seeds=32,
            episode_steps=60, episode_items=8,
        )
        return cls(**(base | overrides))


# ---------------------------------------------------------------- user tower


def _init_embedding(e: nn.Embedding | nn.EmbeddingBag, std: float = 0.1) -> None:
    """Small normal init; the padding row stays zero."""
    nn.init.normal_(e.weight, std=std)
    if e.padding_idx is not None:
        with torch.no_grad():
            e.weight[e.padding_idx].zero_()


class FieldEmbedding(nn.Module):
    """One m-vector per feature field: UserBatch -> H [B, n=6, m].

    Univalent fields embed their value; multivalent fields (clicked items,
    their genres) take the mean embedding of their values, padding excluded;
    the continuous fields go through one Linear.
    """

    def __init__(self, features: FeatureSpace, m: int):
        super().__init__()
        self.categorical = nn.ModuleList(
            nn.Embedding(card, m, padding_idx=0) for card in features.cardinalities()
        )
        self.items = nn.EmbeddingBag(features.n_items + 1, m, mode="mean", padding_idx=0)
        self.genres = nn.Embedding(features.n_genres + 1, m, padding_idx=0)
        self.continuous = nn.Linear(3, m)
        for e in (*self.categorical, self.items, self.genres):
            _init_embedding(e)

    def forward(self, batch: UserBatch) -> torch.Tensor:
        cats = [emb(batch.categorical[:, i]) for i, emb in enumerate(self.categorical)]
        items = self.items(batch.items)  # all-padding rows give zeros
        total = batch.genres.sum(1, keepdim=True).clamp(min=1.0)
        genres = (batch.genres / total) @ self.genres.weight  # weighted mean over values
        cont = self.continuous(batch.continuous)
        return torch.stack([*cats, items, genres, cont], dim=1)


class AttentionMerge(nn.Module):
    """Attention over fields: H [B, n, m] -> M [B, m] (and weights [B, n]).

    u = tanh(H W1), weights = softmax_n(u W2), M = Σ_n weights·H: the model
    learns which fields matter instead of concatenating them all, so strong
    fields (the click history) cannot drown the others (the paper's §4.2).
    """

    def __init__(self, m: int, a: int):
        super().__init__()
        self.w1 = nn.Linear(m, a, bias=False)
        self.w2 = nn.Linear(a, 1, bias=False)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """[B, n] attention weight per field."""
        return torch.softmax(self.w2(torch.tanh(self.w1(h))).squeeze(-1), dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.weights(h).unsqueeze(1) @ h).squeeze(1)


class ConcatMerge(nn.Module):
    """Baseline merge: H [B, n, m] -> [B, n·m] (the MLP reduces it)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.flatten(1)


class ItemSoftmax(nn.Module):
    """Output item table of the multi-class objective: logits u·e_j + b_j.

    With ``scale`` s (``user_softmax="cosine"``): s·cos(u, e_j) + b_j. Only
    the direction of u then counts, so users who click the same items end up
    with close directions: the cosine geometry the look-alike tower works in.

    Index j is the item's embedding index (1..D, most clicked first); row 0 is unused.
    """

    def __init__(self, n_items: int, m: int, scale: float | None = None):
        super().__init__()
        self.scale = scale  # None: dot product; else scale·cos(u, e_j)
        self.weight = nn.Embedding(n_items + 1, m)
        self.bias = nn.Embedding(n_items + 1, 1)
        _init_embedding(self.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users [B, m], items [B, S] -> logits [B, S]."""
        e = self.weight(items)
        if self.scale is not None:
            e, users = F.normalize(e, dim=-1) * self.scale, F.normalize(users, dim=-1)
        return (e @ users.unsqueeze(-1)).squeeze(-1) + self.bias(items).squeeze(-1)


class UserTower(nn.Module):
    """UserBatch -> universal embedding [B, m]."""

    def __init__(self, features: FeatureSpace, cfg: RalmConfig):
        super().__init__()
        m = cfg.embed_dim
        self.fields = FieldEmbedding(features, m)
        if cfg.merge == "attention":
            self.merge: nn.Module = AttentionMerge(m, cfg.attention_dim)
            merged = m
        else:
            self.merge = ConcatMerge()
            merged = N_FIELDS * m
        self.mlp = nn.Sequential(nn.Linear(merged, m), nn.ReLU(), nn.Linear(m, m))
        scale = cfg.softmax_scale if cfg.user_softmax == "cosine" else None
        self.output = ItemSoftmax(features.n_items, m, scale)  # stage-1 objective only

    def forward(self, batch: UserBatch) -> torch.Tensor:
        return self.mlp(self.merge(self.fields(batch)))


# ---------------------------------------------------------------- look-alike tower


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` (bool); masked slots and all-masked rows get 0."""
    return torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask


class LookalikeTower(nn.Module):
    """Transforming layer and the local/global attention over seed centroids.

    Global attention: the paper prints E_global = E_s softmax(tanh(W_g E_sᵀ)),
    whose shapes do not compose for k centroids of size h. Our reading:
    s_j = w_gᵀ tanh(W_g e_j) per centroid e_j (W_g: g×h, w_g: g), weights =
    softmax_j(s_j), E_global = Σ_j weights_j e_j. It does not depend on the
    user, so it can be computed once per item and indexed for retrieval.

    Local attention: weights = softmax_j(tanh(E_u W_l e_jᵀ)), E_local = Σ_j
    weights_j e_j: the seeds that resemble this user count most.

    Only centroids with a positive count (non-empty k-means slots) take part.
    """

    def __init__(self, cfg: RalmConfig):
        super().__init__()
        m, h = cfg.embed_dim, cfg.dim
        self.alpha, self.beta = cfg.alpha, cfg.beta
        layers: list[nn.Module] = [nn.Linear(m, h)]
        if cfg.transform == "relu":
            layers.append(nn.ReLU())
        self.transform = nn.Sequential(*layers)
        self.local_w = nn.Linear(h, h, bias=False)  # E_u W_l == local_w(E_u)
        self.global_proj = nn.Linear(h, cfg.global_dim, bias=False)  # W_g
        self.global_w = nn.Linear(cfg.global_dim, 1, bias=False)  # w_g
        self.tau = nn.Parameter(torch.tensor(float(cfg.tau_init)))
        self.bias = nn.Parameter(torch.zeros(()))
        if cfg.activity_prior:  # only then in the state dict: older checkpoints still load
            self.prior = nn.Parameter(torch.zeros(()))
        if cfg.seed_count_scale:
            self.seed_scale = nn.Parameter(torch.zeros(()))

    def global_attention(self, centroids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """centroids [..., k, h], mask [..., k] -> L2-normalised E_global [..., h]."""
        s = self.global_w(torch.tanh(self.global_proj(centroids))).squeeze(-1)
        w = masked_softmax(s, mask)
        return F.normalize((w.unsqueeze(-2) @ centroids).squeeze(-2), dim=-1)

    def local_attention(
        self, users: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """users [B, h], centroids [B, C, k, h], mask [B, C, k] -> E_local [B, C, h]."""
        q = self.local_w(users)  # [B, h]
        w = masked_softmax(torch.tanh(torch.einsum("bckh,bh->bck", centroids, q)), mask)
        return torch.einsum("bck,bckh->bch", w, centroids)

    def score(
        self,
        users: torch.Tensor,
        centroids: torch.Tensor,
        mask: torch.Tensor,
        item_global: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """α·cos(E_u, E_global) + β·cos(E_u, E_local) -> [B, C].

        users [B, h], centroids [B, C, k, h], mask [B, C, k], item_global
        [B, C, h] (L2-normalised, as :meth:`global_attention` returns it).
        """
        if item_global is None:
            item_global = self.global_attention(centroids, mask)
        u = F.normalize(users, dim=-1).unsqueeze(-1)  # [B, h, 1]
        local = F.normalize(self.local_attention(users, centroids, mask), dim=-1)
        return self.alpha * (item_global @ u).squeeze(-1) + self.beta * (local @ u).squeeze(-1)

    def score_all(self, users: torch.Tensor, centroids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Every user against every item: users [U, h], centroids [C, k, h], mask [C, k]
        -> [U, C], equal to :meth:`score` pair by pair (tested). As in
        :meth:`RalmModel.score_table`, E_local·u = w·(E u) and ||E_local||² = wᵀ(E Eᵀ)w, so
        the [U, C, h] local embeddings are never formed (episodes score every user for
        every item, forward and backward)."""
        glob = self.global_attention(centroids, mask)  # [C, h]
        u = F.normalize(users, dim=-1)
        w = masked_softmax(torch.tanh(torch.einsum("ckh,uh->uck", centroids,
                                                   self.local_w(users))), mask)
        dots = torch.einsum("ckh,uh->uck", centroids, u)
        gram = centroids @ centroids.transpose(1, 2)  # [C, k, k]
        sq = torch.einsum("uck,ckl,ucl->uc", w, gram, w).clamp(min=1e-24)
        local_cos = (w * dots).sum(-1) / sq.sqrt().clamp(min=1e-12)
        return self.alpha * (u @ glob.T) + self.beta * local_cos

    def logit(self, score: torch.Tensor) -> torch.Tensor:
        """pCTR logit τ·score + b (the cosines live in [-1, 1]; τ scales them)."""
        return self.tau * score + self.bias

    def scale(self, n_seeds: torch.Tensor) -> torch.Tensor:
        """The score's scale in the audience logit: τ, or τ·n^s with ``seed_count_scale``."""
        s = getattr(self, "seed_scale", None)
        return self.tau if s is None else self.tau * n_seeds.clamp(min=1.0) ** s

    def prior_weight(self, n_seeds: float = 1.0) -> float:
        """γ / scale: the activity prior in score units (0 without one), so that ranking an
        item's audience by score + weight·log(1 + clicks) is ranking by the trained logit."""
        prior = getattr(self, "prior", None)
        if prior is None:
            return 0.0
        with torch.no_grad():
            return float(prior) / float(self.scale(torch.tensor(float(n_seeds))))


# ---------------------------------------------------------------- serving wrapper


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class RalmModel:
    """Trained RALM for serving: numpy in, numpy out.

    Example:
        >>> model = RalmModel.load(path)                                # doctest: +SKIP
        >>> users = model.embed_users([Profile(age=30)], [[50, 181]])  # [1, h]
        >>> g = model.item_global(centroids, counts)                   # [N, h]
        >>> model.score_user(users[0], centroids, counts, g)           # [N]
    """

    def __init__(
        self,
        config: RalmConfig,
        features: FeatureSpace,
        user_tower: UserTower,
        lookalike: LookalikeTower,
        version: str,
        metrics: dict | None = None,
    ):
        self.config = config
        self.features = features
        self.user_tower = user_tower.eval()
        self.lookalike = lookalike.eval()
        self.version = version
        self.metrics = dict(metrics or {})
        self._numpy: NumpyTowers | None = None
        self._numpy_stamp: tuple[int, ...] = ()
        self._params: list[torch.nn.Parameter] = []

    @classmethod
    def new(cls, config: RalmConfig, features: FeatureSpace, version: str = "") -> RalmModel:
        """Freshly initialised towers (training starts here)."""
        return cls(config, features, UserTower(features, config), LookalikeTower(config), version)

    @property
    def dim(self) -> int:
        """h: size of the look-alike embeddings seeds carry."""
        return self.config.dim

    @property
    def k(self) -> int:
        return self.config.k

    def audience_prior(self, clicks: np.ndarray, n_seeds: float = 1.0) -> np.ndarray:
        """[U] what an audience of an item with ``n_seeds`` seeds adds to each user's score
        for their click counts (zeros unless trained with ``activity_prior``)."""
        w = self.lookalike.prior_weight(n_seeds)
        if w == 0.0:  # no prior: skip the log over every held user (audiences' hot path)
            return np.zeros(len(clicks), np.float32)
        return (w * np.log1p(np.maximum(np.asarray(clicks, np.float64), 0.0))).astype(np.float32)

    # ------------------------------------------------------------ embeddings

    #: up to this many users, :meth:`embed_batch` runs the numpy copy of the
    #: towers (models/ralm_serving.py): torch's dispatch dominates small batches
    numpy_max_batch = 16

    @torch.inference_mode()
    def embed_batch(self, batch: UserBatch) -> np.ndarray:
        """[B, h] look-alike embeddings of encoded users."""
        if len(batch) <= self.numpy_max_batch and not self.user_tower.training:
            return self._numpy_towers().embed(batch)
        return self.lookalike.transform(self.user_tower(batch)).numpy()

    def embed_rows(self, categorical: np.ndarray, continuous: np.ndarray,
                   history_rows: np.ndarray) -> np.ndarray:
        """[B, h] what :meth:`embed_batch` gives for ``features.batch(categorical,
        continuous, history_rows)``; the history's rows in any order. The serving path:
        the numpy towers at every batch size (models/ralm_serving.py says why)."""
        if self.user_tower.training:
            return self.embed_batch(self.features.batch(categorical, continuous, history_rows))
        return self._numpy_towers().embed_rows(categorical, continuous, history_rows)

    def _numpy_towers(self) -> NumpyTowers:
        """The numpy copy, taken again whenever a weight changed (torch counts in-place
        updates in ``Tensor._version``: an optimiser step, ``load_state_dict``)."""
        if not self._params:  # the same Parameter objects for the model's life
            self._params = [*self.user_tower.parameters(), *self.lookalike.parameters()]
        stamp = tuple(p._version for p in self._params)
        if self._numpy is None or self._numpy_stamp != stamp:
            self._numpy, self._numpy_stamp = NumpyTowers.of(self.user_tower, self.lookalike,
                                                         self.features), stamp
        return self._numpy

    def embed_users(
        self,
        profiles: Sequence[Profile | None],
        histories: Sequence[Sequence[int]],
        activity: Sequence[int] | None = None,
    ) -> np.ndarray:
        """[B, h] float32 look-alike embeddings (what seeds carry, what users are scored with).

        ``histories`` hold external item ids, most recent last; ``activity``
        is each user's total click count (default: the history's length).
        """
        if not profiles:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_batch(self.features.encode(profiles, histories, activity))

    @torch.inference_mode()
    def item_global(self, centroids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """centroids [N, k, h], counts [N, k] -> [N, h] L2-normalised global embeddings."""
        return self.lookalike.global_attention(_tensor(centroids), torch.from_numpy(
            np.asarray(counts) > 0)).numpy()

    # ------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score(
        self,
        users: np.ndarray,
        centroids: np.ndarray,
        counts: np.ndarray,
        item_global: np.ndarray | None = None,
    ) -> np.ndarray:
        """0.3·cos(global) + 0.7·cos(local) -> [B, C] float32.

        users [B, h], centroids [B, C, k, h], counts [B, C, k] (0 = empty
        slot), item_global [B, C, h] from :meth:`item_global` (skips recomputing it).
        """
        g = None if item_global is None else _tensor(item_global)
        mask = torch.from_numpy(np.asarray(counts) > 0)
        return self.lookalike.score(_tensor(users), _tensor(centroids), mask, g).numpy()

    def score_table(self, users: np.ndarray, slots: np.ndarray, ok: np.ndarray,
                    centroids: np.ndarray, counts: np.ndarray, item_global: np.ndarray,
                    gram: np.ndarray, explain: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`score` for serving, of the rows ``slots`` [B, C] of a centroid table
        (centroids [N, k, h], counts [N, k], item_global [N, h], gram [N, k, k]) for
        each row's user [B, h]: scores [B, C] (NaN where not ``ok``) and, if
        ``explain``, the local attention weights [B, C, k]. Equal within float32
        rounding (tested).

        ``gram`` holds each item's E Eᵀ over its centroids (user independent, kept
        by the centroid table). Then ||E_local||² = wᵀ G w and E_local·u = w·(E u),
        so each centroid is dotted with E_u and E_u W_l once and the local
        embeddings are never formed; one compiled pass reads the table in place
        (``ralm_serving.score_slots`` says why)."""
        u = np.ascontiguousarray(users, np.float32)
        q = np.ascontiguousarray(u @ self._numpy_towers().local_wt, np.float32)
        scores = np.empty(slots.shape, np.float32)
        att = np.zeros((*slots.shape, centroids.shape[1]) if explain else (0, 0, 0),
                       np.float32)
        score_slots(u, q, np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(ok),
                    centroids, counts, item_global, gram, np.float32(self.lookalike.alpha),
                    np.float32(self.lookalike.beta), scores, att)
        return scores, att if explain else None

    def score_user(
        self,
        user: np.ndarray,
        centroids: np.ndarray,
        counts: np.ndarray,
        item_global: np.ndarray | None = None,
    ) -> np.ndarray:
        """One user [h] over C candidates: centroids [C, k, h], counts [C, k] -> [C]."""
        g = None if item_global is None else np.asarray(item_global)[None]
        return self.score(np.asarray(user)[None], np.asarray(centroids)[None],
                          np.asarray(counts)[None], g)[0]

    # ------------------------------------------------------------ persistence

    def payload(self) -> dict:
        """The checkpoint content (plain Python and tensors only)."""
        return {
            "format": 1,
            "kind": KIND,
            "version": self.version,
            "config": self.config.model_dump(),
            "features": self.features.to_state(),
            "user_tower": self.user_tower.state_dict(),
            "lookalike_tower": self.lookalike.state_dict(),
            "metrics": self.metrics,
            "created_at": time.time(),
        }

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.payload())

    @classmethod
    def load(cls, path: str | Path) -> RalmModel:
        p = load_checkpoint(path, kind=KIND, required=REQUIRED_KEYS)
        try:
            # checkpoints from before these options were trained with the old defaults
            config = RalmConfig.model_validate({"user_softmax": "dot", "transform": "relu",
                                                "activity_prior": False, **p["config"]})
            features = FeatureSpace.from_state(p["features"])
            user_tower, lookalike = UserTower(features, config), LookalikeTower(config)
            user_tower.load_state_dict(p["user_tower"])
            lookalike.load_state_dict(p["lookalike_tower"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: inconsistent RALM checkpoint: {e}") from e
        return cls(config, features, user_tower, lookalike, str(p["version"]), p["metrics"])


REQUIRED_KEYS = ("config", "features", "user_tower", "lookalike_tower", "metrics", "created_at")
