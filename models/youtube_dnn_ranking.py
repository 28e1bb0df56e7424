"""YouTube DNN's ranking stage: a point-wise network over the candidate generator's
features plus context and history, trained with watch-time-style weights.

Kept apart from the candidate generator (``models/youtube_dnn.py``): a different
model on a different task (CTR rows, ``models/ctr_data.py``), sharing only the idea.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

if TYPE_CHECKING:
    from engine.data import Dataset
    from models.ctr_data import CTRData, CTRFrame
    from models.trainer import TrainResult

class RankConfig(BaseModel):
    """The ranking MLP and its weighted logistic regression."""

    dim: int = Field(16, ge=1, description="width of each sparse field's embedding")
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = Field(0.3, ge=0, lt=1)
    weighted: bool = Field(True, description="positives weigh their rating, negatives 1")
    context: bool = Field(True, description="add the context columns (`with_context`)")
    history_stats: bool = Field(False, description="add the online user/item history "
                                "columns (`history_features`)")
    user_dropout: float = Field(0.5, ge=0, lt=1, description="share of training rows seen "
                                "as a new user (id 0, no activity), as models/ctr_train.py")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(2048, ge=1)
    epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1)
    seed: int = 0


class RankingNet(nn.Module):
    """CTR row (sparse (N, F), genres (N, G), dense (N, C)) -> logit (N,): the fields'
    embeddings, mean-pooled genres and the dense/context columns through a ReLU MLP."""

    name = "youtube-rank"

    def __init__(self, field_sizes: dict[str, int], n_dense: int, cfg: RankConfig) -> None:
        super().__init__()
        from models.ctr_data import GENRE_FIELD, SPARSE_FIELDS

        self.config = cfg
        self.fields = nn.ModuleList(nn.Embedding(field_sizes[f], cfg.dim, padding_idx=0)
                                    for f in SPARSE_FIELDS)
        self.genres = nn.EmbeddingBag(field_sizes[GENRE_FIELD], cfg.dim, mode="mean",
                                      padding_idx=0)
        sizes = [cfg.dim * (len(SPARSE_FIELDS) + 1) + n_dense, *cfg.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(cfg.dropout)]
        self.mlp = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))

    def forward(self, sparse: torch.Tensor, genres: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        parts = [t(sparse[:, f]) for f, t in enumerate(self.fields)]
        return self.mlp(torch.cat([*parts, self.genres(genres), dense], dim=1)).squeeze(1)


def context_features(data: Dataset) -> np.ndarray:
    """(N, 2) per rating of `data`: log1p(hours since the user's previous rating),
    standardised later, and 1 for a user's first rating. Known at serving time."""
    order = np.lexsort((data.ts, data.user))
    prev = np.full(len(data), np.nan)
    same = data.user[order][1:] == data.user[order][:-1]
    gap = np.diff(data.ts[order])
    prev[order[1:][same]] = gap[same]
    first = np.isnan(prev)
    hours = np.log1p(np.nan_to_num(prev, nan=0.0) / 3600.0)
    return np.stack([hours, first.astype(np.float64)], axis=1)


def running_rate(key: np.ndarray, ts: np.ndarray, label: np.ndarray, prior_rate: float,
                 prior: float = 5.0) -> np.ndarray:
    """(N, 2) per row: log1p(#earlier rows of the same key) and their positive rate,
    shrunk toward `prior_rate` by `prior` pseudo-rows. Earlier = a strictly smaller
    timestamp, so rows of the same second never see each other's labels."""
    order = np.lexsort((ts, key))
    k, t, y = key[order], ts[order], label[order].astype(np.float64)
    index = np.arange(len(k))
    new_key = np.r_[True, k[1:] != k[:-1]] if len(k) else np.zeros(0, bool)
    new_tie = new_key | (np.r_[True, t[1:] != t[:-1]] if len(k) else new_key)
    key_start = np.maximum.accumulate(np.where(new_key, index, 0)) if len(k) else index
    tie_start = np.maximum.accumulate(np.where(new_tie, index, 0)) if len(k) else index
    before = np.cumsum(y) - y  # positives strictly before each position
    count = tie_start - key_start
    positives = before[tie_start] - before[key_start]
    out = np.empty((len(k), 2))
    out[order] = np.stack([np.log1p(count), (positives + prior * prior_rate) / (count + prior)],
                          axis=1)
    return out


def history_features(dataset: Dataset, label: np.ndarray, prior_rate: float) -> np.ndarray:
    """(N, 4) what a streaming ranker knows at each rating: the user's and the item's
    earlier ratings (count, shrunk positive rate), from every earlier row."""
    return np.concatenate([running_rate(dataset.user, dataset.ts, label, prior_rate),
                           running_rate(dataset.item, dataset.ts, label, prior_rate)], axis=1)


def with_context(data: CTRData, dataset: Dataset, history_stats: bool = False) -> CTRData:
    """`data` with the context columns (and, if asked, the history columns) appended to
    every frame's dense block, standardised with the training rows' mean and std."""
    from dataclasses import replace

    from models.ctr_data import LABEL_THRESHOLD

    ctx = context_features(dataset)
    if history_stats:
        label = (dataset.rating >= LABEL_THRESHOLD).astype(np.float64)
        ctx = np.concatenate([ctx, history_features(
            dataset, label, float(data.train.label.mean()))], axis=1)
    mean = ctx[data.train.rows].mean(axis=0)
    std = ctx[data.train.rows].std(axis=0)
    std[std == 0] = 1.0

    def add(frame: CTRFrame) -> CTRFrame:
        extra = ((ctx[frame.rows] - mean) / std).astype(np.float32)
        return replace(frame, dense=np.concatenate([frame.dense, extra], axis=1))

    return replace(data, train=add(data.train), valid=add(data.valid), test=add(data.test))


def row_weights(frame: CTRFrame, dataset: Dataset, weighted: bool) -> np.ndarray:
    """Weighted logistic regression: a positive weighs its rating, a negative 1."""
    if not weighted:
        return np.ones(len(frame.label), dtype=np.float32)
    return np.where(frame.label > 0, dataset.rating[frame.rows], 1.0).astype(np.float32)


def weighted_bce(logit: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_n w_n BCE(logit_n, y_n) / sum_n w_n: the paper's weighted logistic regression."""
    bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return (bce * weight).sum() / weight.sum()


def _as_new_users(sparse: torch.Tensor, dense: torch.Tensor, data: CTRData, share: float,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `share` of the rows with user id 0 and a zero activity count: most rows
    of the time split come from users who joined after the cut."""
    if not share:
        return sparse, dense
    from models.ctr_train import USER_COUNT

    drop = torch.from_numpy(rng.random(len(sparse)) < share)
    sparse, dense = sparse.clone(), dense.clone()
    sparse[drop, 0] = 0
    dense[drop, USER_COUNT] = float(-data.dense_mean[USER_COUNT] / data.dense_std[USER_COUNT])
    return sparse, dense


def fit_ranker(data: CTRData, dataset: Dataset, cfg: RankConfig,
               progress: bool = False) -> tuple[RankingNet, TrainResult]:
    """Train the ranking MLP (Adam, weighted BCE), best validation AUC kept (patience)."""
    from models.ctr_train import evaluate_ctr
    from models.trainer import BestEpoch, EpochRecord, TrainResult, make_optimiser

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = RankingNet(data.field_sizes, data.n_dense, cfg)
    opt = make_optimiser(model.parameters(), "adam", cfg.lr, cfg.weight_decay)
    tr = data.train
    x = (torch.from_numpy(tr.sparse), torch.from_numpy(tr.genres), torch.from_numpy(tr.dense))
    y = torch.from_numpy(tr.label)
    w = torch.from_numpy(row_weights(tr, dataset, cfg.weighted))
    result = TrainResult(RankingNet.name, "auc")
    best = BestEpoch(result, cfg.patience)
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        for idx in torch.from_numpy(rng.permutation(len(y))).split(cfg.batch_size):
            sparse, dense = _as_new_users(x[0][idx], x[2][idx], data, cfg.user_dropout, rng)
            opt.zero_grad(set_to_none=True)
            logit = model(sparse, x[1][idx], dense)
            loss = weighted_bce(logit, y[idx], w[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        t1 = time.perf_counter()
        valid = evaluate_ctr(model, data.valid)
        t2 = time.perf_counter()
        result.history.append(EpochRecord(epoch, total / len(y), valid, t1 - t0, t2 - t1,
                                          t2 - start))
        if progress:
            print(f"epoch {epoch}: loss {total / len(y):.4f} valid auc {valid['auc']:.4f}")
        if not best.offer(epoch, valid["auc"], model) and best.exhausted(epoch):
            break
    best.restore(model)
    result.seconds = time.perf_counter() - start
    return model, result


